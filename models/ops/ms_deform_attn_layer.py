"""`MSDeformAttn`: the multi-scale deformable attention layer of Deformable DETR, as used by DINO and CAFF-DINO.

Follows Deformable-DETR `models/ops/modules/ms_deform_attn.py` (identical in DINO): same parameter names
(`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`), shapes and initialisation, so public DINO
weights load unchanged. Differences: each layer holds the backend it asks the op for (`backend`, passed by the
builder from `msda_backend`; `use_backend` changes it for a block), resolved at call time (`ms_deform_attn_func.py`,
nothing compiled at import), fp16/bf16 run the op in fp32 and cast back, the level shapes may be passed as a
Python list, and a d_model not divisible by n_heads is an error (the reference's power-of-two head-size warning is
dropped: the kernels here have no such preference).
"""
import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import fused_layers
from .ms_deform_attn_func import check_backend_name, ms_deform_attn


def _one_pass_rounds_alike(reference_points: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Whether ``addcdiv`` / ``addcmul`` round like the reference's two-step expression: both tensors float32 or
    both float64. Mixed dtypes (AMP: half offsets, float32 points) and half-precision models (the one-pass kernels
    compute in float and round once) keep the expression itself."""
    return reference_points.dtype == offsets.dtype and offsets.dtype in (torch.float32, torch.float64)


class MSDeformAttn(nn.Module):
    """Each query attends to n_points sampled positions per head and level around its reference point.

    With M heads, L levels, P points and head size D = d_model / M:
        offsets  = sampling_offsets(query)                       (N, Lq, M, L, P, 2)
        weights  = softmax over L*P of attention_weights(query)  (N, Lq, M, L, P)
        loc      = ref + offsets / (W_l, H_l)                    for 2-d reference points (x, y)
        loc      = ref_xy + offsets / P * ref_wh * 0.5           for 4-d reference boxes (cx, cy, w, h), DINO
        out      = output_proj(ms_deform_attn(value_proj(input_flatten), loc, weights))

    `backend` is the one asked of the op ('auto', 'pytorch', 'cpu', 'cuda', 'triton'); it is not a parameter or
    buffer, so checkpoints do not carry it.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 im2col_step: int = 64, backend: str = 'auto'):
        super().__init__()
        self.backend = check_backend_name(backend, 'MSDeformAttn')
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads}); "
                             "change hidden_dim or nheads")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.im2col_step = im2col_step
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Reference init: zero offset weights and a bias that spreads each head's points along its own direction.

        Head h points along angle 2*pi*h/M, as (cos, sin) scaled so its larger component is +-1; point p (0-based)
        sits at (p + 1) times that vector, on every level. Attention logits start at 0 (uniform weights).
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2) * scale
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None,
                spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
                identity: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) as (x, y) in [0, 1], or (N, Lq, L, 4) as (cx, cy, w, h) in [0, 1],
                relative to each level's padded map; 2-d points may come expanded to (N, Lq, M, L, P, 2)
                (:meth:`expand_reference_points`).
            input_flatten: (N, S, C), levels flattened and concatenated, S = sum_l H_l * W_l.
            input_spatial_shapes: (L, 2) int64 (H_l, W_l).
            input_level_start_index: (L,) int64 offset of each level in S.
            input_padding_mask: (N, S) bool, True on padding (its value is zeroed), or None.
            spatial_shapes_list: optional [(H_l, W_l)] as Python ints (lets the pytorch path avoid a host sync).
            identity: optional (N, Lq, C) added to the output (the caller's residual), taken by the output
                projection's kernel.

        Returns:
            (N, Lq, C), ``+ identity`` if given.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        if tuple(input_spatial_shapes.shape) != (n_levels, 2):
            raise ValueError(f"MSDeformAttn: input_spatial_shapes must be ({n_levels}, 2) for n_levels={n_levels}, "
                             f"got {tuple(input_spatial_shapes.shape)}")
        value = fused_layers.linear(input_flatten, self.value_proj.weight, self.value_proj.bias)
        if input_padding_mask is not None:
            value = value.masked_fill_(input_padding_mask[..., None], 0.0)  # a fresh tensor: no copy needed
        value = value.view(n, s, m, self.d_model // m)
        offsets = fused_layers.linear(query, self.sampling_offsets.weight, self.sampling_offsets.bias)
        offsets = offsets.view(n, lq, m, n_levels, n_points, 2)
        weights = fused_layers.linear(query, self.attention_weights.weight, self.attention_weights.bias)
        weights = weights.view(n, lq, m, n_levels * n_points).softmax(-1)
        weights = weights.view(n, lq, m, n_levels, n_points)
        if reference_points.dim() == 6 or reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l).
            if reference_points.dim() == 6:
                self._check_expanded(reference_points, n, lq)
            else:
                reference_points = reference_points[:, :, None, :, None, :]
            # (W_l, H_l) written out for every head and point: the division then runs over dense blocks
            normalizer = input_spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :].expand(m, n_levels, n_points, 2)
            if _one_pass_rounds_alike(reference_points, offsets):
                locations = torch.addcdiv(reference_points, offsets, normalizer.contiguous())
            else:  # the reference's rounding, the quotient in the offsets' dtype
                locations = reference_points + offsets / normalizer
        elif reference_points.shape[-1] == 4:
            ref_xy, ref_wh = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            if _one_pass_rounds_alike(reference_points, offsets):
                # ref_xy + (offsets / P) * (wh * 0.5): the reference's ref_xy + ((offsets / P) * wh) * 0.5 up to
                # the last bit (0.5 is a power of 2, but the kernel may fuse the multiply-add into one rounding)
                locations = torch.addcmul(ref_xy, offsets / n_points, ref_wh * 0.5)
            else:
                locations = ref_xy + offsets / n_points * ref_wh * 0.5
        else:
            raise ValueError("MSDeformAttn: reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), or be "
                             "expanded to 6 dimensions, got shape "
                             f"{tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                             self.im2col_step, spatial_shapes_list, self.backend)
        return fused_layers.linear(out, self.output_proj.weight, self.output_proj.bias, residual=identity)

    def expand_reference_points(self, reference_points: torch.Tensor) -> torch.Tensor:
        """``(N, Lq, L, 2)`` points -> ``(N, Lq, M, L, P, 2)``, the same point for every head and sampling point,
        written out. :meth:`forward` takes either; a caller that gives the same points to several layers (the
        encoder) expands them once, and each layer's location update then reads two dense tensors instead of a
        broadcast one (about 8x faster on the CPU for the encoder's 6800 tokens)."""
        n, lq, levels, _ = reference_points.shape
        return reference_points[:, :, None, :, None, :].expand(n, lq, self.n_heads, levels, self.n_points, 2
                                                                ).contiguous()

    def _check_expanded(self, reference_points: torch.Tensor, n: int, lq: int) -> None:
        want = (n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        if tuple(reference_points.shape) != want:
            raise ValueError(f"MSDeformAttn: expanded reference_points must be {want} (expand_reference_points), "
                             f"got {tuple(reference_points.shape)}")

    def extra_repr(self) -> str:
        return (f'd_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, '
                f'n_points={self.n_points}, backend={self.backend!r}')


@contextlib.contextmanager
def use_backend(model: nn.Module, backend: str) -> Iterator[None]:
    """Inside the block every MSDeformAttn of `model` asks for `backend`; their own backends are restored after."""
    check_backend_name(backend, 'use_backend')
    layers = [module for module in model.modules() if isinstance(module, MSDeformAttn)]
    saved = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = backend
    try:
        yield
    finally:
        for layer, previous in zip(layers, saved):
            layer.backend = previous
