"""Tests for models/fusion.py: CAFF against an independent re-derivation, small maps, PE cache, ablations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.fusion import (CrossSpectrumAttention, _combined_position_encoding, build_fusion_layers,
                           caff_position_encoding, fuse_level)


def reference_pe(channels, height, width):
    """The reference's PE written out element by element style (float32, CPU), independently of the module."""
    pe = torch.zeros(channels, height, width)
    div = torch.exp(torch.arange(0.0, channels, 2) * -(math.log(10000.0) / channels))
    ys = torch.arange(0.0, height)[:, None].expand(height, width)
    xs = torch.arange(0.0, width)[None, :].expand(height, width)
    pe[0::2] = torch.sin(ys * div[:, None, None])
    pe[1::2] = torch.cos(xs * div[:, None, None])
    return pe


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
            q = F.conv2d(x1, q_conv.weight, q_conv.bias)
            k = F.conv2d(x2, k_conv.weight, k_conv.bias)
            v = F.conv2d(x2, v_conv.weight, v_conv.bias)
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
        assert torch.equal(module._attend(convs, 7, x1, x2, None), expected)


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


@pytest.mark.parametrize('fusion_type,redim_in,has_attention', [('caff', 2 * 32 + 8, True), ('concat', 64, False)])
def test_build_and_fuse_two_stream_types(fusion_type, redim_in, has_attention):
    conv_corr, redim_corr = build_fusion_layers(fusion_type, num_levels=2, channels=32, proj_dim=8)
    assert (conv_corr is not None) == has_attention
    assert len(redim_corr) == 2 and redim_corr[1][0].in_channels == redim_in
    q, kv = torch.randn(2, 1, 32, 7, 8)
    out = fuse_level(fusion_type, q, kv, conv_corr[0] if conv_corr else None, redim_corr[0])
    assert out.shape == (1, 32, 7, 8)
    group = out[0, :2]  # GroupNorm(32 groups): each group of one channel is normalised
    assert torch.allclose(group.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)


def test_caff_fusion_concatenates_query_key_value_attention_in_order():
    torch.manual_seed(0)
    conv_corr, redim_corr = build_fusion_layers('caff', num_levels=1, channels=32, proj_dim=8)
    q, kv = torch.randn(2, 1, 32, 7, 7)
    with torch.no_grad():
        expected = redim_corr[0](torch.cat((q, kv, conv_corr[0](q, kv)), 1))
        assert torch.equal(fuse_level('caff', q, kv, conv_corr[0], redim_corr[0]), expected)


def test_add_and_single_stream_types_have_no_layers():
    for fusion_type in ('add', 'rgb_only', 'ir_only'):
        assert build_fusion_layers(fusion_type, num_levels=3, channels=32) == (None, None)
    q, kv = torch.randn(2, 1, 32, 3, 3)
    assert torch.equal(fuse_level('add', q, kv), q + kv)
    with pytest.raises(ValueError, match='single-stream'):
        fuse_level('rgb_only', q, kv)


def test_unknown_fusion_type_names_the_choices():
    with pytest.raises(ValueError, match="fusion_type='sum'.*caff"):
        build_fusion_layers('sum', num_levels=1, channels=32)
