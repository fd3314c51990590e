"""models/fused_layers.py: the fused conv / linear kernels equal the plain composition, on both paths."""
import pytest
import torch
import torch.nn.functional as F

from models import fused_layers


def _conv_case(channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    weight = torch.randn(8, 6, 3, 3, generator=gen)
    bias = torch.randn(8, generator=gen)
    residual = torch.randn(2, 8, 5, 6, generator=gen)
    if channels_last:
        x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    return x, weight, bias, residual


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('with_residual, relu', [(False, False), (False, True), (True, True), (True, False)])
def test_conv2d_equals_conv_add_relu(channels_last, with_residual, relu):
    x, weight, bias, residual = _conv_case(channels_last)
    residual = residual if with_residual else None
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1)
    if residual is not None:
        expected = expected + residual.double()
    if relu:
        expected = expected.clamp(min=0)
    with torch.inference_mode():
        fast = fused_layers.conv2d(x, weight, bias, (2, 2), (1, 1), residual=residual, relu=relu)
    plain = fused_layers.conv2d(x.double(), weight.double(), bias.double(), (2, 2), (1, 1),
                                residual=None if residual is None else residual.double(), relu=relu)
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('mode', ['none', 'relu', 'residual'])
def test_linear_equals_linear_then_op(mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 5, generator=gen)
    weight, bias = torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    residual = torch.randn(2, 7, 4, generator=gen) if mode == 'residual' else None
    expected = F.linear(x.double(), weight.double(), bias.double())
    expected = expected.clamp(min=0) if mode == 'relu' else expected
    expected = expected + residual.double() if residual is not None else expected
    with torch.no_grad():
        fast = fused_layers.linear(x, weight, bias, residual=residual, relu=mode == 'relu')
    weight.requires_grad_(True)
    plain = fused_layers.linear(x, weight, bias, residual=residual, relu=mode == 'relu')  # autograd: plain ops
    assert plain.requires_grad
    for got in (fast, plain):
        assert got.shape == (2, 7, 4)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    plain.sum().backward()
    assert weight.grad is not None


def test_under_cpu_autocast_the_plain_layers_serve():
    """Autocast inference (``engine.evaluate`` with amp) runs the layers in bfloat16, as nn.Linear / nn.Conv2d do."""
    gen = torch.Generator().manual_seed(4)
    x, weight, bias = torch.randn(4, 8, generator=gen), torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fused_layers.onednn_applies(x, weight, bias)
        assert fused_layers.linear(x, weight, bias).dtype == F.linear(x, weight, bias).dtype == torch.bfloat16
    with torch.no_grad():
        assert fused_layers.onednn_applies(x, weight, bias) == fused_layers._ONEDNN


def test_a_residual_keeps_its_precision_under_autocast():
    """Under autocast the product runs in bfloat16 but the residual sum stays in float32, as ``out + residual``."""
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(5, 8, generator=gen), torch.randn(8, 8, generator=gen), torch.randn(8, generator=gen)
    residual = torch.randn(5, 8, generator=gen) + 1000.0  # bfloat16 would round it to a multiple of 4 or 8
    weight.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = fused_layers.linear(x, weight, bias, residual=residual)
        want = F.linear(x, weight, bias) + residual
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    on_meta = fused_layers.linear(x.to('meta'), weight.to('meta'), bias.to('meta'), residual=residual.to('meta'))
    assert on_meta.shape == (5, 8)  # a device autocast does not know (meta: FLOP counting) is no autocast


