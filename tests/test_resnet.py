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


def _randomise_norms(module):
    for norm in module.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('name, indices', [('resnet18', [0, 1, 2, 3]), ('resnet50', [1, 2, 3])])
@pytest.mark.slow
def test_inference_folds_the_norms_into_the_convs_and_matches_the_autograd_path(name, indices):
    torch.manual_seed(0)
    backbone = ResNetBackbone(name, indices)
    _randomise_norms(backbone)
    samples = _images([(61, 75), (40, 75)], 61, 75)
    reference = backbone(samples)  # layer2-4 trainable: the unfolded body, with autograd
    assert reference[-1].tensors.requires_grad
    with torch.inference_mode():
        folded = backbone(samples)
    assert len(backbone._folded) == sum(isinstance(m, nn.Conv2d) for m in backbone.modules())
    for got, want in zip(folded, reference):
        assert got.tensors.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.tensors, want.tensors.detach(), rtol=1e-4, atol=1e-5 * want.tensors.abs().max().item())


def test_folded_weights_follow_a_weight_update():
    torch.manual_seed(0)
    backbone = ResNetBackbone('resnet18', [3]).eval()
    samples = _images([(40, 40)], 40, 40)
    with torch.no_grad():
        before = backbone(samples)[0].tensors
        backbone.body.layer4[1].bn2.weight.mul_(3.0)
        after = backbone(samples)[0].tensors
        expected = list(backbone.body(samples.tensors).values())[0]  # unfolded body, as the reference runs it
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_frozen_backbone_takes_the_folded_path_in_training():
    """With every parameter frozen (the reference's CAFF training) no gradient reaches the backbone, so the
    folded convs serve training too."""
    backbone = ResNetBackbone('resnet18', [2, 3])
    backbone.requires_grad_(False)
    out = backbone(_images([(32, 32)], 32, 32))
    assert not out[0].tensors.requires_grad and len(backbone._folded) > 0
