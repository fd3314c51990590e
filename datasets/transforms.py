"""Paired (RGB, IR) augmentations: one geometry for both images and the boxes.

Follows DETR's `datasets/transforms.py` as extended to image pairs by CAFF-DINO (`datasets/transforms_fusion.py`)
and DINO's photometric `sltransform.py`. Every transform is called as `t(rgb, ir, target)` and returns the same
triple. Random geometry (flip, scale, crop window) is drawn once per call and applied to both images and to
`target['boxes']` (xyxy pixels until `Normalize`, which turns them into cxcywh normalised by the image size).
Randomness comes from Python's `random` module, as in the reference, so DataLoader workers are seeded by torch.

What differs from the reference:
- Sizes and crop windows are measured on the IR image (the reference measures its first argument, which after
  its modality swap is also the IR image); the two images must already have the same size.
- `RandomSizeCrop` never asks for a window larger than the image or smaller than 1 px (the reference raises in
  `random.randint` when the image is narrower than `min_size`, which small configs can hit).
- Scales, crop sizes and the strong photometric step come from the builder arguments (the reference hard-codes
  the COCO values and ignores the config).
- No mask, padding, erasing or misalignment transforms (unused by CAFF-DINO's recipe).
- Not in the reference: a missing modality (`missing_image`, `ModalityDropout` for training, `BlankModality`
  for evaluation), applied after `Normalize`, so geometry and boxes are never touched.

A missing image is represented in exactly one way, `missing_image(like)`: the zero tensor of the present image's
shape after `Normalize`, i.e. an image at the normalisation mean (ImageNet's, the statistics the backbones were
trained with; neither a black nor a white frame). Everything that blanks an image (the transforms below, the
prediction tool) calls it.
"""
import random
from typing import Optional, Sequence

import PIL.Image
import torch
import torchvision.transforms.functional as F

from util.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHANNEL_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

MODALITIES = ('rgb', 'ir')
MISSING_MODALITY_CHOICES = ('none',) + MODALITIES  # values of the config key eval_missing_modality

# Fields holding one entry per object; filtered together when a crop removes an object.
PER_OBJECT_FIELDS = ('boxes', 'labels', 'area', 'iscrowd')


def hflip(rgb: PIL.Image.Image, ir: PIL.Image.Image, target: dict):
    """Mirror both images; x0' = w - x1, x1' = w - x0."""
    w = ir.width
    target = target.copy()
    if 'boxes' in target:
        boxes = target['boxes']
        target['boxes'] = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)
    return F.hflip(rgb), F.hflip(ir), target


def resized_hw(width: int, height: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """DETR's resize rule: the short side becomes `size`, lowered so the long side stays <= `max_size`.

    The long side is `int(size * long / short)` (truncation), so an image already at the target keeps its size.
    Returns (h, w).
    """
    short, long = min(width, height), max(width, height)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(rgb: PIL.Image.Image, ir: PIL.Image.Image, target: dict, size: int, max_size: Optional[int] = None):
    """Resize both images to the same (h, w) chosen by `resized_hw`; boxes and areas are scaled with them."""
    h, w = resized_hw(ir.width, ir.height, size, max_size)
    ratio_w, ratio_h = w / ir.width, h / ir.height
    rgb, ir = F.resize(rgb, [h, w]), F.resize(ir, [h, w])
    target = target.copy()
    if 'boxes' in target:
        target['boxes'] = target['boxes'] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if 'area' in target:
        target['area'] = target['area'] * (ratio_w * ratio_h)
    target['size'] = torch.tensor([h, w])
    return rgb, ir, target


def crop(rgb: PIL.Image.Image, ir: PIL.Image.Image, target: dict, region: tuple[int, int, int, int]):
    """Crop both images to `region` = (top, left, h, w); boxes are clipped to it, emptied ones removed."""
    top, left, h, w = region
    target = target.copy()
    target['size'] = torch.tensor([h, w])
    if 'boxes' in target:
        boxes = target['boxes'] - torch.tensor([left, top, left, top], dtype=torch.float32)
        corners = torch.min(boxes.reshape(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
        target['boxes'] = corners.reshape(-1, 4)
        target['area'] = (corners[:, 1] - corners[:, 0]).prod(dim=1)
        keep = (corners[:, 1] > corners[:, 0]).all(dim=1)
        for field in PER_OBJECT_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return F.crop(rgb, top, left, h, w), F.crop(ir, top, left, h, w), target


class Compose:
    """Applies the transforms in order to the (rgb, ir, target) triple."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, rgb, ir, target):
        for t in self.transforms:
            rgb, ir, target = t(rgb, ir, target)
        return rgb, ir, target

    def __repr__(self) -> str:
        inner = ''.join(f'\n    {t!r}' for t in self.transforms)
        return f'{type(self).__name__}({inner}\n)'


class RandomHorizontalFlip:
    """Flips the pair with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, rgb, ir, target):
        if random.random() < self.p:
            return hflip(rgb, ir, target)
        return rgb, ir, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p})'


