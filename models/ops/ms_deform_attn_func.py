"""`ms_deform_attn`: the multi-scale deformable attention op, dispatched at call time to one of three backends.

Backends (same signature and semantics as Deformable-DETR's `MSDeformAttnFunction`, which DINO and CAFF-DINO use):
    pytorch  the `F.grid_sample` composition (`ms_deform_attn_pytorch.py`); always works; the test reference.
    cpu      the fused C++ kernel (`csrc/ms_deform_attn_cpu.cpp`), built on first use.
    cuda     the CUDA kernels (`csrc/ms_deform_attn_cuda.cu`), built on first CUDA use.

Choice, per call, from the tensors' device: the environment variable CAFF_MSDA_BACKEND, else `set_backend(name)`
(what `build_model` passes from cfg.msda_backend), else 'auto' = `cuda` for CUDA tensors, `cpu` for CPU tensors,
each only when its extension builds. A backend that does not match the tensors' device, or whose extension
cannot be built, is replaced with one warning saying why (the build is not retried); the chosen backend is logged
once per device type. Unlike the reference, nothing is compiled at import, the CPU path does not raise
"not implemented", and fp16/bf16 inputs are computed in fp32 and the result cast back.
"""
import logging
import os
import warnings
from types import ModuleType
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

logger = logging.getLogger(__name__)

BACKENDS = ('auto', 'pytorch', 'cpu', 'cuda')
ENV_VAR = 'CAFF_MSDA_BACKEND'

_requested = 'auto'
_extensions: dict[str, ModuleType | None] = {}
_warned: set[str] = set()
_logged: set[tuple[str, str]] = set()


def _check_backend_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown MSDeformAttn backend {name!r}; choose one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for later calls: 'auto' (default), 'pytorch', 'cpu' or 'cuda'.

    The environment variable CAFF_MSDA_BACKEND, when set, takes precedence over this.
    """
    global _requested
    _requested = _check_backend_name(name, 'set_backend')


def requested_backend() -> str:
    """The backend asked for: $CAFF_MSDA_BACKEND if set, else the last `set_backend` value ('auto' by default)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_backend_name(env.strip().lower(), f'environment variable {ENV_VAR}')
    return _requested


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _failure_reason(error: Exception) -> str:
    """The informative line of a build error: the first compiler 'error' line, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [line for line in lines if 'error' in line.lower() and not line.startswith('Error building extension')]
    return errors[0] if errors else lines[-1]


def _extension(name: str) -> ModuleType | None:
    """The compiled extension for 'cpu' or 'cuda', built on first request; None (after one warning) if it can't."""
    if name not in _extensions:
        from . import build  # imported here so that `python -m models.ops.build` runs it fresh
        loader = build.load_cpu_extension if name == 'cpu' else build.load_cuda_extension
        try:
            _extensions[name] = loader()
        except Exception as error:  # a failed build must degrade to the pytorch path, whatever the cause
            _extensions[name] = None
            _warn_once(f'build-{name}', f"MSDeformAttn: the '{name}' backend could not be built "
                                        f"({_failure_reason(error)}); using the 'pytorch' backend instead (set "
                                        f"{ENV_VAR}=pytorch to skip the build)")
    return _extensions[name]


def resolve_backend(device: torch.device) -> str:
    """The backend that will run for tensors on `device`, building its extension if needed."""
    requested = requested_backend()
    native = 'cuda' if device.type == 'cuda' else 'cpu' if device.type == 'cpu' else None
    if requested not in ('auto', 'pytorch') and requested != native:
        _warn_once(f'device-{requested}-{device.type}',
                   f"MSDeformAttn: backend '{requested}' cannot run {device.type} tensors; choosing "
                   f"automatically for {device.type}")
        requested = 'auto'
    chosen = 'pytorch'
    if requested != 'pytorch' and native is not None and _extension(native) is not None:
        chosen = native
    if (device.type, chosen) not in _logged:
        _logged.add((device.type, chosen))
        logger.info("MSDeformAttn: using the '%s' backend for %s tensors (requested: %s)", chosen, device.type,
                    requested_backend())
    return chosen


class _FusedMSDeformAttn(torch.autograd.Function):
    """Autograd wrapper of a compiled extension's `forward` / `backward` (the `cpu` and `cuda` backends)."""

    @staticmethod
    def forward(ctx, extension, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                im2col_step):
        ctx.extension = extension
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                 im2col_step)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.im2col_step)
        return None, grad_value, None, None, grad_locations, grad_weights, None


def _check_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                  sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, _, m, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match "
                         f"value (N={n}, M={m})")
    if tuple(attention_weights.shape) != (n, lq, m, n_levels, n_points):
        raise ValueError(f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = "
                         f"{(n, lq, m, n_levels, n_points)}, got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (n_levels, 2) or spatial_shapes.is_floating_point():
        raise ValueError(f"ms_deform_attn: spatial_shapes must be an integer (L, 2) = ({n_levels}, 2) tensor of "
                         f"(H, W), got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (n_levels,) or level_start_index.is_floating_point():
        raise ValueError(f"ms_deform_attn: level_start_index must be an integer ({n_levels},) tensor, got "
                         f"{level_start_index.dtype} {tuple(level_start_index.shape)}")


def _op_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (fp16 and bf16 inputs are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64,
                   spatial_shapes_list: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3), differentiable in value, locations and weights.

        out[n, q, m*D:(m+1)*D] = sum_{l, p} A[n, q, m, l, p] * bilinear(value_l[n, :, m], loc[n, q, m, l, p])

    Bilinear sampling follows `grid_sample(align_corners=False, padding_mode='zeros')`: pixel (i, j) of a level
    has its centre at ((j + 0.5) / W, (i + 0.5) / H); neighbours outside the map contribute 0.

    Args:
        value: (N, S, M, D), the L levels flattened row-major one after the other, S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) int64 (H_l, W_l), on the device of `value`.
        level_start_index: (L,) int64, offset of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) normalised to [0, 1]; values outside are allowed.
        attention_weights: (N, Lq, M, L, P).
        im2col_step: kept for signature compatibility with the reference; it has no numerical effect and the
            kernels here process the whole batch at once.
        spatial_shapes_list: optional [(H_l, W_l)] as Python ints; the pytorch backend then reads no tensor.

    Returns:
        (N, Lq, M * D) in the dtype of `value`.
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if im2col_step <= 0:
        raise ValueError(f"ms_deform_attn: im2col_step must be positive, got {im2col_step}")
    out_dtype = value.dtype
    dtype = _op_dtype(value, sampling_locations, attention_weights)
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights))
    backend = resolve_backend(value.device)
    if backend == 'pytorch':
        out = ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights,
                                     spatial_shapes_list)
    else:
        out = _FusedMSDeformAttn.apply(
            _extension(backend), value.contiguous(), spatial_shapes.long().contiguous(),
            level_start_index.long().contiguous(), sampling_locations.contiguous(),
            attention_weights.contiguous(), im2col_step)
    return out.to(out_dtype)
