"""A backbone and its position encoding as one module: `Joiner = nn.Sequential(backbone, position_embedding)`.

Follows DETR/DINO `Joiner` (`models/dino/backbone.py`); being an `nn.Sequential` keeps the state-dict keys
`0.body.*` (ResNet) / `0.patch_embed.*`, `0.layers.*` (Swin) of the reference, and `joiner[1]` is the position
encoding the top model reuses for its extra (stride-doubled) levels. Differs in that the backbone returns a list,
not a dict, the Joiner also exposes the output strides, and it can skip the encodings (`with_pos=False`).
"""
from torch import Tensor, nn

from util.misc import NestedTensor


class Joiner(nn.Sequential):
    """forward(NestedTensor images, with_pos=True) -> (features, pos).

    features: list of NestedTensor, one per backbone output level, tensors (B, C_l, H_l, W_l) and mask
    (B, H_l, W_l) True on padding; pos: list of (B, 2*num_pos_feats, H_l, W_l) position encodings of those masks,
    cast to the feature dtype, or None when `with_pos` is False (a stream whose encodings nobody reads).
    `num_channels` (C_l) and `strides` list the levels in order.
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels: list[int] = list(backbone.num_channels)
        self.strides: list[int] = list(backbone.strides)

    def forward(self, tensor_list: NestedTensor, with_pos: bool = True
                ) -> tuple[list[NestedTensor], list[Tensor] | None]:
        features = self[0](tensor_list)
        if not with_pos:
            return features, None
        pos = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, pos
