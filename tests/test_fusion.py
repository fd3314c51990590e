"""Tests for models/fusion.py: CAFF against an independent re-derivation, small maps, PE cache, ablations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import fused_layers
from models.fusion import (FUSION_TYPES, CrossSpectrumAttention, _combined_position_encoding, build_fusion,
                           caff_position_encoding)


def reference_pe(channels, height, width):
    """The reference's PE written out element by element style (float32, CPU), independently of the module."""
    pe = torch.zeros(channels, height, width)
    div = torch.exp(torch.arange(0.0, channels, 2) * -(math.log(10000.0) / channels))
    ys = torch.arange(0.0, height)[:, None].expand(height, width)
    xs = torch.arange(0.0, width)[None, :].expand(height, width)
    pe[0::2] = torch.sin(ys * div[:, None, None])
    pe[1::2] = torch.cos(xs * div[:, None, None])
    return pe


def apply_conv(conv, x):
    """A CAFF branch conv from its raw weights: plain, or (caff_dw) depthwise with groups = C, then pointwise."""
    if isinstance(conv, torch.nn.Conv2d):
        return F.conv2d(x, conv.weight, conv.bias)
    depthwise, pointwise = conv
    x = F.conv2d(x, depthwise.weight, depthwise.bias, groups=x.shape[1])
    return F.conv2d(x, pointwise.weight, pointwise.bias)


def reference_caff(module, x1, x2):
    """Straightforward re-derivation of the reference forward (docs/REFERENCE.md §1) from the module's raw weights."""
    channels, height, width = x1.shape[1:]
    pos = reference_pe(channels, height, width) + reference_pe(channels, height, width)
    names = ['attention_stages_k1', 'attention_stages_k3', 'attention_stages_k7']
    fused = None
    for stage in range(module.num_stages):
        outs = []
        for name in names:
            q_conv, k_conv, v_conv = getattr(module, name)[stage]
            q, k, v = apply_conv(q_conv, x1), apply_conv(k_conv, x2), apply_conv(v_conv, x2)
            if name == 'attention_stages_k1':
                q, k = q + pos, k + pos
            out = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)
            if name != 'attention_stages_k1':
                out = F.interpolate(out, size=(height, width), mode='bilinear', align_corners=False)
            outs.append(out)
        compress = module.compression_convs[stage][0]
        fused = F.conv2d(torch.cat(outs, 1), compress.weight, compress.bias)
        x1 = x2 = fused
    return F.conv2d(fused, module.proj.weight, module.proj.bias)


def test_state_dict_matches_reference_level(reference_manifest):
    expected = reference_manifest('caff_dino_4scale_r50_llvip.json', 'conv_corr.0.')
    with torch.device('meta'):
        module = CrossSpectrumAttention()
    got = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    assert sum(p.numel() for p in module.parameters()) == 29_905_984


@pytest.mark.parametrize('size', [(7, 7), (9, 12), (13, 8)])
def test_caff_equals_reference_bit_for_bit_where_reference_runs(size):
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=8, proj_dim=4).double()
    x1, x2 = torch.randn(2, 2, 8, *size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(module(x1, x2), reference_caff(module, x1, x2))


def test_caff_float32_matches_reference():
    torch.manual_seed(1)
    module = CrossSpectrumAttention(channels=16, proj_dim=8)
    x1, x2 = torch.randn(2, 1, 16, 8, 10)
    with torch.no_grad():
        torch.testing.assert_close(module(x1, x2), reference_caff(module, x1, x2), rtol=0, atol=0)


@pytest.mark.parametrize('size', [(1, 1), (3, 4), (6, 10), (10, 2)])
def test_small_maps_run_and_keep_shape(size):
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=8, proj_dim=4)
    x1, x2 = torch.randn(2, 2, 8, *size)
    out = module(x1, x2)
    assert out.shape == (2, 4, *size)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_small_map_branch_is_centred_zero_padding_then_resize():
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=4, proj_dim=4).double()
    x1, x2 = torch.randn(2, 1, 4, 4, 9, dtype=torch.float64)  # height 4 < kernels 5 and 7, width fits both
    convs = module.attention_stages_k7[0]
    padded1, padded2 = F.pad(x1, (0, 0, 1, 2)), F.pad(x2, (0, 0, 1, 2))  # 3 rows: 1 above, 2 below
    q, k, v = convs[0](padded1), convs[1](padded2), convs[2](padded2)
    assert q.shape[-2:] == (1, 3)
    expected = F.interpolate(torch.softmax(q @ k.transpose(-1, -2), -1) @ v, size=(4, 9), mode='bilinear',
                             align_corners=False)
    with torch.no_grad():
        assert torch.equal(module._branch('attention_stages_k7.0', 7, convs, x1, x2, None), expected)


