"""Small building blocks shared by the DINO transformer and the detection heads.

Follows IDEA-Research/DINO `models/dino/utils.py` and `deformable_transformer.py::_get_clones`. What differs:
`gen_sineembed_for_position` takes the number of features per coordinate (DINO hard-codes 128, i.e. d_model 256),
so tiny test models (d_model 32) work; its value for 128 is DINO's. Only the activations the configs can name exist.
"""
import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last).

    input_dim -> hidden_dim -> ... -> hidden_dim -> output_dim; parameters `layers.{i}.weight/bias` as in DETR/DINO.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f'MLP: num_layers must be >= 1, got {num_layers}')
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {'relu': F.relu, 'gelu': F.gelu, 'glu': F.glu}


def get_activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The functional activation called `name` ('relu', 'gelu' or 'glu')."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"transformer_activation: unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    """`n` deep copies of `module` in a ModuleList (DINO's `layer_share` option is not offered)."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def gen_sineembed_for_position(pos: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of normalised points or boxes, as in DAB-DETR / DINO.

    Each coordinate c in [0, 1] is scaled to 2*pi*c and divided by temperature^(2*floor(i/2)/F) for
    i = 0..F-1 (F = num_pos_feats); even i take sin, odd i take cos, interleaved.

    Args:
        pos: (..., 2) as (x, y) or (..., 4) as (cx, cy, w, h).
    Returns:
        (..., 2F) as [emb(y), emb(x)] or (..., 4F) as [emb(y), emb(x), emb(w), emb(h)] (DINO's order).
    """
    if pos.shape[-1] not in (2, 4):
        raise ValueError(f'gen_sineembed_for_position: last dim must be 2 (x, y) or 4 (cx, cy, w, h), '
                         f'got shape {tuple(pos.shape)}')
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode='floor') / num_pos_feats)

    def embed(coord: Tensor) -> Tensor:
        angles = coord[..., None] * (2 * math.pi) / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)

    x, y = pos[..., 0], pos[..., 1]
    parts = [embed(y), embed(x)]
    if pos.shape[-1] == 4:
        parts += [embed(pos[..., 2]), embed(pos[..., 3])]
    return torch.cat(parts, dim=-1)
