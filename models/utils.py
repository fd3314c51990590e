"""Small building blocks shared by the models: MLP, activations, clones, the sine query embedding, and the cache of
weights derived from parameters for inference (`DerivedTensors`).

Follows IDEA-Research/DINO `models/dino/utils.py` and `deformable_transformer.py::_get_clones`. What differs:
`gen_sineembed_for_position` takes the number of features per coordinate (DINO hard-codes 128, i.e. d_model 256),
so tiny test models (d_model 32) work; its value for 128 is DINO's, and its frequencies are computed once per
(width, temperature, device). Only the activations the configs can name exist. `DerivedTensors` is not in the
reference: it holds the fused CAFF projections and the folded backbone convolutions (no recomputed constants).
"""
import copy
import functools
import math
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_layers


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
            x = fused_layers.linear(x, layer.weight, layer.bias, relu=i < self.num_layers - 1)
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


def sine_frequencies(num_pos_feats: int, temperature: float, device: torch.device, cached: bool = True) -> Tensor:
    """``temperature ** (2 * i / num_pos_feats)`` for i = 0 .. num_pos_feats / 2 - 1, float32: the divisor shared
    by features 2i (sin) and 2i + 1 (cos) of a DETR-style sine embedding (DETR writes it as ``dim_t[k]`` with
    ``k // 2``; the values are the same). Cached per argument triple; ``cached=False`` (under a tracer, whose
    tensors are fake and must not outlive it) builds it afresh."""
    if num_pos_feats % 2:
        raise ValueError(f'sine embedding: num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}')
    build = _sine_frequencies if cached else _sine_frequencies.__wrapped__
    return build(num_pos_feats, float(temperature), torch.device(device))


@functools.lru_cache(maxsize=32)
def _sine_frequencies(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        half = torch.arange(num_pos_feats // 2, dtype=torch.float32, device=device)
        return temperature ** (2 * half / num_pos_feats)


def interleaved_sin_cos(angles: Tensor) -> Tensor:
    """``(..., F/2)`` angles -> ``(..., F)`` as ``sin(a_0), cos(a_0), sin(a_1), cos(a_1), ...``."""
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def gen_sineembed_for_position(pos: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of normalised points or boxes, as in DAB-DETR / DINO.

    Each coordinate c in [0, 1] is scaled to 2*pi*c and divided by temperature^(2*floor(i/2)/F) for
    i = 0..F-1 (F = num_pos_feats); even i take sin, odd i take cos, interleaved.

    Args:
        pos: (..., 2) as (x, y) or (..., 4) as (cx, cy, w, h).
    Returns:
        (..., 2F) as [emb(y), emb(x)] or (..., 4F) as [emb(y), emb(x), emb(w), emb(h)] (DINO's order).

    All coordinates are embedded in one pass (the same operations as DINO's per-coordinate loop, element by
    element, so the values are bit-identical).
    """
    if pos.shape[-1] not in (2, 4):
        raise ValueError(f'gen_sineembed_for_position: last dim must be 2 (x, y) or 4 (cx, cy, w, h), '
                         f'got shape {tuple(pos.shape)}')
    freqs = sine_frequencies(num_pos_feats, temperature, pos.device, cached=not fused_layers.tracing(pos))
    order = [1, 0, 2, 3][:pos.shape[-1]]  # DINO's order: y first, then x (then w, h)
    coords = pos[..., order]
    embedded = interleaved_sin_cos(coords[..., None] * (2 * math.pi) / freqs)  # (..., 2 or 4, F)
    return embedded.flatten(-2)


class DerivedTensors:
    """Tensors computed from a module's parameters and buffers (fused or folded weights), kept until one of
    them changes.

    ``get(key, sources, build)`` returns ``build()``; the result is cached under ``key`` together with a stamp of
    every source tensor (storage address, in-place version counter, dtype, device), so an optimiser step, a
    ``load_state_dict``, ``.to(...)`` or ``.double()`` rebuilds it on the next call. The cache is used only when
    no gradient can flow into the sources (``torch.is_grad_enabled()`` False or no source requires grad): with
    autograd the result is built fresh on every call so that gradients reach the parameters. Cached results are
    built outside inference mode, so one cache serves ``torch.inference_mode`` and ``torch.no_grad`` alike.
    Under a tracer (``torch.export``, ``torch.compile``) nothing is cached: the tensors are fake.
    Copies of a module (``copy.deepcopy``, e.g. an EMA model) start with an empty cache.
    """

    def __init__(self):
        self._entries: dict[Hashable, tuple[tuple, tuple[Tensor, ...]]] = {}

    def __deepcopy__(self, memo) -> 'DerivedTensors':
        return DerivedTensors()

    def __getstate__(self) -> dict:
        return {'_entries': {}}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, sources: Sequence[Tensor],
            build: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return build()
        if fused_layers.tracing(*sources) or any(t.is_inference() for t in sources):  # fake tensors / no version counter
            return build()
        stamp = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._entries[key] = (stamp, value)
        return value
