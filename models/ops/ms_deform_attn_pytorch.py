"""Multi-scale deformable attention as a composition of `F.grid_sample` calls: the always-working path.

Follows Deformable-DETR's `ms_deform_attn_core_pytorch` (also used unchanged by DINO and CAFF-DINO): every level of
`value` is reshaped to an image of shape (N*M, D, H_l, W_l) and sampled bilinearly at the P points of each query
(align_corners=False, zero padding), then the samples are weighted and summed over levels and points:

    out[n, q, m, :] = sum_{l, p} A[n, q, m, l, p] * bilinear(value_l[n, :, :, m, :], loc[n, q, m, l, p])

It is the reference the fused kernels are tested against. Differences from the reference: the level shapes may
be passed as a Python list (no device-to-host copy per call), and the level sizes are checked against `value`.
"""
from typing import Sequence

import torch
import torch.nn.functional as F


def spatial_shapes_as_list(spatial_shapes: torch.Tensor) -> list[tuple[int, int]]:
    """(L, 2) integer tensor of (H, W) per level -> [(H, W), ...] (one host copy if the tensor is on a device)."""
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes: torch.Tensor | None,
                           sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                           spatial_shapes_list: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Deformable attention over L feature levels with `F.grid_sample`.

    Args:
        value: (N, S, M, D) with S = sum_l H_l * W_l, levels stored one after the other, row-major.
        spatial_shapes: (L, 2) integer tensor of (H_l, W_l); only read when `spatial_shapes_list` is None.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1] over each level map.
        attention_weights: (N, Lq, M, L, P).
        spatial_shapes_list: optional [(H_l, W_l)] * L as Python ints, which avoids reading the tensor.

    Returns:
        (N, Lq, M * D), heads concatenated along the channels.
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = list(spatial_shapes_list) if spatial_shapes_list is not None else spatial_shapes_as_list(spatial_shapes)
    sizes = [h * w for h, w in shapes]
    if len(shapes) != n_levels or sum(sizes) != s:
        raise ValueError(f"ms_deform_attn_pytorch: level shapes {shapes} give {sum(sizes)} positions over "
                         f"{len(shapes)} levels, but value has S={s} and sampling_locations has L={n_levels}; "
                         "pass the (H, W) of every level the value was flattened from")
    # grid_sample takes coordinates in [-1, 1]; align_corners=False maps 0 and 1 to the outer pixel edges.
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (value_l, (h, w)) in enumerate(zip(value.split(sizes, dim=1), shapes)):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        image = value_l.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(image, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    # L x (N*M, D, Lq, P) -> (N*M, D, Lq, L*P), weighted by (N*M, 1, Lq, L*P) and summed over L*P.
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
