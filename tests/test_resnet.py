"""ResNet backbone: reference state-dict layout, output levels, masks, build-time freezing, FrozenBatchNorm2d."""
import pytest
import torch
from torch import nn

from models.backbones import build_backbone
from models.backbones.resnet import FrozenBatchNorm2d, ResNetBackbone
from util.misc import NestedTensor


def _images(sizes, height, width):
    tensors = torch.randn(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return NestedTensor(tensors, mask)


def test_r50_joiner_matches_reference_state_dict(reference_manifest):
    expected = reference_manifest('dino_4scale_r50.json', 'backbone.')
    with torch.device('meta'):
        joiner = build_backbone('resnet50', [1, 2, 3])
    got = {k: list(v.shape) for k, v in joiner.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    # DINO-R50 logs 222,400 fewer trainable than total parameters: the frozen conv1 + layer1.
    frozen = sum(p.numel() for p in joiner.parameters() if not p.requires_grad)
    assert frozen == 222_400
    assert sum(p.numel() for p in joiner.parameters()) == 23_454_912


def test_stem_and_layer1_frozen_layer2_to_4_trainable():
    backbone = ResNetBackbone('resnet18', [0, 1, 2, 3])
    for name, param in backbone.named_parameters():
        trainable = name.startswith(('body.layer2', 'body.layer3', 'body.layer4'))
        assert param.requires_grad == trainable, name


@pytest.mark.parametrize('name, indices, channels, strides', [
    ('resnet50', [1, 2, 3], [512, 1024, 2048], [8, 16, 32]),
    ('resnet101', [0, 1, 2, 3], [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ('resnet34', [3], [512], [32]),
])
def test_channels_and_strides(name, indices, channels, strides):
    with torch.device('meta'):
        joiner = build_backbone(name, indices)
    assert joiner.num_channels == channels
    assert joiner.strides == strides


def test_dilation_keeps_last_stage_at_stride_16():
    with torch.device('meta'):
        joiner = build_backbone('resnet50', [1, 2, 3], dilation=True)
    assert joiner.strides == [8, 16, 16]


def test_odd_input_size_outputs_and_masks():
    torch.manual_seed(0)
    joiner = build_backbone('resnet18', [0, 1, 2, 3], hidden_dim=32).eval()
    samples = _images([(97, 131), (60, 90)], 97, 131)
    with torch.no_grad():
        features, pos = joiner(samples)
    assert len(features) == len(pos) == 4
    for feature, p, channels, stride in zip(features, pos, joiner.num_channels, joiner.strides):
        h, w = -(-97 // stride), -(-131 // stride)
        assert feature.tensors.shape == (2, channels, h, w)
        assert p.shape == (2, 32, h, w)
        assert feature.mask.dtype == torch.bool and feature.mask.shape == (2, h, w)
        # Nearest resize: output pixel (i, j) takes input pixel (floor(i*97/h), floor(j*131/w)).
        rows = (torch.arange(h) * 97 / h).floor().long()
        cols = (torch.arange(w) * 131 / w).floor().long()
        assert torch.equal(feature.mask, samples.mask[:, rows][:, :, cols])
    assert not features[0].mask[0].any()
    assert features[0].mask[1, -1, -1] and not features[0].mask[1, 0, 0]


def test_frozen_batchnorm_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 3)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # drops num_batches_tracked
    assert not list(frozen.parameters())
    x = torch.randn(2, 6, 5, 3)
    torch.testing.assert_close(frozen(x), bn(x))


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match='resnet51'):
        build_backbone('resnet51', [1, 2, 3])
    with pytest.raises(ValueError, match='return_interm_indices'):
        ResNetBackbone('resnet18', [3, 1])
    with pytest.raises(ValueError, match='dilation'):
        ResNetBackbone('resnet18', [1, 2, 3], dilation=True)
    with pytest.raises(ValueError, match='use_checkpoint'):
        build_backbone('resnet18', [1, 2, 3], use_checkpoint=True)
