"""Joiner: features and position encodings per level, dtype, keys, freeze helper."""
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
    joiner = build_backbone('resnet18', [1, 2, 3], hidden_dim=64, pe_temperature_h=10, pe_temperature_w=30)
    assert isinstance(joiner, Joiner)
    assert joiner[1].num_pos_feats == 32
    assert (joiner[1].temperatureH, joiner[1].temperatureW) == (10, 30)
    trainable = sum(p.numel() for p in joiner.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in joiner.parameters())
    assert freeze_module(joiner) == trainable
    assert not any(p.requires_grad for p in joiner.parameters())
    assert freeze_module(joiner) == 0
