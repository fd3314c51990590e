"""Fusion of the two spectral streams, per feature level: CAFF cross-spectrum attention and its ablations.

Follows ``CrossSpectrumAttentionWithPosition`` and the fusion loop of ``DINO.forward`` in CAFF-DETR
(``CAFF-DINO/models/dino/dino.py``; docs/REFERENCE.md §1). With the default arguments the computation is the
reference's, operation for operation, so released CAFF-DINO weights give the reference's features.

Structure. The top model owns two ``nn.ModuleList``s with the reference names, one entry per feature level:
``conv_corr`` (the attention modules, :class:`CrossSpectrumAttention`) and ``redim_corr`` (the 1x1 conv +
GroupNorm that mixes the streams back to ``hidden_dim``). :func:`build_fusion_layers` creates them for a
``fusion_type`` and :func:`fuse_level` applies one level. The fusion types:

==========  ===================================================  ====================  ===================
type        fused map at level l                                 conv_corr[l]          redim_corr[l]
==========  ===================================================  ====================  ===================
caff        redim(cat(q, kv, caff(q, kv)))  (the reference)      CrossSpectrumAttn     conv(2C+P -> C), GN
concat      redim(cat(q, kv))                                    --                    conv(2C -> C), GN
add         q + kv                                               --                    --
rgb_only    the RGB stream alone                                 --                    --
ir_only     the thermal stream alone                             --                    --
==========  ===================================================  ====================  ===================

``q`` is the query-side stream (``backbone_visible``/``input_proj``) and ``kv`` the key/value side
(``backbone_ir``/``input_proj_ir``); which image takes which side is the top model's ``query_modality``. The
single-stream types never reach :func:`fuse_level`: the top model runs only the stream it needs.

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

FUSION_TYPES = ('caff', 'concat', 'add', 'rgb_only', 'ir_only')
SINGLE_STREAM_FUSION_TYPES = ('rgb_only', 'ir_only')

# State-dict names of the three CAFF branches, by position; the reference kernel sizes are 1, 5 (named k3) and 7.
BRANCH_NAMES = ('attention_stages_k1', 'attention_stages_k3', 'attention_stages_k7')

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


class CrossSpectrumAttention(nn.Module):
    """CAFF: multi-kernel, row-wise per-channel cross attention of one feature level (module docstring for math).

    Args:
        channels: feature width C of both inputs (the reference: 256).
        num_stages: attention stages; stage 1 is cross attention, later stages self-attention on the fusion.
        kernel_sizes: the three branch kernels, stored as ``attention_stages_k1/k3/k7``; the first must be 1
            (it carries the PE and fixes the output size).
        proj_dim: output width P of the final 1x1 projection (the reference: 64).

    Parameters per stage ``s`` and branch: ``attention_stages_k*[s]`` = ModuleList(query, key, value convs),
    ``compression_convs[s]`` = Sequential(Conv 3C -> C); then ``proj`` Conv C -> P. All PyTorch default init.
    """

    def __init__(self, channels: int = 256, num_stages: int = 2, kernel_sizes: tuple[int, ...] = (1, 5, 7),
                 proj_dim: int = 64):
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
                nn.ModuleList(nn.Conv2d(channels, channels, kernel) for _ in range(3))  # query, key, value
                for _ in range(num_stages))
            self.add_module(name, stages)
        self.compression_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(len(kernel_sizes) * channels, channels, 1)) for _ in range(num_stages))
        self.proj = nn.Conv2d(channels, proj_dim, 1)

    def branches(self, stage: int) -> list[tuple[int, nn.ModuleList]]:
        """``[(kernel_size, ModuleList(query, key, value convs))]`` of one stage, in concatenation order."""
        return [(kernel, getattr(self, name)[stage]) for name, kernel in zip(BRANCH_NAMES, self.kernel_sizes)]

    @staticmethod
    def _attend(convs: nn.ModuleList, kernel_size: int, x1: torch.Tensor, x2: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        """One branch: ``(B, C, H, W) x2 -> (B, C, H, W)``, row attention per channel, resized to the input."""
        height, width = x1.shape[-2:]
        x1, x2 = _pad_to_kernel(x1, kernel_size), _pad_to_kernel(x2, kernel_size)
        query_conv, key_conv, value_conv = convs
        query, key, value = query_conv(x1), key_conv(x2), value_conv(x2)
        if pos is not None:
            query = query + pos
            key = key + pos
        weights = torch.softmax(torch.matmul(query, key.transpose(-1, -2)), dim=-1)  # (B, C, H', H')
        out = torch.matmul(weights, value)  # (B, C, H', W')
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
        if torch.compiler.is_compiling():  # torch.export / compile: sizes are symbolic, the cache needs ints
            pos = _combined_position_encoding.__wrapped__(self.channels, height, width, x1.device, x1.dtype)
        else:
            pos = _combined_position_encoding(self.channels, height, width, x1.device, x1.dtype)
        for stage in range(self.num_stages):
            outs = [self._attend(convs, kernel, x1, x2, pos if kernel == 1 else None)
                    for kernel, convs in self.branches(stage)]
            x1 = x2 = self.compression_convs[stage](torch.cat(outs, dim=1))
        return self.proj(x1)


def build_fusion_layers(fusion_type: str, num_levels: int, channels: int, num_stages: int = 2,
                        kernel_sizes: tuple[int, ...] = (1, 5, 7), proj_dim: int = 64
                        ) -> tuple[nn.ModuleList | None, nn.ModuleList | None]:
    """``(conv_corr, redim_corr)`` for ``fusion_type``, one entry per level; ``None`` where the type has none.

    ``redim_corr[l]`` is ``Sequential(Conv2d(in, channels, 1), GroupNorm(32, channels))`` with ``in = 2C + P``
    for caff (the reference) and ``2C`` for concat.
    """
    if fusion_type not in FUSION_TYPES:
        raise ValueError(f'fusion_type={fusion_type!r} is unknown; choose one of {list(FUSION_TYPES)}')
    if fusion_type == 'caff':
        conv_corr = nn.ModuleList(CrossSpectrumAttention(channels, num_stages, kernel_sizes, proj_dim)
                                  for _ in range(num_levels))
        redim_in = 2 * channels + proj_dim
    elif fusion_type == 'concat':
        conv_corr = None
        redim_in = 2 * channels
    else:
        return None, None
    redim_corr = nn.ModuleList(
        nn.Sequential(nn.Conv2d(redim_in, channels, 1), nn.GroupNorm(32, channels)) for _ in range(num_levels))
    return conv_corr, redim_corr


def fuse_level(fusion_type: str, query: torch.Tensor, key_value: torch.Tensor,
               conv_corr: nn.Module | None = None, redim_corr: nn.Module | None = None) -> torch.Tensor:
    """Fuse one level's two projected maps ``(B, C, H, W)`` into one ``(B, C, H, W)`` (caff / concat / add).

    ``conv_corr``/``redim_corr`` are this level's entries of the lists from :func:`build_fusion_layers`.
    The concatenation order is the reference's: query side, key/value side, CAFF output.
    """
    if fusion_type == 'caff':
        return redim_corr(torch.cat((query, key_value, conv_corr(query, key_value)), dim=1))
    if fusion_type == 'concat':
        return redim_corr(torch.cat((query, key_value), dim=1))
    if fusion_type == 'add':
        return query + key_value
    raise ValueError(f'fuse_level fuses two streams; fusion_type={fusion_type!r} is not one of caff/concat/add '
                     f'(single-stream types are handled by the top model, which skips the unused stream)')
