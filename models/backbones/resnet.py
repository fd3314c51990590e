"""ResNet backbone with frozen BatchNorm, returning the padding-masked maps of the requested stages.

Follows DETR/DINO `models/dino/backbone.py` (`FrozenBatchNorm2d`, `BackboneBase`, `Backbone`): torchvision's
ResNet with every BatchNorm replaced by `FrozenBatchNorm2d`, wrapped in `IntermediateLayerGetter` as `body`, so
state-dict keys are `body.conv1.weight`, `body.layer1.0.bn1.running_mean`, ... and official DINO weights load
unchanged. The stem and layer1 are frozen at build; layer2-4 stay trainable, as in the reference.

Differences from the reference:
- resnet18/resnet34 are accepted (the reference asserts them away); they serve the tiny CPU config.
- Any sorted subset of stage indices {0, 1, 2, 3} may be returned (index i is `layer{i+1}`). For the lists the
  reference allows ([0,1,2,3], [1,2,3], [3]) this is the same mapping as its `layer{5-len+idx}`.
- Weights are never downloaded at build (the reference downloads ImageNet weights on rank 0); pretrained
  detector weights come from a checkpoint instead.
"""
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from util.misc import NestedTensor

RESNET_NAMES = ('resnet18', 'resnet34', 'resnet50', 'resnet101')

_STAGE_CHANNELS = {
    'resnet18': (64, 128, 256, 512),
    'resnet34': (64, 128, 256, 512),
    'resnet50': (256, 512, 1024, 2048),
    'resnet101': (256, 512, 1024, 2048),
}
_STAGE_STRIDES = (4, 8, 16, 32)
_TRAINABLE_STAGES = ('layer2', 'layer3', 'layer4')


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in eval mode with fixed statistics and affine parameters, all stored as buffers.

        y = (x - running_mean) / sqrt(running_var + 1e-5) * weight + bias,   folded into  y = x * scale + shift

    The eps 1e-5 is DINO's (torchvision's FrozenBatchNorm2d uses the same value). Buffers are
    `weight, bias, running_mean, running_var` (C,); a `num_batches_tracked` entry in a loaded state dict
    (torchvision's BatchNorm checkpoints have one) is dropped.
    """

    eps = 1e-5

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer('weight', torch.ones(num_features))
        self.register_buffer('bias', torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + 'num_batches_tracked', None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, eps={self.eps}'


def interpolate_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool padding mask -> (B, h, w) bool, nearest-neighbour resized as in DETR/DINO."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class ResNetBackbone(nn.Module):
    """torchvision ResNet body returning one masked feature map per requested stage.

    forward(NestedTensor (B,3,H,W) + mask (B,H,W)) -> list of NestedTensor, one per index i in
    `return_interm_indices`, with tensors (B, num_channels[k], ceil(H/s), ceil(W/s)) (s = strides[k]) and the
    image mask nearest-resized to that size. `num_channels` and `strides` list the outputs in order.
    """

    def __init__(self, name: str, return_interm_indices: list[int], dilation: bool = False):
        super().__init__()
        if name not in RESNET_NAMES:
            raise ValueError(f'ResNetBackbone: unknown name {name!r}; known: {", ".join(RESNET_NAMES)}')
        indices = check_return_interm_indices(return_interm_indices)
        if dilation and name in ('resnet18', 'resnet34'):
            raise ValueError(f'ResNetBackbone: dilation=True needs a bottleneck ResNet (resnet50/101), '
                             f'torchvision does not dilate the BasicBlocks of {name}; set dilation=False')
        resnet = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                   norm_layer=FrozenBatchNorm2d)
        for param_name, param in resnet.named_parameters():
            if not param_name.startswith(_TRAINABLE_STAGES):
                param.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers={f'layer{i + 1}': str(i) for i in indices})
        strides = list(_STAGE_STRIDES)
        if dilation:
            strides[3] = 16
        self.num_channels = [_STAGE_CHANNELS[name][i] for i in indices]
        self.strides = [strides[i] for i in indices]

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        if tensor_list.mask is None:
            raise ValueError('ResNetBackbone: the input NestedTensor has no mask; the padding mask is required')
        outs = []
        for x in self.body(tensor_list.tensors).values():
            outs.append(NestedTensor(x, interpolate_mask(tensor_list.mask, x.shape[-2:])))
        return outs


def check_return_interm_indices(indices) -> list[int]:
    """A strictly increasing, non-empty list of stage indices in 0..3, or a ValueError naming the value."""
    indices = list(indices)
    if not indices or any(i not in (0, 1, 2, 3) for i in indices) or indices != sorted(set(indices)):
        raise ValueError(f'return_interm_indices={indices}: expected a strictly increasing, non-empty list of stage '
                         f'indices in 0..3, e.g. [1, 2, 3] (4-scale) or [0, 1, 2, 3] (5-scale)')
    return indices