def test_position_encoding_values_and_cache():
    pe = caff_position_encoding(8, 3, 5)
    assert pe.dtype == torch.float32 and pe.shape == (8, 3, 5)
    assert torch.equal(pe, reference_pe(8, 3, 5))
    assert pe[2, 2, 4].item() == pytest.approx(math.sin(2 * 10000 ** (-2 / 8)), abs=1e-6)
    assert pe[3, 1, 4].item() == pytest.approx(math.cos(4 * 10000 ** (-2 / 8)), abs=1e-6)
    assert torch.equal(pe[0::2, :, :1].expand(-1, -1, 5), pe[0::2])  # even channels depend on the row only
    cpu = torch.device('cpu')
    first = _combined_position_encoding(8, 3, 5, cpu, torch.float64)
    assert _combined_position_encoding(8, 3, 5, cpu, torch.float64) is first
    assert torch.equal(first, 2 * pe.double())
    assert _combined_position_encoding(8, 3, 5, cpu, torch.float32) is not first
    with torch.inference_mode():
        cached = _combined_position_encoding(8, 4, 5, cpu, torch.float32)
    assert not cached.is_inference()


def test_position_encoding_rejects_odd_channels():
    with pytest.raises(ValueError, match='even'):
        caff_position_encoding(7, 2, 2)


def test_invalid_kernel_sizes_are_rejected():
    with pytest.raises(ValueError, match='caff_kernel_sizes'):
        CrossSpectrumAttention(channels=8, kernel_sizes=(3, 5, 7))
    with pytest.raises(ValueError, match='caff_kernel_sizes'):
        CrossSpectrumAttention(channels=8, kernel_sizes=(1, 5))


def test_configurable_stages_kernels_and_projection():
    module = CrossSpectrumAttention(channels=8, num_stages=1, kernel_sizes=(1, 3, 5), proj_dim=6)
    assert module.attention_stages_k3[0][0].weight.shape == (8, 8, 3, 3)
    assert len(module.compression_convs) == 1
    assert module(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)).shape == (1, 6, 4, 4)


def test_query_and_key_value_sides_are_not_interchangeable():
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=8, proj_dim=4)
    x1, x2 = torch.randn(2, 1, 8, 7, 7)
    with torch.no_grad():
        assert not torch.allclose(module(x1, x2), module(x2, x1))


@pytest.mark.parametrize('fusion_type,redim_in,has_attention', [('caff', 2 * 32 + 8, True), ('caff_dw', 2 * 32 + 8, True),
                                                             ('concat', 64, False)])
def test_build_and_fuse_two_stream_types(fusion_type, redim_in, has_attention):
    fusion = build_fusion(fusion_type, proj_dim=8)
    conv_corr, redim_corr = fusion.layers(num_levels=2, channels=32)
    assert fusion.kept_modality is None
    assert (conv_corr is not None) == has_attention
    assert len(redim_corr) == 2 and redim_corr[1][0].in_channels == redim_in
    q, kv = torch.randn(2, 1, 32, 7, 8)
    out = fusion.fuse(q, kv, conv_corr[0] if conv_corr else None, redim_corr[0])
    assert out.shape == (1, 32, 7, 8)
    group = out[0, :2]  # GroupNorm(32 groups): each group of one channel is normalised
    assert torch.allclose(group.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)


def test_caff_fusion_concatenates_query_key_value_attention_in_order():
    torch.manual_seed(0)
    fusion = build_fusion('caff', proj_dim=8)
    conv_corr, redim_corr = fusion.layers(num_levels=1, channels=32)
    q, kv = torch.randn(2, 1, 32, 7, 7)
    with torch.no_grad():
        expected = redim_corr[0](torch.cat((q, kv, conv_corr[0](q, kv)), 1))
        assert torch.equal(fusion.fuse(q, kv, conv_corr[0], redim_corr[0]), expected)


def test_add_and_single_stream_types_have_no_layers():
    for fusion_type, kept in (('add', None), ('rgb_only', 'rgb'), ('ir_only', 'ir')):
        fusion = build_fusion(fusion_type)
        assert fusion.layers(num_levels=3, channels=32) == (None, None)
        assert fusion.kept_modality == kept
    q, kv = torch.randn(2, 1, 32, 3, 3)
    assert torch.equal(build_fusion('add').fuse(q, kv, None, None), q + kv)
    with pytest.raises(ValueError, match='single-stream'):
        build_fusion('rgb_only').fuse(q, kv, None, None)


def test_unknown_fusion_type_names_the_choices():
    with pytest.raises(ValueError, match="fusion_type='sum'.*caff"):
        build_fusion('sum')
    assert FUSION_TYPES == ('caff', 'caff_dw', 'concat', 'add', 'rgb_only', 'ir_only')


def _separate_projections(convs, x1, x2):
    return [convs[0](x1), convs[1](x2), convs[2](x2)]


