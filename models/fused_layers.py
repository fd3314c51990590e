"""A convolution or linear layer and the element-wise ops after it (bias, residual add, ReLU) as one CPU kernel.

    conv2d(x, W, b, ...)                         W * x + b                  (+ residual) (then ReLU)
    linear(x, W, b)                              x W^T + b                  (+ residual) or (then ReLU)
    feed_forward(x, W1, b1, W2, b2)              x + relu(x W1^T + b1) W2^T + b2, in row blocks on the CPU

On the CPU, in float32, without autograd and without autocast, each conv2d / linear runs as one oneDNN primitive
with post-ops (``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``, the fused kernels
TorchInductor emits on CPU; feed_forward is two of them per row block): the output is written once instead of
once per element-wise op, and the linear layer skips the bias broadcast that ``addmm`` writes first. Everywhere
else (autograd, autocast, CUDA, other dtypes, a torch without oneDNN) the
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


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False for types autocast does not know, e.g. meta)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def onednn_applies(*tensors: Tensor | None) -> bool:
    """Whether the fused oneDNN kernels serve these tensors: oneDNN present, every tensor a float32 CPU tensor,
    no autocast on the CPU (it runs the plain layers in bfloat16), no gradient to compute (the fused kernels have
    no backward), and no tracer at work (``torch.export`` / ONNX export and the other tracers of :func:`tracing`
    record the plain ops, which they know how to lower)."""
    present = [t for t in tensors if t is not None]
    if not _ONEDNN or tracing(*present) or any(t.device.type != 'cpu' or t.dtype != torch.float32 for t in present):
        return False
    if autocasting(torch.device('cpu')):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def packed_conv_weight(weight: Tensor, x: Tensor, stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                       dilation: Sequence[int] = (1, 1), groups: int = 1) -> Tensor:
    """``weight`` reordered once into oneDNN's blocked layout for :func:`conv2d` of inputs like ``x``, where the
    fused kernels serve ``x`` (else ``weight`` itself).

    A plain weight is reordered inside every oneDNN convolution call; the folded ResNet-50 runs about 7 % faster
    with its weights packed once (same values, bit for bit). The result is an opaque mkldnn tensor, meant to be
    kept (``models.utils.DerivedTensors``); the layout is chosen for ``x``'s shape and serves any other shape
    too. :func:`conv2d` turns it back into a dense tensor where the fused kernels do not serve. A convolution
    with a packed weight writes a channels-last output, so it pays where the next layer reads that layout (the
    channels-last backbone) or where the weight is much larger than the output (CAFF's branch convs on small
    maps, whose outputs are copied back to NCHW).
    """
    if not onednn_applies(x, weight):
        return weight
    return torch.ops.mkldnn._reorder_convolution_weight(weight, list(padding), list(stride), list(dilation), groups,
                                                        list(x.shape))


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
           residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """``relu?(conv2d(x, weight, bias) + residual?)``; ``residual`` has the output's shape; ``weight`` may be
    plain or from :func:`packed_conv_weight`."""
    if weight.is_mkldnn and not onednn_applies(x, weight, bias, residual):
        weight = weight.to_dense()
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


# Row block of :func:`feed_forward`: its hidden activations (rows x hidden width, float32) stay near this size.
FEED_FORWARD_BLOCK_BYTES = 8 << 20


def feed_forward(x: Tensor, weight1: Tensor, bias1: Tensor | None, weight2: Tensor, bias2: Tensor | None) -> Tensor:
    """``x + linear(relu(linear(x, W1, b1)), W2, b2)`` for ``x (..., C)``, ``W1 (F, C)``, ``W2 (C, F)``.

    On the oneDNN path the rows run in blocks of about ``FEED_FORWARD_BLOCK_BYTES`` of hidden activations, and
    each block's output goes into one preallocated tensor. The whole hidden map of a large input (the encoder's
    6800 x 2048 at 512 x 640: 55 MB) would be a fresh allocation above glibc's mmap threshold on every call, so
    each layer paid its page faults and a round trip to memory; a block stays in cache and its buffer is reused.
    Each output row is the same two dot products either way. Elsewhere it is the two fused linear calls.
    """
    rows = x.numel() // x.shape[-1]
    block = max(1, FEED_FORWARD_BLOCK_BYTES // (4 * weight1.shape[0]))
    if rows <= block or not onednn_applies(x, weight1, bias1, weight2, bias2):
        return linear(linear(x, weight1, bias1, relu=True), weight2, bias2, residual=x)
    flat = x.reshape(rows, x.shape[-1])
    out = torch.empty((rows, weight2.shape[0]), dtype=x.dtype, device=x.device)
    for start in range(0, rows, block):
        part = flat[start:start + block]
        out[start:start + block] = linear(linear(part, weight1, bias1, relu=True), weight2, bias2, residual=part)
    return out.view(x.shape[:-1] + (weight2.shape[0],))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None,
           relu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` followed by ``+ residual`` (same shape as the output) or by ReLU."""
    if residual is not None and relu:
        raise ValueError('fused linear: residual and relu together are not offered (no caller needs them)')
    if onednn_applies(x, weight, bias, residual):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'relu' if relu else 'none', [], '')
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, 'add')
    if residual is not None and bias is not None and residual.dtype == x.dtype == weight.dtype and (
            not autocasting(x.device)):
        # The residual is the initial value of the product: addmm(residual + b, x, W^T), no extra output pass.
        # (Not under autocast or mixed dtypes: the sum stays in the residual's precision there, as out + residual.)
        flat = torch.addmm((residual + bias).reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]), weight.t())
        return flat.view(residual.shape)
    out = F.linear(x, weight, bias)
    if residual is not None:
        out = out + residual
    return F.relu_(out) if relu else out
