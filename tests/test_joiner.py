"""Joiner and build_backbone: features and position encodings per level for every backbone family, odd input
sizes, dtype, keys, freeze helper."""
import pytest
import torch
from torch import nn

from models.backbones import build_backbone, freeze_module
from models.backbones.joiner import Joiner
from models.position_encoding import PositionEmbeddingSineHW
from util.misc import NestedTensor


class _TwoLevelBackbone(nn.Module):
    """Average-pools the image by 2 and 4 so the expected outputs are easy to write down."""

    num_channels = [3, 3]
    strides = [2, 4]

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tensor_list):
        outs = []
        for s in self.strides:
            x = nn.functional.avg_pool2d(tensor_list.tensors, s) * self.scale
            mask = tensor_list.mask[:, ::s, ::s]
            outs.append(NestedTensor(x, mask))
        return outs


def test_joiner_pairs_each_level_with_its_position_encoding():
    pe = PositionEmbeddingSineHW(4)
    joiner = Joiner(_TwoLevelBackbone(), pe)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[1, :, 6:] = True
    features, pos = joiner(NestedTensor(torch.randn(2, 3, 8, 8), mask))
    assert joiner.num_channels == [3, 3] and joiner.strides == [2, 4]
    assert [f.tensors.shape[-1] for f in features] == [4, 2]
    for feature, p in zip(features, pos):
        torch.testing.assert_close(p, pe(feature))
    assert joiner[1] is pe
    assert list(joiner.state_dict()) == ['0.scale']


def test_pos_takes_the_feature_dtype():
    joiner = Joiner(_TwoLevelBackbone(), PositionEmbeddingSineHW(4)).double()
    features, pos = joiner(NestedTensor(torch.randn(1, 3, 8, 8, dtype=torch.float64),
                                        torch.zeros(1, 8, 8, dtype=torch.bool)))
    assert all(p.dtype == torch.float64 for p in pos)


def test_build_backbone_pe_settings_and_freeze_module():
    joiner = build_backbone('resnet18', [1, 2, 3], hidden_dim=64, pe_temperatureH=10, pe_temperatureW=30)
    assert isinstance(joiner, Joiner)
    assert joiner[1].num_pos_feats == 32
    assert (joiner[1].pe_temperatureH, joiner[1].pe_temperatureW) == (10, 30)
    trainable = sum(p.numel() for p in joiner.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in joiner.parameters())
    assert freeze_module(joiner) == trainable
    assert not any(p.requires_grad for p in joiner.parameters())
    assert freeze_module(joiner) == 0


def test_with_pos_false_skips_the_encodings():
    joiner = Joiner(_TwoLevelBackbone(), PositionEmbeddingSineHW(4))
    samples = NestedTensor(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    features, pos = joiner(samples, with_pos=False)
    assert pos is None
    for got, want in zip(features, joiner(samples)[0]):
        assert torch.equal(got.tensors, want.tensors)


@pytest.mark.parametrize('name', ['resnet18', 'swin_T_224_1k'])
@pytest.mark.slow
def test_odd_input_size_outputs_and_masks(name):
    """Any backbone family, an odd padded size and a smaller second image: ceil-sized maps, their encodings, and
    the padding mask nearest-resized to every level."""
    torch.manual_seed(0)
    joiner = build_backbone(name, [0, 1, 2, 3], hidden_dim=32).eval()
    mask = torch.ones(2, 97, 131, dtype=torch.bool)
    mask[0] = False
    mask[1, :60, :90] = False
    samples = NestedTensor(torch.randn(2, 3, 97, 131), mask)
    with torch.no_grad():
        features, pos = joiner(samples)
    assert len(features) == len(pos) == 4
    for feature, p, channels, stride in zip(features, pos, joiner.num_channels, joiner.strides):
        h, w = -(-97 // stride), -(-131 // stride)
        assert feature.tensors.shape == (2, channels, h, w)
        assert torch.isfinite(feature.tensors).all()
        assert p.shape == (2, 32, h, w)
        assert feature.mask.dtype == torch.bool and feature.mask.shape == (2, h, w)
        # Nearest resize: output pixel (i, j) takes input pixel (floor(i*97/h), floor(j*131/w)).
        rows = (torch.arange(h) * 97 / h).floor().long()
        cols = (torch.arange(w) * 131 / w).floor().long()
        assert torch.equal(feature.mask, samples.mask[:, rows][:, :, cols])
    assert not features[0].mask[0].any()
    assert features[0].mask[1, -1, -1] and not features[0].mask[1, 0, 0]
