"""`ms_deform_attn`: the multi-scale deformable attention op, dispatched at call time to one of four backends.

Backends (same signature and semantics as Deformable-DETR's `MSDeformAttnFunction`, which DINO and CAFF-DINO use):
    pytorch  the `F.grid_sample` composition (`ms_deform_attn_pytorch.py`); always works; the reference.
    cpu      the fused C++ kernel (`csrc/ms_deform_attn_cpu.cpp`), built on first use.
    cuda     the CUDA kernels (`csrc/ms_deform_attn_cuda.cu`), built with nvcc on first CUDA use.
    triton   the Triton kernels (`ms_deform_attn_triton.py`): CUDA tensors, JIT-compiled by the Triton that ships
             with torch (no nvcc, no build step); CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter,
             how the tests run them).

Which one runs: every call names the backend it asks for (`MSDeformAttn.backend`, set by the builder from the
config key `msda_backend`; `backend_from_config` applies the CAFF_MSDA_BACKEND override). The candidates, tried in
order until one is available and trusted (`pytorch`, always both, ends every list):

    asked      CPU tensors          CUDA tensors
    auto       cpu, pytorch         cuda, triton, pytorch
    cpu        cpu, pytorch         (as auto: cpu cannot run CUDA tensors)
    cuda       (as auto)            cuda, pytorch
    triton     triton, pytorch      triton, pytorch
    pytorch    pytorch              pytorch

Why `auto` on CUDA tries cuda before triton: the CUDA kernels are the reference's algorithm (what published DINO
and CAFF-DINO weights were trained with); Triton is the path for the many GPU machines without a matching nvcc,
where the cuda build fails and Triton still needs no build; pytorch when neither is available or trusted. The order
is to be revisited with the GPU timings of tools/gpu_checks.sh. On CPU, `auto` never picks triton: the interpreter
exists to test the kernels, it is far slower than the pytorch path. Other devices, and tracing (torch.export /
torch.compile / jit.trace record plain ops), always use pytorch.

Self-check: the first time a compiled backend (cpu, cuda, triton) would run for a (device, dtype), it runs a small
random problem with the call's head count, head size, levels and points (N=2, Lq=5, maps of at most 5x5) next to
`pytorch`, forward and the three gradients. A relative error above SELF_CHECK_TOLERANCE, or an exception, makes
it untrusted: one warning with the error size, and the next candidate runs. Its one-time cost is recorded in
`self_check_seconds` (and logged). Every fallback (build failure, wrong device, failed self-check) warns once per
(asked backend, device, dtype); the backend chosen is logged once.

Unlike the reference, nothing is compiled at import, the CPU path does not raise "not implemented", and fp16/bf16
inputs are computed in fp32 and the result cast back.
"""
import logging
import os
import time
import warnings
from types import ModuleType
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from util.errors import UsageError

from ..fused_layers import tracing
from .ms_deform_attn_pytorch import ms_deform_attn_pytorch

logger = logging.getLogger(__name__)

BACKENDS = ('auto', 'pytorch', 'cpu', 'cuda', 'triton')
ENV_VAR = 'CAFF_MSDA_BACKEND'
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}  # largest |error| / largest |pytorch value|

_CANDIDATES = {('auto', 'cpu'): ('cpu', 'pytorch'), ('cpu', 'cpu'): ('cpu', 'pytorch'),
               ('triton', 'cpu'): ('triton', 'pytorch'),
               ('auto', 'cuda'): ('cuda', 'triton', 'pytorch'), ('cuda', 'cuda'): ('cuda', 'pytorch'),
               ('triton', 'cuda'): ('triton', 'pytorch')}

_modules: dict[str, ModuleType | None] = {}  # backend -> its kernels (an extension or the triton module), or None
_unavailable: dict[str, str] = {}  # backend -> why it could not be loaded
_trusted: dict[tuple[str, str, torch.dtype], str | None] = {}  # (backend, device, dtype) -> None or why not
self_check_seconds: dict[tuple[str, str, torch.dtype], float] = {}
_warned: set[tuple] = set()
_logged: set[tuple] = set()