class RandomResize:
    """Resizes the pair so its short side is one of `sizes` (drawn uniformly), long side capped at `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not sizes:
            raise ValueError('RandomResize: sizes is empty; give at least one short-side length')
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def __call__(self, rgb, ir, target):
        return resize(rgb, ir, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size})'


class RandomSizeCrop:
    """Crops a window of random width and height in [min_size, max_size] at a random position.

    Each side is drawn uniformly from [min(min_size, side), min(side, max_size)] of the IR image side.
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f'RandomSizeCrop: min_size {min_size} > max_size {max_size}')
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, extent: int) -> int:
        high = min(extent, self.max_size)
        return random.randint(max(1, min(self.min_size, high)), high)

    def __call__(self, rgb, ir, target):
        w, h = self._side(ir.width), self._side(ir.height)
        top = random.randint(0, ir.height - h)
        left = random.randint(0, ir.width - w)
        return crop(rgb, ir, target, (top, left, h, w))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})'


class RandomSelect:
    """Applies `first` with probability p, otherwise `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, rgb, ir, target):
        if random.random() < self.p:
            return self.first(rgb, ir, target)
        return self.second(rgb, ir, target)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p},\n  {self.first!r},\n  {self.second!r})'


class RandomChoice:
    """Applies exactly one of the transforms, drawn uniformly (DINO's `RandomSelectMulti`)."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, rgb, ir, target):
        return random.choice(self.transforms)(rgb, ir, target)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.transforms!r})'


def permute_channels(image: PIL.Image.Image, order: Sequence[int]) -> PIL.Image.Image:
    """Reorders the three channels of an RGB image."""
    bands = image.split()
    return PIL.Image.merge('RGB', [bands[i] for i in order])


class ChannelPermutation:
    """Shuffles the RGB channels, one of the 6 orders drawn independently for each image (DINO's LightingNoise).

    On an IR image read as three equal channels this is a no-op, as in the reference.
    """

    def __call__(self, rgb, ir, target):
        rgb = permute_channels(rgb, random.choice(CHANNEL_PERMUTATIONS))
        ir = permute_channels(ir, random.choice(CHANNEL_PERMUTATIONS))
        return rgb, ir, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def _shared_factor(max_factor: float) -> float:
    """DINO's factor ((U + 1) / 2) * max_factor, U ~ U[0, 1): in [max_factor / 2, max_factor)."""
    return (random.random() + 1.0) / 2.0 * max_factor


class _SharedFactorAdjustment:
    """``adjust(image, factor)`` applied to both images with one shared factor in [max_factor/2, max_factor)."""
    adjust = None  # a torchvision.transforms.functional adjustment, set by each subclass

    def __init__(self, max_factor: float = 2.0):
        self.max_factor = max_factor

    def __call__(self, rgb, ir, target):
        factor = _shared_factor(self.max_factor)
        return self.adjust(rgb, factor), self.adjust(ir, factor), target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(max_factor={self.max_factor})'


class AdjustBrightness(_SharedFactorAdjustment):
    """Multiplies both images' brightness by one shared factor in [max_factor/2, max_factor)."""
    adjust = staticmethod(F.adjust_brightness)


class AdjustContrast(_SharedFactorAdjustment):
    """Scales both images' contrast (about each image's own mean grey) by one shared factor."""
    adjust = staticmethod(F.adjust_contrast)