@pytest.mark.parametrize('same_input', [False, True])
def test_projections_reading_one_map_run_as_one_conv_bit_for_bit(same_input):
    """Key + value (stage 1) or query + key + value (stage 2, x1 is x2) run as one conv: same numbers, with and
    without autograd, and the same gradients reach the separate reference weights."""
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=8, proj_dim=4)
    convs = module.attention_stages_k7[1]
    x1, x2 = torch.randn(2, 2, 8, 13, 14)  # a map large enough for plain weights (small maps pack theirs)
    x2 = x1 if same_input else x2
    expected = _separate_projections(convs, x1, x2)
    with torch.no_grad():
        for got, want in zip(module._projections('k7.1', convs, x1, x2), expected):
            assert torch.equal(got, want)
    got = module._projections('k7.1', convs, x1, x2)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    weights = [torch.randn_like(t) for t in expected]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), list(convs.parameters()))
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)), list(convs.parameters()))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fused_layers.onednn_applies(torch.zeros(1)), reason='needs the oneDNN CPU kernels')
@pytest.mark.parametrize('size, packed', [((8, 9), True), ((40, 44), False)])
def test_branch_weights_are_packed_on_small_maps_only_and_give_the_separate_convs(size, packed):
    """Without autograd the k x k weights are kept packed where they outweigh the output 4:1 (small maps); the
    outputs then equal the separate convs to float32 rounding, and stay NCHW for the row attention."""
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=16, proj_dim=4)
    convs = module.attention_stages_k7[0]
    x1, x2 = torch.randn(2, 1, 16, *size)
    with torch.inference_mode():
        got = module._projections('k7.0', convs, x1, x2)
        expected = _separate_projections(convs, x1, x2)
    assert {key[1] for key in module._fused._entries} == {packed}
    for a, b in zip(got, expected):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if not packed:
            assert torch.equal(a, b)


def test_fused_weights_are_kept_without_autograd_and_rebuilt_when_the_weights_change():
    torch.manual_seed(0)
    module = CrossSpectrumAttention(channels=8, proj_dim=4)
    x1, x2 = torch.randn(2, 1, 8, 7, 7)
    module(x1, x2).sum().backward()
    assert len(module._fused) == 0  # with autograd the concatenation is rebuilt in every call
    with torch.inference_mode():
        first = module(x1, x2)
    entries = len(module._fused)
    assert entries == 3 * (2 + 1)  # per branch: query and key+value of stage 1, query+key+value of stage 2
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    with torch.no_grad():
        second = module(x1, x2)
        torch.testing.assert_close(second, reference_caff(module, x1, x2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)
    assert len(module._fused) == entries


@pytest.mark.slow
def test_caff_dw_factors_the_large_branch_convs_and_keeps_the_interface():
    torch.manual_seed(0)
    fusion = build_fusion('caff_dw', proj_dim=4)
    conv_corr, redim_corr = fusion.layers(num_levels=1, channels=32)
    module = conv_corr[0]
    keys = list(module.state_dict())
    assert 'attention_stages_k1.0.0.weight' in keys  # the 1x1 branch is a plain conv
    depthwise, pointwise = module.attention_stages_k7[1][2]
    assert depthwise.weight.shape == (32, 1, 7, 7) and depthwise.groups == 32
    assert pointwise.weight.shape == (32, 32, 1, 1)
    caff_params = sum(p.numel() for p in CrossSpectrumAttention(channels=32, proj_dim=4).parameters())
    assert sum(p.numel() for p in module.parameters()) < caff_params / 3
    x1, x2 = torch.randn(2, 2, 32, 9, 10)
    out = fusion.fuse(x1, x2, module, redim_corr[0])
    assert out.shape == (2, 32, 9, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    x1, x2 = torch.randn(2, 1, 32, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module.double()(x1, x2), reference_caff(module, x1, x2), rtol=1e-12, atol=1e-12)
        assert module(x1[..., :3, :4], x2[..., :3, :4]).shape == (1, 4, 3, 4)  # a map smaller than the kernels


def test_caff_dw_costs_under_a_quarter_of_caff():
    """FLOPs of one R50-sized level (C = 256, P = 64, 64 x 80, the stride-8 level of a 512 x 640 image)."""
    from torch.utils.flop_counter import FlopCounterMode

    def level_flops(fusion_type):
        with torch.device('meta'):
            fusion = build_fusion(fusion_type)
            conv_corr, redim_corr = fusion.layers(num_levels=1, channels=256)
            q, kv = torch.randn(2, 1, 256, 64, 80)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fusion.fuse(q, kv, conv_corr[0], redim_corr[0])
        return counter.get_total_flops()

    caff, caff_dw = level_flops('caff'), level_flops('caff_dw')
    assert caff == pytest.approx(266.5e9, rel=0.01)  # docs/benchmarks/fusion_cost.md, level 0 of the R50 model
    assert caff_dw < 0.25 * caff
    assert caff_dw < 0.08 * caff