def check_backend_name(name: str, source: str) -> str:
    """`name` if it is one of BACKENDS, else a UsageError (a ValueError) naming `source` and the choices."""
    if name not in BACKENDS:
        raise UsageError(f"{source}: unknown MSDeformAttn backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def backend_from_config(configured: str) -> str:
    """The backend for the model: $CAFF_MSDA_BACKEND when set (an explicit override, logged once), else the
    config value `msda_backend`."""
    configured = check_backend_name(configured, 'msda_backend')
    env = os.environ.get(ENV_VAR, '').strip().lower()
    if not env:
        return configured
    chosen = check_backend_name(env, f'environment variable {ENV_VAR}')
    if ('override', chosen, configured) not in _logged:
        _logged.add(('override', chosen, configured))
        logger.warning("MSDeformAttn: %s=%s overrides msda_backend=%r", ENV_VAR, chosen, configured)
    return chosen


def _failure_reason(error: Exception) -> str:
    """The informative line of a build error: the first compiler 'error' line, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [line for line in lines if 'error' in line.lower() and not line.startswith('Error building extension')]
    return errors[0] if errors else lines[-1]


def _load(name: str) -> ModuleType | None:
    """The kernels of 'cpu', 'cuda' (built on first request) or 'triton' (imported); None if that fails."""
    if name not in _modules:
        from . import build  # imported here so that `python -m models.ops.build` runs it fresh
        try:
            if name == 'triton':
                from . import ms_deform_attn_triton as module
            else:
                module = build.load_cpu_extension() if name == 'cpu' else build.load_cuda_extension()
            _modules[name] = module
        except Exception as error:  # a failed build must degrade to the next backend, whatever the cause
            _modules[name] = None
            _unavailable[name] = f"'{name}' could not be {'imported' if name == 'triton' else 'built'} " \
                                 f"({_failure_reason(error)})"
    return _modules[name]


def _why_not_loadable(name: str, device: torch.device) -> str | None:
    """None if backend `name` is loaded and can run tensors on `device`, else why not."""
    module = _load(name)
    if module is None:
        return _unavailable[name]
    if name == 'triton' and not module.can_run(device):
        return ("'triton' runs cpu tensors only under TRITON_INTERPRET=1, set before its first use"
                if device.type == 'cpu' else f"'triton' cannot run {device} tensors")
    return None


def self_check_problem(device: torch.device, dtype: torch.dtype, heads: int = 2, head_dim: int = 4,
                       levels: int = 2, points: int = 2, queries: int = 5, seed: int = 0):
    """A small random problem, batch 2: value, spatial_shapes, level_start_index, locations in [-0.3, 1.3],
    weights, grad_output; maps of at most 5x5, with a single row and a single column among them. The global RNG
    is not touched."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([(3, 5), (1, 4), (4, 1), (2, 2), (5, 3)] * (levels // 5 + 1))[:levels]
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    n, lq, s = 2, queries, int(shapes.prod(1).sum())
    value = torch.randn(n, s, heads, head_dim, generator=gen, dtype=dtype)
    locations = torch.rand(n, lq, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(n, lq, heads, levels, points, generator=gen, dtype=dtype)
    grad_output = torch.randn(n, lq, heads * head_dim, generator=gen, dtype=dtype)
    return tuple(t.to(device) for t in (value, shapes, starts, locations, weights, grad_output))


def output_and_grads(fn, value, locations, weights, grad_output) -> tuple[torch.Tensor, ...]:
    """(out, grad_value, grad_locations, grad_weights) of `fn(value, locations, weights)` for `grad_output`."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_output))


def self_check(module, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, levels: int,
               points: int) -> tuple[str, float]:
    """Compare `module`'s kernels with the pytorch path on `self_check_problem`: (name of the worst of output /
    grad_value / grad_locations / grad_weights, its largest |error| relative to the largest |pytorch value|)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        value, shapes, starts, locations, weights, grad_output = self_check_problem(device, dtype, heads,
                                                                                    head_dim, levels, points)
        want = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a), value, locations, weights,
                                grad_output)
        got = output_and_grads(lambda v, l, a: _FusedMSDeformAttn.apply(module, v, shapes, starts, l, a, 64),
                               value, locations, weights, grad_output)
    errors = {name: float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
              for name, g, w in zip(('output', 'grad_value', 'grad_locations', 'grad_weights'), got, want)}
    worst = max(errors, key=lambda name: (errors[name] != errors[name], errors[name]))  # NaN counts as worst
    return worst, errors[worst]