class ToTensor:
    """PIL images -> float (3, H, W) tensors in [0, 1]."""

    def __call__(self, rgb, ir, target):
        return F.to_tensor(rgb), F.to_tensor(ir), target

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class Normalize:
    """Per-channel (x - mean) / std on both images; boxes xyxy pixels -> cxcywh / (w, h, w, h)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, rgb, ir, target):
        rgb = F.normalize(rgb, mean=self.mean, std=self.std)
        ir = F.normalize(ir, mean=self.mean, std=self.std)
        target = target.copy()
        if 'boxes' in target:
            h, w = ir.shape[-2:]
            target['boxes'] = box_xyxy_to_cxcywh(target['boxes']) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return rgb, ir, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.mean}, std={self.std})'


def missing_image(like: torch.Tensor) -> torch.Tensor:
    """The representation of a missing image: zeros shaped like the normalised (3, H, W) image ``like``.

    Zero after ``Normalize`` is the normalisation mean, so a missing image is a flat frame at the mean colour.
    Same shape, dtype and device as ``like``; ``like`` itself is not modified.
    """
    return torch.zeros_like(like)


def blank_modality(rgb: torch.Tensor, ir: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rgb, ir)`` with the image of ``modality`` ('rgb' or 'ir') replaced by ``missing_image``."""
    if modality == 'rgb':
        return missing_image(rgb), ir
    if modality == 'ir':
        return rgb, missing_image(ir)
    raise ValueError(f"blank_modality: modality {modality!r} is not one of {MODALITIES}")


class ModalityDropout:
    """Training: with probability ``p`` one image of the pair becomes ``missing_image``, never both.

    Which one is drawn with equal chance (``random.random() < p``, then ``random.choice(('rgb', 'ir'))``). Runs on
    normalised tensors, after every geometric step, so the sizes, the other image and the target are unchanged.
    """

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'modality_dropout={p!r}: it is a probability, give a value in [0, 1]')
        self.p = p

    def __call__(self, rgb, ir, target):
        if random.random() < self.p:
            rgb, ir = blank_modality(rgb, ir, random.choice(MODALITIES))
        return rgb, ir, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p})'


class BlankModality:
    """Evaluation: the image of ``modality`` ('rgb' or 'ir') becomes ``missing_image`` on every pair."""

    def __init__(self, modality: str):
        if modality not in MODALITIES:
            raise ValueError(f'BlankModality: modality {modality!r} is not one of {MODALITIES}')
        self.modality = modality

    def __call__(self, rgb, ir, target):
        rgb, ir = blank_modality(rgb, ir, self.modality)
        return rgb, ir, target

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.modality!r})'


def make_train_transforms(scales: Sequence[int], max_size: int, crop_resize_scales: Sequence[int],
                          crop_size: Sequence[int], strong_aug: bool = True,
                          modality_dropout: float = 0.0) -> Compose:
    """The reference training recipe (CAFF-DINO `make_coco_transforms_RGBT('train')`).

    flip(0.5) -> one of {RandomResize(scales, max_size)} or {RandomResize(crop_resize_scales) ->
    RandomSizeCrop(*crop_size) -> RandomResize(scales, max_size)} with p 0.5 -> if strong_aug, one of
    {channel permutation, brightness, contrast} -> ToTensor -> ImageNet Normalize -> if modality_dropout > 0,
    ``ModalityDropout(modality_dropout)`` (not in the reference; at 0 the step is left out, so the random stream
    and the recipe are exactly the reference's).
    Reference values: scales 480..800 step 32, max_size 1333, crop_resize_scales [400, 500, 600],
    crop_size [384, 600], strong_aug True, no modality dropout.
    """
    if len(crop_size) != 2:
        raise ValueError(f'crop_size must be [min, max], got {list(crop_size)}')
    steps = [
        RandomHorizontalFlip(),
        RandomSelect(
            RandomResize(scales, max_size=max_size),
            Compose([RandomResize(crop_resize_scales), RandomSizeCrop(*crop_size),
                     RandomResize(scales, max_size=max_size)])),
    ]
    if strong_aug:
        steps.append(RandomChoice([ChannelPermutation(), AdjustBrightness(2.0), AdjustContrast(2.0)]))
    steps += [ToTensor(), Normalize()]
    if modality_dropout:
        steps.append(ModalityDropout(modality_dropout))
    return Compose(steps)


def make_eval_transforms(size: int, max_size: int, missing_modality: str = 'none') -> Compose:
    """Evaluation: short side `size`, long side <= `max_size` (reference 800 / 1333), then Normalize.

    ``missing_modality`` 'rgb' or 'ir' appends ``BlankModality(missing_modality)``; 'none' (the reference) does not.
    """
    if missing_modality not in MISSING_MODALITY_CHOICES:
        raise ValueError(f'eval_missing_modality={missing_modality!r}: choose one of {MISSING_MODALITY_CHOICES}')
    steps = [RandomResize([size], max_size=max_size), ToTensor(), Normalize()]
    if missing_modality != 'none':
        steps.append(BlankModality(missing_modality))
    return Compose(steps)
