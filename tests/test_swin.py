"""Swin Transformer backbone: reference state-dict layout, variants, any input size, masks, window attention math,
shifted-window mask, and gradient checkpointing that really recomputes."""
import pytest
import torch

from models.backbones import build_backbone
from models.backbones.swin import (SWIN_NAMES, SwinBlock, SwinTransformer, WindowAttention, build_swin_transformer,
                                   relative_position_index, shifted_window_mask, window_merge, window_partition)
from util.misc import NestedTensor

TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)


def _images(sizes, height, width):
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return NestedTensor(torch.randn(len(sizes), 3, height, width), mask)


@pytest.mark.parametrize('manifest, prefix', [
    ('dino_5scale_swinL.json', 'backbone.'),
    ('caff_dino_5scale_swinL_llvip.json', 'backbone_visible.'),
    ('caff_dino_5scale_swinL_llvip.json', 'backbone_ir.'),
])
def test_swin_l_joiner_matches_reference_state_dict(reference_manifest, manifest, prefix):
    expected = reference_manifest(manifest, prefix)
    with torch.device('meta'):
        joiner = build_backbone('swin_L_384_22k', [0, 1, 2, 3], use_checkpoint=True)
    got = {k: list(v.shape) for k, v in joiner.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    assert sum(p.numel() for p in joiner.parameters()) == 195_201_204
    assert all(p.requires_grad for p in joiner.parameters())


@pytest.mark.parametrize('name, channels, table_rows', [
    ('swin_T_224_1k', [96, 192, 384, 768], 13 ** 2),
    ('swin_B_224_22k', [128, 256, 512, 1024], 13 ** 2),
    ('swin_B_384_22k', [128, 256, 512, 1024], 23 ** 2),
    ('swin_L_224_22k', [192, 384, 768, 1536], 13 ** 2),
    ('swin_L_384_22k', [192, 384, 768, 1536], 23 ** 2),
])
def test_variants(name, channels, table_rows):
    with torch.device('meta'):
        four = build_swin_transformer(name, [0, 1, 2, 3])
        three = build_swin_transformer(name, [1, 2, 3])
        dilated = build_swin_transformer(name, [1, 2, 3], dilation=True)
    assert four.num_channels == channels and four.strides == [4, 8, 16, 32]
    assert three.num_channels == channels[1:] and three.strides == [8, 16, 32]
    assert not hasattr(three, 'norm0') and hasattr(three, 'norm3')
    assert dilated.num_channels == [channels[1], channels[2], channels[2]] and dilated.strides == [8, 16, 16]
    assert dilated.layers[2].downsample is None
    assert four.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == table_rows
    # Stochastic depth rises linearly from 0 (first block) to 0.2 (last block), as the reference.
    assert isinstance(four.layers[0].blocks[0].drop_path, torch.nn.Identity)
    assert four.layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_window_partition_round_trip_and_relative_index():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 6, 16, 3)
    torch.testing.assert_close(windows[1].view(4, 4, 3), x[0, :4, 4:8])
    torch.testing.assert_close(window_merge(windows, 4, 8, 12), x)
    index = relative_position_index(3)
    # Token 0 is (0, 0), token 8 is (2, 2): offsets (-2, -2) -> 0, (+2, +2) -> (4 * 5 + 4) = 24, self -> 12.
    assert index[0, 8] == 0 and index[8, 0] == 24 and torch.all(index.diagonal() == 12)


def test_shifted_window_mask_separates_wrapped_regions():
    mask = shifted_window_mask(8, 8, window_size=4, shift=2, device=torch.device('cpu'))
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    last = mask[3].view(4, 4, 4, 4)  # (query row, col, key row, col); regions split at row/col 2
    assert last[0, 0, 1, 1] == 0 and last[0, 0, 0, 2] == -100 and last[0, 0, 2, 0] == -100
    assert last[3, 3, 2, 2] == 0 and last[3, 3, 1, 3] == -100
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_window_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, window_size=2, num_heads=2)
    x = torch.randn(6, 4, 8)  # 3 images x 2 windows, 4 tokens each
    mask = torch.zeros(2, 4, 4)
    mask[1, :2, 2:] = -100
    q, k, v = attn.qkv(x).view(6, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(4, 4, 2).permute(2, 0, 1)
    logits = q @ k.transpose(-2, -1) / 2.0 + bias + mask.repeat(3, 1, 1)[:, None]
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(6, 4, 8))
    torch.testing.assert_close(attn(x, mask), expected)
    logits_plain = q @ k.transpose(-2, -1) / 2.0 + bias
    expected_plain = attn.proj((logits_plain.softmax(-1) @ v).transpose(1, 2).reshape(6, 4, 8))
    torch.testing.assert_close(attn(x), expected_plain)


def _count_block_calls(monkeypatch):
    """Counts SwinBlock.forward executions (module hooks do not fire when checkpoint recomputes a block)."""
    calls = []
    forward = SwinBlock.forward

    def counting_forward(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(SwinBlock, 'forward', counting_forward)
    return calls


def test_use_checkpoint_recomputes_blocks_in_backward_with_same_gradients(monkeypatch):
    calls = _count_block_calls(monkeypatch)
    grads = {}
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = SwinTransformer(**TINY, out_indices=[1, 2, 3], drop_path_rate=0.0, use_checkpoint=use_checkpoint)
        calls.clear()
        torch.manual_seed(1)
        samples = _images([(37, 45)], 37, 45)
        loss = sum(f.tensors.square().mean() for f in model(samples))
        forward_calls = len(calls)
        loss.backward()
        assert forward_calls == 8
        assert len(calls) == (16 if use_checkpoint else 8)  # each checkpointed block runs again in backward
        grads[use_checkpoint] = [p.grad.clone() for p in model.parameters()]
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(plain, recomputed)


def test_use_checkpoint_is_skipped_in_eval_and_without_grad(monkeypatch):
    calls = _count_block_calls(monkeypatch)
    model = SwinTransformer(**TINY, out_indices=[3], use_checkpoint=True)
    with torch.no_grad():
        model(_images([(16, 16)], 16, 16))
    model.eval()
    model(_images([(16, 16)], 16, 16))[0].tensors.sum().backward()
    assert len(calls) == 16


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match='swin_S'):
        build_backbone('swin_S_224_1k', [1, 2, 3])
    with pytest.raises(ValueError, match='return_interm_indices'):
        build_swin_transformer('swin_T_224_1k', [0, 4])
    assert set(SWIN_NAMES) == {'swin_T_224_1k', 'swin_B_224_22k', 'swin_B_384_22k', 'swin_L_224_22k',
                               'swin_L_384_22k'}