def _why_not_trusted(name: str, device: torch.device, dtype: torch.dtype, problem: tuple[int, int, int, int]):
    """None if backend `name` is available on `device` and passed its self-check for `dtype`, else why not."""
    key = (name, str(device), dtype)
    if key not in _trusted:
        reason = _why_not_loadable(name, device)
        if reason is None:
            start = time.perf_counter()
            try:
                worst, error = self_check(_modules[name], device, dtype, *problem)
            except Exception as failure:  # e.g. a kernel that does not compile for this GPU
                reason = f"'{name}' failed on the self-check problem ({type(failure).__name__}: {failure})"
            else:
                if not error <= SELF_CHECK_TOLERANCE[dtype]:
                    reason = (f"'{name}' disagrees with 'pytorch' on the self-check problem: {worst} off by "
                              f"{error:.2e} of its largest value (tolerance {SELF_CHECK_TOLERANCE[dtype]:.0e})")
            self_check_seconds[key] = time.perf_counter() - start
            logger.info("MSDeformAttn: self-check of '%s' on %s %s took %.1f ms: %s", name, device,
                        str(dtype).removeprefix('torch.'), 1e3 * self_check_seconds[key], reason or 'passed')
        _trusted[key] = reason
    return _trusted[key]


def candidates(backend: str, device: torch.device) -> tuple[tuple[str, ...], str | None]:
    """The backends to try in order for `backend` asked on `device`, and why the ask itself was replaced (or None)."""
    check_backend_name(backend, 'ms_deform_attn')
    if backend == 'pytorch' or device.type not in ('cpu', 'cuda'):
        return ('pytorch',), None
    if (backend, device.type) in _CANDIDATES:
        return _CANDIDATES[backend, device.type], None
    return _CANDIDATES['auto', device.type], f"'{backend}' cannot run {device.type} tensors"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    problem: tuple[int, int, int, int] = (2, 4, 2, 2)) -> str:
    """The backend that runs when `backend` is asked for (dtype) tensors on `device`.

    `problem` = (heads, head size, levels, points) of the self-check, when one runs. Builds, imports and
    self-checks candidates as needed (each once per process); warns once when the first candidate is not used.
    """
    if tracing():
        return 'pytorch'
    order, reason = candidates(backend, device)
    reasons = [reason] if reason else []
    for chosen in order:
        why_not = None if chosen == 'pytorch' else _why_not_trusted(chosen, device, dtype, problem)
        if why_not is None:
            break
        reasons.append(why_not)
    what = f"{device.type} {str(dtype).removeprefix('torch.')} tensors"
    if reasons and ('warn', backend, what) not in _warned:
        _warned.add(('warn', backend, what))
        warnings.warn(f"MSDeformAttn: using the '{chosen}' backend for {what} ({'; '.join(reasons)}); set "
                      f"msda_backend or {ENV_VAR} to choose another", RuntimeWarning, stacklevel=3)
    if ('chosen', backend, what) not in _logged:
        _logged.add(('chosen', backend, what))
        logger.info("MSDeformAttn: using the '%s' backend for %s (asked: %s)", chosen, what, backend)
    return chosen


class _FusedMSDeformAttn(torch.autograd.Function):
    """Autograd wrapper of compiled kernels' `forward` / `backward` (the `cpu`, `cuda` and `triton` backends)."""

    @staticmethod
    def forward(ctx, kernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                im2col_step):
        ctx.kernels = kernels
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return kernels.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               im2col_step)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.kernels.backward(
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
                   spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
                   backend: str = 'auto') -> torch.Tensor:
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
        backend: one of BACKENDS, resolved per device and dtype as the module docstring says.

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
    _, _, heads, head_dim = value.shape
    chosen = 'pytorch' if tracing(value) else resolve_backend(backend, value.device, dtype,
                                                               (heads, head_dim, *sampling_locations.shape[3:5]))
    if chosen == 'pytorch':
        out = ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights,
                                     spatial_shapes_list)
    else:
        out = _FusedMSDeformAttn.apply(
            _modules[chosen], value.contiguous(), spatial_shapes.long().contiguous(),
            level_start_index.long().contiguous(), sampling_locations.contiguous(),
            attention_weights.contiguous(), im2col_step)
    return out.to(out_dtype)
