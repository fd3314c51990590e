"""Fusion of the two spectral streams, per feature level: CAFF cross-spectrum attention, a light CAFF, ablations.

Follows ``CrossSpectrumAttentionWithPosition`` and the fusion loop of ``DINO.forward`` in CAFF-DETR
(``CAFF-DINO/models/dino/dino.py``; docs/REFERENCE.md §1). With the default arguments the computation is the
reference's, so released CAFF-DINO weights give the reference's features.

Structure. The top model owns two ``nn.ModuleList``s with the reference names, one entry per feature level:
``conv_corr`` (the attention modules, :class:`CrossSpectrumAttention`) and ``redim_corr`` (the 1x1 conv +
GroupNorm that mixes the streams back to ``hidden_dim``). The fusion type is read in one place,
:func:`build_fusion`, which returns a :class:`Fusion`: it creates the two lists, fuses one level, and says which
stream a single-stream type keeps. The types:

==========  ===================================================  ====================  =================  =======
type        fused map at level l                                 conv_corr[l]          redim_corr[l]      FLOPs
==========  ===================================================  ====================  =================  =======
caff        redim(cat(q, kv, caff(q, kv)))  (the reference)      CrossSpectrumAttn     conv(2C+P -> C)    100 %
caff_dw     as caff, branch convs depthwise-separable            CrossSpectrumAttn     conv(2C+P -> C)    7.5 %
concat      redim(cat(q, kv))                                    --                    conv(2C -> C)      0.5 %
add         q + kv                                               --                    --                 0
rgb_only    the RGB stream alone                                 --                    --                 0
ir_only     the thermal stream alone                             --                    --                 0
==========  ===================================================  ====================  =================  =======

(FLOPs: of the caff fusion of the R50 4-scale model at 512 x 640, counted in docs/benchmarks/fusion_cost.md.)
``q`` is the query-side stream (``backbone_visible``/``input_proj``) and ``kv`` the key/value side
(``backbone_ir``/``input_proj_ir``); which image takes which side is the top model's ``query_modality``. The
single-stream types never fuse: the top model runs only the stream they keep.

**caff_dw** (not in the reference) is the efficient CAFF. Nearly all of CAFF's arithmetic is its 5x5 and 7x7
query/key/value convolutions, ``C^2 k^2`` multiply-adds per pixel each (docs/REFERENCE.md §1: 74 of the 75
``C^2`` units of a branch). caff_dw factors each of them into a depthwise ``k x k`` convolution followed by a
pointwise 1x1 (``C k^2 + C^2``: 1/40 of the cost at k = 7, C = 256), as in MobileNet. What makes CAFF CAFF is
kept: the two stages (cross, then self-attention on the fusion), the three receptive fields 1/5/7 feeding the
row attention, the PE on the 1x1 branch, the compression and projection widths, hence the same redim_corr and
the same interface. The alternatives were weighed: grouped convolutions (8 groups) keep 1/8 of the branch cost
and cut the channel mixing inside the branch; a reduced inner width (C/4) keeps about a quarter, which is the
limit of the budget, and narrows the attention to 64 channels; CAFF-lite (reference ``CAFF-lite-DINO``) drops
the 5x5/7x7 branches altogether. Depthwise-separable keeps every channel and every receptive field for 7.5 %
of the FLOPs. Its parameters have their own names inside each branch (``...k7.S.i.0`` depthwise,
``...k7.S.i.1`` pointwise), so caff checkpoints do not load into it.

CAFF at one level, for ``x1`` (query side) and ``x2`` (key/value side), both ``(B, C, H, W)``::

    P = 2 * PE(C, H, W)                       unnormalised sine PE on integer row/col indices (see below)
    for each stage s:                         (2 stages)
        for each branch b with kernel k_b:    (k = 1, 5, 7; state-dict names k1, k3, k7)
            q = Wq(x1) [+ P if k_b == 1],  kk = Wk(x2) [+ P if k_b == 1],  v = Wv(x2)     (B, C, H', W')
            A = softmax(q @ kk^T, dim=-1)     per channel, rows attend to rows: (B, C, H', H'); no 1/sqrt(d)
            o_b = bilinear_resize(A @ v, (H, W))                                         (B, C, H, W)
        x1 = x2 = compress_s(cat(o_1, o_5, o_7))   1x1 conv 3C -> C: stage 2 is self-attention on the fusion
    out = proj(x1)                            1x1 conv C -> P (= 64)                      (B, P, H, W)

with ``H' = H - k + 1``, ``W' = W - k + 1`` (all convs unpadded, stride 1) and
``PE[2i, y, x] = sin(y * f_i)``, ``PE[2i+1, y, x] = cos(x * f_i)``, ``f_i = 10000^(-2i / C)``. Padding masks
are not used inside CAFF (as the reference); the top model ORs the two streams' masks.

Differences from the reference, none of which changes its output where the reference runs:

- Convolutions of a branch that read the same map run as one convolution over the concatenated weights: key and
  value in stage 1 (both read ``x2``), query, key and value in stage 2 (``x1`` is ``x2``). The output is the
  same, bit for bit (each output channel is the same dot product). The state dict keeps the reference's separate
  convs; the concatenated weights are built per call while training and kept between calls at inference
  (:class:`models.utils.DerivedTensors`; for the R50 model that is a second copy of 5/6 of the fusion weights,
  about 400 MB, plus the stage-1 query weights of levels 1-3, about 60 MB).
- At inference on the fused CPU path, a branch conv whose weight has at least 4 times the values of its output
  (the small maps: levels 1-3 at 512 x 640) keeps its weight packed in oneDNN's layout, as the ResNet does: the
  plain call reorders the weight every time, and here that costs more than copying the channels-last output
  back to NCHW. Same math; the sums run in another order (float32 rounding, about 1e-6 relative).
- The PE is computed once per ``(C, H, W, device, dtype)`` and cached (the reference rebuilds it on the CPU at
  every call). It is computed like the reference's, in float32 on the CPU, then cast to the input dtype
  (the reference adds the float32 PE and lets type promotion act, which differs only for half precision).
- Small maps: the reference crashes when a map is smaller than a branch kernel (any level below 7x7, i.e. padded
  images under 385 px). Here a branch whose kernel ``k`` exceeds the map in a dimension zero-pads its input in
  that dimension, centred, to exactly ``k``; its conv output then has size 1 there and is resized back to
  ``(H, W)`` like any other branch output. Maps at least as large as every kernel are not padded, so the
  computation is unchanged there.
- Width (``channels``, the reference hard-codes 256 instead of ``hidden_dim``), number of stages, kernel sizes and
  projection width are arguments, with the reference values as defaults.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_layers
from .utils import DerivedTensors

# State-dict names of the three CAFF branches, by position; the reference kernel sizes are 1, 5 (named k3) and 7.
BRANCH_NAMES = ('attention_stages_k1', 'attention_stages_k3', 'attention_stages_k7')

# Packed branch weights where the weight has at least this many times the values of the output (see
# CrossSpectrumAttention._grouped_conv). Measured per conv at 512 x 640 (2 threads): the weight/output ratio is
# 1.4-2.9 at level 0, where packing loses (7x7: 282 -> 291 ms with the copy back), and 6-1,600 at levels 1-3,
# where it wins (7x7: 72 -> 57, 24 -> 11, 15 -> 2.4 ms).
_PACK_MIN_WEIGHT_TO_OUTPUT = 4

# Distinct map shapes kept by the PE cache (levels x a few image sizes); each entry is C*H*W values.
_PE_CACHE_SIZE = 16


def caff_position_encoding(channels: int, height: int, width: int) -> torch.Tensor:
    """CAFF's sine PE, ``(channels, height, width)`` float32 on the CPU, as the reference computes it.

    Even channels ``2i`` hold ``sin(y * f_i)`` (row index y), odd channels ``cos(x * f_i)`` (column index x),
    with ``f_i = exp(-2i * ln(10000) / channels)`` and 0-based integer indices (no normalisation).
    """
    if channels % 2:
        raise ValueError(f'CAFF position encoding needs an even channel count, got channels={channels}')
    freqs = torch.exp(torch.arange(0.0, channels, 2) * -(math.log(10000.0) / channels))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing='ij')  # explicit dtype: the ONNX exporter makes arange(0.0, symbolic) int64
    encoding = torch.zeros(channels, height, width)
    encoding[0::2] = torch.sin(rows * freqs[:, None, None])
    encoding[1::2] = torch.cos(cols * freqs[:, None, None])
    return encoding


@functools.lru_cache(maxsize=_PE_CACHE_SIZE)
def _combined_position_encoding(channels: int, height: int, width: int, device: torch.device,
                                dtype: torch.dtype) -> torch.Tensor:
    """``PE(x1) + PE(x2)`` of the reference (= 2 PE, exact in floating point), cast to ``device``/``dtype``.

    Built outside inference mode so that one cached tensor serves evaluation and training alike.
    """
    with torch.inference_mode(False):
        return (2 * caff_position_encoding(channels, height, width)).to(device=device, dtype=dtype)


def _pad_to_kernel(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad ``x (B, C, H, W)`` (centred) in each spatial dimension smaller than ``kernel_size`` up to it."""
    pad_h = max(kernel_size - x.shape[-2], 0)
    pad_w = max(kernel_size - x.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def _branch_conv(channels: int, kernel_size: int, separable: bool) -> nn.Module:
    """One query/key/value conv ``C -> C``, unpadded: plain ``k x k``, or (``separable`` and k > 1) depthwise
    ``k x k`` then pointwise 1x1 (caff_dw)."""
    if separable and kernel_size > 1:
        return nn.Sequential(nn.Conv2d(channels, channels, kernel_size, groups=channels),
                             nn.Conv2d(channels, channels, 1))
    return nn.Conv2d(channels, channels, kernel_size)


def _row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per channel, rows attend to rows: ``softmax(q @ k^T, -1) @ v`` on ``(B, C, H', W')`` maps (no scaling)."""
    return torch.matmul(torch.softmax(torch.matmul(query, key.transpose(-1, -2)), dim=-1), value)


class CrossSpectrumAttention(nn.Module):
    """CAFF: multi-kernel, row-wise per-channel cross attention of one feature level (module docstring for math).

    Args:
        channels: feature width C of both inputs (the reference: 256).
        num_stages: attention stages; stage 1 is cross attention, later stages self-attention on the fusion.
        kernel_sizes: the three branch kernels, stored as ``attention_stages_k1/k3/k7``; the first must be 1
            (it carries the PE and fixes the output size).
        proj_dim: output width P of the final 1x1 projection (the reference: 64).
        separable: depthwise-separable query/key/value convs in the k > 1 branches (fusion type caff_dw).

    Parameters per stage ``s`` and branch: ``attention_stages_k*[s]`` = ModuleList(query, key, value convs),
    ``compression_convs[s]`` = Sequential(Conv 3C -> C); then ``proj`` Conv C -> P. All PyTorch default init.
    """

    def __init__(self, channels: int = 256, num_stages: int = 2, kernel_sizes: tuple[int, ...] = (1, 5, 7),
                 proj_dim: int = 64, separable: bool = False):
        super().__init__()
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if len(kernel_sizes) != len(BRANCH_NAMES) or kernel_sizes[0] != 1 or min(kernel_sizes) < 1:
            raise ValueError(f'caff_kernel_sizes must be three kernel sizes starting with 1 (the branch that '
                             f'carries the position encoding), e.g. [1, 5, 7]; got {list(kernel_sizes)}')
        if num_stages < 1:
            raise ValueError(f'caff_num_stages must be >= 1, got {num_stages}')
        if channels % 2:
            raise ValueError(f'CAFF needs an even channel count for its position encoding, got {channels}')
        self.channels = channels
        self.num_stages = num_stages
        self.kernel_sizes = kernel_sizes
        for name, kernel in zip(BRANCH_NAMES, kernel_sizes):
            stages = nn.ModuleList(
                nn.ModuleList(_branch_conv(channels, kernel, separable) for _ in range(3))  # query, key, value
                for _ in range(num_stages))
            self.add_module(name, stages)
        self.compression_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(len(kernel_sizes) * channels, channels, 1)) for _ in range(num_stages))
        self.proj = nn.Conv2d(channels, proj_dim, 1)
        self._fused = DerivedTensors()

    def branches(self, stage: int) -> list[tuple[str, int, nn.ModuleList]]:
        """``[(name, kernel_size, ModuleList(query, key, value convs))]`` of one stage, in concatenation order."""
        return [(name, kernel, getattr(self, name)[stage]) for name, kernel in zip(BRANCH_NAMES, self.kernel_sizes)]

    def _projections(self, name: str, convs: nn.ModuleList, x1: torch.Tensor, x2: torch.Tensor
                     ) -> list[torch.Tensor]:
        """``[Wq(x1), Wk(x2), Wv(x2)]``; plain convs that read the same tensor run as one convolution.

        That is key + value when ``x1`` and ``x2`` differ, all three when they are the same tensor. The
        concatenated weights come from ``self._fused`` (kept between calls without autograd).
        """
        inputs = (x1, x2, x2)
        groups = [(0, 1, 2)] if x1 is x2 else [(0,), (1, 2)]
        outs: list[torch.Tensor | None] = [None, None, None]
        for group in groups:
            members = [convs[i] for i in group]
            x = inputs[group[0]]
            if not all(isinstance(conv, nn.Conv2d) for conv in members):
                for i, conv in zip(group, members):
                    outs[i] = conv(x)
                continue
            fused = self._grouped_conv(f'{name}.{"".join(map(str, group))}', members, x)
            for i, part in zip(group, fused.split([conv.out_channels for conv in members], dim=1)):
                outs[i] = part
        return outs

    def _grouped_conv(self, key: str, members: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
        """``cat([conv(x) for conv in members], dim=1)`` as one unpadded convolution, ``(B, sum C_out, H', W')``.

        Without autograd, on the fused CPU path, the weight is kept packed (:func:`fused_layers.packed_conv_weight`)
        where it is at least ``_PACK_MIN_WEIGHT_TO_OUTPUT`` times the output's size: a plain weight is reordered
        inside every oneDNN call, a packed one writes a channels-last output that is copied back to NCHW for the
        row attention, so packing pays on small maps only. Elsewhere the output is the separate convs', bit for bit.
        """
        kernel_h, kernel_w = members[0].kernel_size
        out_channels = sum(conv.out_channels for conv in members)
        out_numel = x.shape[0] * out_channels * (x.shape[-2] - kernel_h + 1) * (x.shape[-1] - kernel_w + 1)
        sources = [t for conv in members for t in (conv.weight, conv.bias)]
        pack = (fused_layers.onednn_applies(x, *sources)
                and sum(conv.weight.numel() for conv in members) >= _PACK_MIN_WEIGHT_TO_OUTPUT * out_numel)

        def build():
            weight = torch.cat([conv.weight for conv in members]) if len(members) > 1 else members[0].weight
            bias = torch.cat([conv.bias for conv in members]) if len(members) > 1 else members[0].bias
            return (fused_layers.packed_conv_weight(weight, x) if pack else weight), bias

        weight, bias = self._fused.get((key, pack), sources, build)
        if pack:
            return fused_layers.conv2d(x, weight, bias).contiguous()
        return F.conv2d(x, weight, bias)

    def _branch(self, name: str, kernel_size: int, convs: nn.ModuleList, x1: torch.Tensor, x2: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        """One branch: ``(B, C, H, W) x2 -> (B, C, H, W)``, row attention per channel, resized to the input."""
        height, width = x1.shape[-2:]
        same = x1 is x2
        x1 = _pad_to_kernel(x1, kernel_size)
        x2 = x1 if same else _pad_to_kernel(x2, kernel_size)
        query, key, value = self._projections(name, convs, x1, x2)
        if pos is not None:
            query = query + pos
            key = key + pos
        out = _row_attention(query, key, value)  # (B, C, H', W')
        if out.shape[-2:] != (height, width):
            out = F.interpolate(out, size=(height, width), mode='bilinear', align_corners=False)
        return out

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Fuse the query-side map ``x1`` with the key/value-side map ``x2``.

        Args:
            x1: ``(B, C, H, W)``, the query side (the reference's "visible" branch, i.e. the thermal image).
            x2: ``(B, C, H, W)``, the key/value side.

        Returns:
            ``(B, proj_dim, H, W)``.
        """
        if x1.shape != x2.shape or x1.shape[1] != self.channels:
            raise ValueError(f'CrossSpectrumAttention expects two maps of shape (B, {self.channels}, H, W); '
                             f'got {tuple(x1.shape)} and {tuple(x2.shape)}')
        height, width = x1.shape[-2:]
        if fused_layers.tracing(x1):  # export / compile: sizes are symbolic and tensors fake, the cache needs ints
            pos = _combined_position_encoding.__wrapped__(self.channels, height, width, x1.device, x1.dtype)
        else:
            pos = _combined_position_encoding(self.channels, height, width, x1.device, x1.dtype)
        for stage in range(self.num_stages):
            outs = [self._branch(f'{name}.{stage}', kernel, convs, x1, x2, pos if kernel == 1 else None)
                    for name, kernel, convs in self.branches(stage)]
            x1 = x2 = self.compression_convs[stage](torch.cat(outs, dim=1))
        return self.proj(x1)


def _redim_layers(num_levels: int, in_channels: int, channels: int) -> nn.ModuleList:
    """Per level ``Sequential(Conv2d(in_channels, channels, 1), GroupNorm(32, channels))`` (the reference's)."""
    return nn.ModuleList(nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.GroupNorm(32, channels))
                         for _ in range(num_levels))


