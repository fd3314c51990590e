"""A convolution or linear layer and the element-wise ops after it (bias, residual add, ReLU) as one CPU kernel.

    conv2d(x, W, b, ...)                         W * x + b                  (+ residual) (then ReLU)
    linear(x, W, b)                              x W^T + b                  (+ residual) or (then ReLU)

On the CPU, in float32 and without autograd, these run as one oneDNN primitive with post-ops
(``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``, the fused kernels TorchInductor emits on
CPU): the output is written once instead of once per element-wise op, and the linear layer skips the bias
broadcast that ``addmm`` writes first. Everywhere else (autograd, CUDA, other dtypes, a torch without oneDNN) the
same function is composed from PyTorch ops, the ReLU and the residual applied in place where that is
autograd-safe. Both give the same values to float32 rounding (tests/test_fused_layers.py). Not in the reference.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
           and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def tracing(*tensors: Tensor | None) -> bool:
    """Whether a tracer records this call (``torch.export`` / ONNX export, ``torch.compile``, ``torch.jit.trace``):
    it sees fake tensors, so kernels without a registered meta function and caches keyed on storage must step
    aside for plain ops. Non-strict ``torch.export`` (the ONNX exporter's first try) sets none of the flags, so a
    fake or meta tensor among ``tensors`` counts too."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    return any(t is not None and (isinstance(t, FakeTensor) or t.is_meta) for t in tensors)


def onednn_applies(*tensors: Tensor | None) -> bool:
    """Whether the fused oneDNN kernels serve these tensors: oneDNN present, every tensor a float32 CPU tensor,
    no gradient to compute (the fused kernels have no backward), and no tracer at work (``torch.export`` / ONNX
    export and the other tracers of :func:`tracing` record the plain ops, which they know how to lower)."""
    present = [t for t in tensors if t is not None]
    if not _ONEDNN or tracing(*present) or any(t.device.type != 'cpu' or t.dtype != torch.float32 for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
           residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """``relu?(conv2d(x, weight, bias) + residual?)``; ``residual`` has the output's shape."""
    if onednn_applies(x, weight, bias, residual):
        args = (weight, bias, list(padding), list(stride), list(dilation), groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, 'relu' if relu else 'none', [], '')
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, 'add', None,
                                                              'relu' if relu else None, [], '')
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual)
    return F.relu_(out) if relu else out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None,
           relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` followed by ``+ residual`` (same shape as the output) or by ReLU."""
    if residual is not None and relu:
        raise ValueError('fused linear: residual and relu together are not offered (no caller needs them)')
    if onednn_applies(x, weight, bias, residual):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'relu' if relu else 'none', [], '')
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, 'add')
    if residual is not None and bias is not None:
        # The residual is the initial value of the product: addmm(residual + b, x, W^T), no extra output pass.
        flat = torch.addmm((residual + bias).reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]), weight.t())
        return flat.view(residual.shape)
    out = F.linear(x, weight, bias)
    if residual is not None:
        out = out + residual
    return F.relu_(out) if relu else out
