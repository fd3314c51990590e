"""Backbone builder: a ResNet or Swin Transformer joined with its sine position encoding.

`build_backbone` replaces DINO's `build_backbone(args)` (`models/dino/backbone.py`) with explicit arguments; the
top model calls it once per modality. The whole-backbone freezing that the reference does in its training loop
(`freeze_backbones`) is `freeze_module`; the build-time freezing of the ResNet stem + layer1 lives in
`ResNetBackbone`. The reference's `backbone_freeze_keywords` (always None) and ConvNeXt are not offered.
"""
from torch import nn

from models.backbones.joiner import Joiner
from models.backbones.resnet import RESNET_NAMES, FrozenBatchNorm2d, ResNetBackbone
from models.backbones.swin import SWIN_NAMES, build_swin_transformer
from models.position_encoding import PositionEmbeddingSineHW

BACKBONE_NAMES = RESNET_NAMES + SWIN_NAMES

__all__ = ['BACKBONE_NAMES', 'FrozenBatchNorm2d', 'Joiner', 'build_backbone', 'freeze_module']


def build_backbone(name: str, return_interm_indices: list[int], dilation: bool = False, use_checkpoint: bool = False,
                   hidden_dim: int = 256, pe_temperatureH: float = 20, pe_temperatureW: float = 20) -> Joiner:
    """Joiner(backbone `name` returning stages `return_interm_indices`, PositionEmbeddingSineHW(hidden_dim // 2)).

    name: one of BACKBONE_NAMES. return_interm_indices: increasing stage indices in 0..3 ([1, 2, 3] for the
    4-scale model, [0, 1, 2, 3] for the 5-scale one). dilation: the last stage keeps stride 16.
    use_checkpoint: gradient checkpointing of the Swin blocks (rejected for ResNet, where it would do nothing).
    """
    if hidden_dim % 2:
        raise ValueError(f'hidden_dim={hidden_dim}: the position encoding needs an even hidden_dim')
    if name in RESNET_NAMES:
        if use_checkpoint:
            raise ValueError(f'use_checkpoint=True is implemented for Swin backbones only; backbone {name!r} would '
                             f'not checkpoint anything. Set use_checkpoint=False or pick a swin_* backbone')
        backbone = ResNetBackbone(name, return_interm_indices, dilation=dilation)
    elif name in SWIN_NAMES:
        backbone = build_swin_transformer(name, return_interm_indices, dilation=dilation,
                                          use_checkpoint=use_checkpoint)
    else:
        raise ValueError(f'backbone {name!r} is unknown; known backbones: {", ".join(BACKBONE_NAMES)}')
    position_embedding = PositionEmbeddingSineHW(hidden_dim // 2, pe_temperatureH=pe_temperatureH,
                                                 pe_temperatureW=pe_temperatureW, normalize=True)
    return Joiner(backbone, position_embedding)


def freeze_module(module: nn.Module) -> int:
    """Sets requires_grad=False on every parameter of `module`; returns how many elements were trainable before.

    As in the reference training, the module's train/eval mode is left alone (Swin's DropPath stays active in a
    frozen backbone in train mode; FrozenBatchNorm2d has no mode).
    """
    n_trainable = 0
    for param in module.parameters():
        if param.requires_grad:
            n_trainable += param.numel()
            param.requires_grad_(False)
    return n_trainable