class Fusion:
    """One fusion type: the layers it needs and how it fuses a level. Not an ``nn.Module``: its layers live in
    the top model under the reference names (``conv_corr``, ``redim_corr``).

    ``kept_modality`` is ``'rgb'`` or ``'ir'`` for a single-stream type (the image it keeps; the top model then
    runs only that stream and never calls :meth:`fuse`), None for the types that fuse two streams.
    """

    kept_modality: str | None = None

    def layers(self, num_levels: int, channels: int) -> tuple[nn.ModuleList | None, nn.ModuleList | None]:
        """``(conv_corr, redim_corr)``, one entry per level; ``None`` where the type has none."""
        return None, None

    def fuse(self, query: torch.Tensor, key_value: torch.Tensor, conv_corr: nn.Module | None,
             redim_corr: nn.Module | None) -> torch.Tensor:
        """Fuse one level's two projected maps ``(B, C, H, W)`` into one ``(B, C, H, W)``; ``conv_corr`` and
        ``redim_corr`` are this level's entries of :meth:`layers` (or None)."""
        raise NotImplementedError


class CaffFusion(Fusion):
    """``redim(cat(q, kv, caff(q, kv)))``, the reference's concatenation order; caff_dw with ``separable``."""

    def __init__(self, num_stages: int, kernel_sizes: tuple[int, ...], proj_dim: int, separable: bool):
        self.num_stages, self.kernel_sizes, self.proj_dim = num_stages, tuple(kernel_sizes), proj_dim
        self.separable = separable

    def layers(self, num_levels, channels):
        conv_corr = nn.ModuleList(
            CrossSpectrumAttention(channels, self.num_stages, self.kernel_sizes, self.proj_dim, self.separable)
            for _ in range(num_levels))
        return conv_corr, _redim_layers(num_levels, 2 * channels + self.proj_dim, channels)

    def fuse(self, query, key_value, conv_corr, redim_corr):
        return redim_corr(torch.cat((query, key_value, conv_corr(query, key_value)), dim=1))


