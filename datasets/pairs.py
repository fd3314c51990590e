"""The paired RGB + thermal detection Dataset over one COCO annotation file.

Follows CAFF-DINO's `datasets/coco.py` (CocoDetection_RGBT_* + ConvertCocoPolysToMask_fuse): an item is the two
images of a pair and its target; crowd and degenerate boxes are dropped from the training target, boxes are
xyxy pixels clipped to the image (docs/REFERENCE.md §6.4). The annotation file is read and normalised by
`datasets/annotations.py`, the images by `datasets/images.py` (EXIF orientation, bit depth, channels), and the
whole split is checked before training by `datasets/check.py`, which hands the dataset its verdict
(`use_check`).

What differs from the reference:
- Images are returned by name, `(rgb, ir, target)`. The reference swaps them inside `prepare` (docs/REFERENCE.md §0);
  here the model's routing (`query_modality`) decides which image takes which role.
- A pair that cannot be read (missing or corrupt file, RGB/IR size mismatch) raises BadPairError naming the files.
  A training set built with `skip_bad_pairs=True` logs it and returns another pair instead; normally the data
  check has left such pairs out before training already.
"""
import logging
import os
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from datasets.annotations import NormalisedAnnotations, PairNames, coco_from_dict, load_annotations, same_file_name
from datasets.images import DEFAULT_BIT_DEPTH, BadPairError, BitDepthRule, read_image
from datasets.problems import FIXED

logger = logging.getLogger('caff_dino.datasets')

__all__ = ['PairedCocoDataset', 'BadPairError', 'boxes_to_target', 'coco_from_dict', 'read_image']


def boxes_to_target(annotations: list[dict], image_id: int, width: int, height: int) -> dict:
    """Training target in pixels: non-crowd boxes as xyxy clipped to (width, height), degenerate ones dropped.

    Returns {'boxes' (K,4) float32 xyxy, 'labels' (K,) int64, 'area' (K,), 'iscrowd' (K,) int64,
    'image_id' int64 scalar, 'orig_size' and 'size' (2,) int64 (h, w)}.
    """
    anns = [a for a in annotations if not a.get('iscrowd', 0)]
    boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    labels = torch.tensor([a['category_id'] for a in anns], dtype=torch.int64)
    area = torch.tensor([a['area'] for a in anns], dtype=torch.float32)
    return {
        'boxes': boxes[keep],
        'labels': labels[keep],
        'area': area[keep],
        'iscrowd': torch.zeros(int(keep.sum()), dtype=torch.int64),
        'image_id': torch.tensor(image_id, dtype=torch.int64),
        'orig_size': torch.tensor([height, width], dtype=torch.int64),
        'size': torch.tensor([height, width], dtype=torch.int64),
    }