@pytest.mark.parametrize('rows', [7, 40])
def test_feed_forward_in_row_blocks_equals_the_two_linear_layers(monkeypatch, rows):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, rows, 6, generator=gen)
    w1, b1 = torch.randn(12, 6, generator=gen), torch.randn(12, generator=gen)
    w2, b2 = torch.randn(6, 12, generator=gen), torch.randn(6, generator=gen)
    expected = x.double() + F.linear(F.linear(x.double(), w1.double(), b1.double()).clamp(min=0), w2.double(),
                                     b2.double())
    monkeypatch.setattr(fused_layers, 'FEED_FORWARD_BLOCK_BYTES', 4 * 12 * 9)  # blocks of 9 rows
    seen = []
    linear = fused_layers.linear
    monkeypatch.setattr(fused_layers, 'linear', lambda x, *a, **k: seen.append(x.shape[0]) or linear(x, *a, **k))
    with torch.inference_mode():
        fast = fused_layers.feed_forward(x, w1, b1, w2, b2)
    blocks = seen[::2]
    assert fast.shape == x.shape and fast.is_contiguous()
    if rows * 2 > 9 and fused_layers._ONEDNN:
        assert max(blocks) == 9 and sum(blocks) == 2 * rows  # in blocks over the flattened rows
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-5)
    w1.requires_grad_(True)
    plain = fused_layers.feed_forward(x, w1, b1, w2, b2)  # autograd: one call per linear layer
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)
    plain.sum().backward()
    assert w1.grad is not None


@pytest.mark.skipif(not fused_layers._ONEDNN, reason='torch without oneDNN')
def test_a_packed_conv_weight_gives_the_plain_convolution_on_every_path():
    x, weight, bias, residual = _conv_case(channels_last=True)
    with torch.inference_mode():
        packed = fused_layers.packed_conv_weight(weight, x, (2, 2), (1, 1))
        assert packed.is_mkldnn
        want = fused_layers.conv2d(x, weight, bias, (2, 2), (1, 1), residual=residual, relu=True)
        got = fused_layers.conv2d(x, packed, bias, (2, 2), (1, 1), residual=residual, relu=True)
        other_size = x[:, :, :7, :8]  # a layout chosen for one input size serves another
        want_other = fused_layers.conv2d(other_size, weight, bias, (2, 2), (1, 1))
        got_other = fused_layers.conv2d(other_size, packed, bias, (2, 2), (1, 1))
    x_grad = x.clone().requires_grad_(True)  # a gradient to compute: not a oneDNN case, the plain op serves
    unpacked = fused_layers.conv2d(x_grad, packed, bias, (2, 2), (1, 1))
    unpacked.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_other, want_other, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpacked.detach(), F.conv2d(x, weight, bias, stride=2, padding=1), rtol=1e-5,
                               atol=1e-5)
    assert x_grad.grad is not None
    weight.requires_grad_(True)
    assert fused_layers.packed_conv_weight(weight, x) is weight  # autograd: nothing to pack


def test_the_fused_kernels_only_serve_float32_cpu_tensors_without_autograd():
    x = torch.randn(2, 3)
    assert fused_layers.onednn_applies(x) == fused_layers._ONEDNN
    assert not fused_layers.onednn_applies(x.double())
    weight = torch.randn(3, 3, requires_grad=True)
    assert not fused_layers.onednn_applies(x, weight)
    with torch.no_grad():
        assert fused_layers.onednn_applies(x, weight) == fused_layers._ONEDNN
    with pytest.raises(ValueError, match='residual and relu'):
        fused_layers.linear(x, weight, None, residual=x, relu=True)


def test_fake_tensors_count_as_tracing_and_get_the_plain_ops():
    """Non-strict ``torch.export`` (the ONNX exporter's first try) runs the model on fake tensors without setting
    the compile/export flags: the fused kernels (no fake implementation) must step aside for it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, weight, bias = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    assert not fused_layers.tracing(x, None) and not fused_layers.tracing()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fake = mode.from_tensor(x)
        assert fused_layers.tracing(fake) and not fused_layers.onednn_applies(fake, weight, bias)
        assert fused_layers.linear(fake, weight, bias, relu=True).shape == (4, 6)
    assert fused_layers.tracing(torch.empty(2, device='meta'))