class ConcatFusion(Fusion):
    """``redim(cat(q, kv))``."""

    def layers(self, num_levels, channels):
        return None, _redim_layers(num_levels, 2 * channels, channels)

    def fuse(self, query, key_value, conv_corr, redim_corr):
        return redim_corr(torch.cat((query, key_value), dim=1))


class AddFusion(Fusion):
    """``q + kv``, no layers."""

    def fuse(self, query, key_value, conv_corr, redim_corr):
        return query + key_value


class SingleStream(Fusion):
    """One image's stream alone (rgb_only / ir_only), no layers."""

    def __init__(self, kept_modality: str):
        self.kept_modality = kept_modality

    def fuse(self, query, key_value, conv_corr, redim_corr):
        raise ValueError(f'a single-stream fusion ({self.kept_modality}_only) fuses nothing; the top model runs '
                         f'only the {self.kept_modality} stream')


# The one place that reads the fusion type: name -> builder(num_stages, kernel_sizes, proj_dim).
_FUSIONS = {
    'caff': lambda stages, kernels, proj: CaffFusion(stages, kernels, proj, separable=False),
    'caff_dw': lambda stages, kernels, proj: CaffFusion(stages, kernels, proj, separable=True),
    'concat': lambda stages, kernels, proj: ConcatFusion(),
    'add': lambda stages, kernels, proj: AddFusion(),
    'rgb_only': lambda stages, kernels, proj: SingleStream('rgb'),
    'ir_only': lambda stages, kernels, proj: SingleStream('ir'),
}
FUSION_TYPES = tuple(_FUSIONS)


def build_fusion(fusion_type: str, num_stages: int = 2, kernel_sizes: tuple[int, ...] = (1, 5, 7),
                 proj_dim: int = 64) -> Fusion:
    """The :class:`Fusion` of ``fusion_type`` (one of FUSION_TYPES); the CAFF arguments serve caff/caff_dw."""
    if fusion_type not in _FUSIONS:
        raise ValueError(f'fusion_type={fusion_type!r} is unknown; choose one of {list(FUSION_TYPES)}')
    return _FUSIONS[fusion_type](num_stages, tuple(kernel_sizes), proj_dim)
