"""Batching of image pairs (NestedTensor, collate) and `inverse_sigmoid`, shared by the model and the data pipeline.

Follows DETR's util/misc.py (NestedTensor: a padded batch plus its padding mask). What differs: `collate_fn`
takes (rgb, ir, target) triples and pads the two modalities to one shared size with one shared mask, where the
CAFF-DETR reference padded RGB in the collate and left IR as an unpadded tuple for the model to pad
(docs/REFERENCE.md §6.6).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor


class NestedTensor:
    """A zero-padded image batch and its padding mask.

    tensors: (B, C, H, W); mask: (B, H, W) bool, True on padding, False on image pixels (or None).
    """

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> 'NestedTensor':
        """Both tensors moved to `device` (a torch.device or string)."""
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    def __repr__(self) -> str:
        mask_shape = None if self.mask is None else tuple(self.mask.shape)
        return f'NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask_shape})'


def _pad_batch(tensor_list: Sequence[Tensor], height: int, width: int, caller: str) -> tuple[Tensor, Tensor]:
    """Copies each (C, h, w) tensor into the top-left corner of a zero (B, C, height, width) batch.

    Returns the batch and the (B, height, width) mask, True where no image pixel was copied.
    """
    first = tensor_list[0]
    channels = first.shape[0]
    batch = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for i, img in enumerate(tensor_list):
        if img.dim() != 3 or img.shape[0] != channels:
            raise ValueError(f'{caller}: image {i} has shape {tuple(img.shape)}; every image '
                             f'must be (C, H, W) with C = {channels} like image 0')
        h, w = img.shape[1:]
        batch[i, :, :h, :w].copy_(img)
        mask[i, :h, :w] = False
    return batch, mask


def nested_tensor_from_tensor_list(tensor_list: Sequence[Tensor]) -> NestedTensor:
    """Pads a list of (C, H_i, W_i) images to (B, C, max H_i, max W_i) with zeros; mask True on the padding."""
    if len(tensor_list) == 0:
        raise ValueError('nested_tensor_from_tensor_list: got an empty list of images')
    height = max(img.shape[-2] for img in tensor_list)
    width = max(img.shape[-1] for img in tensor_list)
    return NestedTensor(*_pad_batch(tensor_list, height, width, 'nested_tensor_from_tensor_list'))


def collate_fn(batch: Sequence[tuple[Tensor, Tensor, dict]]) -> tuple[NestedTensor, NestedTensor, tuple[dict, ...]]:
    """Batches (rgb (C, H_i, W_i), ir (C', H_i, W_i), target) triples for a DataLoader.

    Both modalities are zero-padded to the same (max H_i, max W_i) and share one mask (True on padding), so
    every feature level of the two backbones lines up. The two images of a pair must have the same (H, W),
    which the paired transforms guarantee.

    Returns:
        (NestedTensor rgb, NestedTensor ir, tuple of targets); `ir.mask is rgb.mask`.
    """
    if len(batch) == 0:
        raise ValueError('collate_fn: got an empty batch')
    rgbs, irs, targets = zip(*batch)
    for i, (rgb, ir) in enumerate(zip(rgbs, irs)):
        if rgb.shape[-2:] != ir.shape[-2:]:
            raise ValueError(f'collate_fn: sample {i} has rgb size {tuple(rgb.shape[-2:])} and ir size '
                             f'{tuple(ir.shape[-2:])}; the paired transforms must give both images one (H, W)')
    height = max(img.shape[-2] for img in rgbs)
    width = max(img.shape[-1] for img in rgbs)
    rgb_batch, mask = _pad_batch(rgbs, height, width, 'collate_fn (rgb)')
    ir_batch, _ = _pad_batch(irs, height, width, 'collate_fn (ir)')
    return NestedTensor(rgb_batch, mask), NestedTensor(ir_batch, mask), tuple(targets)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both x and 1 - x floored at eps (finite for x in {0, 1})."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
