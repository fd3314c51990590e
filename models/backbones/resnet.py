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
- Inference shortcut: when no gradient can reach the backbone (``torch.no_grad``/``inference_mode``, or every
  parameter frozen and the images not requiring grad), every FrozenBatchNorm2d is folded into the convolution
  before it (``W' = W * scale``, ``b' = shift``, computed once and kept until the weights change), the body
  runs channels-last, which oneDNN's CPU convolutions prefer, and each conv takes its ReLU and residual add
  along (``models/fused_layers.py``). Same function; float32 results move by ~1e-6 relative. The maps it
  returns stay channels-last (same values, other strides). The folded copy holds one more set of the backbone's
  weights (94 MB for a ResNet-50).
"""
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck

from util.misc import NestedTensor

from .. import fused_layers
from ..utils import DerivedTensors

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

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(C,) ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def fold_frozen_batchnorm(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one convolution equal to ``norm(conv(x))``: ``W * scale`` (per output channel,
    channels-last) and ``conv.bias * scale + shift``."""
    scale, shift = norm.scale_shift()
    weight = (conv.weight * scale.reshape(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias

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
        self._folded = DerivedTensors()

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        if tensor_list.mask is None:
            raise ValueError('ResNetBackbone: the input NestedTensor has no mask; the padding mask is required')
        images = tensor_list.tensors
        needs_grad = torch.is_grad_enabled() and (images.requires_grad or any(
            p.requires_grad for p in self.parameters()))
        maps = list(self.body(images).values()) if needs_grad else self._forward_folded(images)
        return [NestedTensor(x, interpolate_mask(tensor_list.mask, x.shape[-2:])) for x in maps]

    def _conv_bn(self, name: str, conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor, residual: Tensor | None = None,
                 relu: bool = False) -> Tensor:
        """``relu?(norm(conv(x)) + residual?)`` as one convolution with the folded weights of
        :func:`fold_frozen_batchnorm`."""
        sources = [conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if conv.bias is not None:
            sources.append(conv.bias)
        def build():
            weight, bias = fold_frozen_batchnorm(conv, norm)
            return fused_layers.packed_conv_weight(weight, x, conv.stride, conv.padding, conv.dilation,
                                                   conv.groups), bias
        weight, bias = self._folded.get(name, sources, build)
        return fused_layers.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                   residual=residual, relu=relu)

    def _block(self, name: str, block: nn.Module, x: Tensor) -> Tensor:
        """One torchvision Bottleneck / BasicBlock with folded norms: convs + ReLU, residual, ReLU."""
        convs = ('conv1', 'conv2', 'conv3') if isinstance(block, Bottleneck) else ('conv1', 'conv2')
        identity = x
        if block.downsample is not None:
            conv, norm = block.downsample
            identity = self._conv_bn(f'{name}.downsample', conv, norm, x)
        out = x
        for i, conv in enumerate(convs):
            last = i == len(convs) - 1
            out = self._conv_bn(f'{name}.{conv}', getattr(block, conv), getattr(block, f'bn{i + 1}'), out,
                                residual=identity if last else None, relu=True)
        return out

    def _forward_folded(self, images: Tensor) -> list[Tensor]:
        """The body's forward without autograd (see the module docstring): the requested stages, left
        channels-last (the input projections' 1x1 convolutions read that layout faster than a copy to NCHW)."""
        body = self.body
        x = images.contiguous(memory_format=torch.channels_last)
        x = body.maxpool(self._conv_bn('conv1', body.conv1, body.bn1, x, relu=True))
        outs = []
        for layer_name, layer in body.named_children():
            if not layer_name.startswith('layer'):
                continue
            for index, block in enumerate(layer):
                x = self._block(f'{layer_name}.{index}', block, x)
            if layer_name in body.return_layers:
                outs.append(x)
        return outs


def check_return_interm_indices(indices) -> list[int]:
    """A strictly increasing, non-empty list of stage indices in 0..3, or a ValueError naming the value."""
    indices = list(indices)
    if not indices or any(i not in (0, 1, 2, 3) for i in indices) or indices != sorted(set(indices)):
        raise ValueError(f'return_interm_indices={indices}: expected a strictly increasing, non-empty list of stage '
                         f'indices in 0..3, e.g. [1, 2, 3] (4-scale) or [0, 1, 2, 3] (5-scale)')
    return indices