class PairedCocoDataset(Dataset):
    """Aligned RGB/IR image pairs with one COCO annotation file.

    Item i: `(img_rgb, img_ir, target)` after `transforms` (CHW float tensors and a target with cxcywh boxes
    normalised to the transformed image when the usual transforms are used; PIL images and xyxy pixel boxes
    when `transforms` is None). The IR image is the size reference; the RGB image must have the same size.

    Bad input: building the dataset reads only the annotation file (errors raise DataError naming it). The data
    check (`datasets/check.py`, run by main.py before training) probes every pair and calls `use_check`, which
    leaves the unusable pairs of a training set out. Reading an item that still fails raises BadPairError, or,
    with `skip_bad_pairs`, logs it, remembers it and returns the next good pair. Only training sets skip:
    evaluation must see every image.

    Attributes: `coco` (pycocotools COCO over the normalised annotations, int image ids), `image_id_map`
    ({original id: int id} when the file used string ids, else None), `annotations` (the NormalisedAnnotations,
    with `.problems`), `annotation_file`, `ids` (image ids in item order), `left_out` ({image id: why} of the
    pairs the check left out), `num_skipped` (bad pairs skipped while reading, in this process).
    """

    def __init__(self, rgb_dir: str, ir_dir: str, annotation_file: str, num_classes: int,
                 transforms: Optional[Callable] = None, pair_names: PairNames = same_file_name,
                 skip_bad_pairs: bool = False, bit_depth: BitDepthRule = DEFAULT_BIT_DEPTH):
        self.rgb_dir, self.ir_dir = rgb_dir, ir_dir
        self.annotation_file = annotation_file
        self.num_classes = num_classes
        self.transforms = transforms
        self.skip_bad_pairs = skip_bad_pairs
        self.pair_names = pair_names
        self.bit_depth = bit_depth
        self.num_skipped = 0
        self.left_out: dict[int, str] = {}
        self._bad: set[int] = set()
        self._use(load_annotations(annotation_file, num_classes, pair_names))
        if not self.ids:
            raise BadPairError(f'{annotation_file}: "images" is empty; the split needs at least one image pair')
        self._log_summary()

    def _use(self, loaded: NormalisedAnnotations) -> None:
        self.annotations = loaded
        self.coco = coco_from_dict(loaded.dataset)
        self.image_id_map = loaded.image_id_map
        self.ids = [im['id'] for im in loaded.dataset['images'] if im['id'] not in self.left_out]
        self._bad.clear()

    def pair_paths(self, image_id: int) -> tuple[str, str]:
        """(rgb path, ir path) of an image id."""
        rgb_name, ir_name = self.pair_names(self.coco.imgs[image_id])
        return os.path.join(self.rgb_dir, rgb_name), os.path.join(self.ir_dir, ir_name)

    def use_check(self, checked: NormalisedAnnotations, left_out: dict[int, str]) -> None:
        """Adopt what the data check found: annotations normalised with the files' sizes (so the ground truth
        holds the boxes the training targets hold) and the pairs to leave out ({image id: why})."""
        self.left_out = dict(left_out)
        self._use(checked)
        if not self.ids:
            raise BadPairError(f'{self.annotation_file}: every image pair is unusable; see the warnings above, '
                               f'or run python tools/check_dataset.py')

    def _log_summary(self) -> None:
        num_negative = sum(1 for i in self.ids if not self.coco.imgToAnns.get(i))
        logger.info('annotations: %s (%d pairs, %d boxes, %d without boxes)', self.annotation_file, len(self.ids),
                    len(self.coco.anns), num_negative)
        if self.image_id_map is not None:
            logger.info('%s: image ids were not ints; mapped to ints (dataset.image_id_map)', self.annotation_file)
        for note in self.annotations.notes:
            logger.info('%s: %s', self.annotation_file, note)
        for kind in self.annotations.problems.kinds(FIXED):
            logger.info('%s: %s', self.annotation_file, self.annotations.problems.summary(kind))

    def __len__(self) -> int:
        return len(self.ids)

    def load_pair(self, index: int):
        """(rgb PIL, ir PIL, target in xyxy pixels) of item `index`, before transforms; BadPairError if unusable."""
        image_id = self.ids[index]
        rgb_path, ir_path = self.pair_paths(image_id)
        rgb, ir = read_image(rgb_path, self.bit_depth), read_image(ir_path, self.bit_depth)
        if rgb.size != ir.size:
            raise BadPairError(f'{rgb_path} is {rgb.width}x{rgb.height} but its IR partner {ir_path} is '
                               f'{ir.width}x{ir.height} (WxH); the pair must be registered to one size')
        target = boxes_to_target(self.coco.imgToAnns.get(image_id, []), image_id, ir.width, ir.height)
        return rgb, ir, target

    def __getitem__(self, index: int):
        if not self.skip_bad_pairs:
            return self._transformed(*self.load_pair(index))
        for offset in range(len(self.ids)):
            candidate = (index + offset) % len(self.ids)
            if candidate in self._bad:
                continue
            try:
                pair = self.load_pair(candidate)
            except BadPairError as err:
                self._bad.add(candidate)
                self.num_skipped += 1
                logger.warning('skipping bad pair (%d skipped so far in this process): %s', self.num_skipped, err)
                continue
            return self._transformed(*pair)
        raise BadPairError(f'{self.annotation_file}: every image pair failed to load; see the warnings above')

    def _transformed(self, rgb, ir, target):
        if self.transforms is None:
            return rgb, ir, target
        return self.transforms(rgb, ir, target)
