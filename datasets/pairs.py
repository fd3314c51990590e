"""COCO-format paired RGB + thermal detection data: annotation loading/normalising and the Dataset.

Follows CAFF-DINO's `datasets/coco.py` (CocoDetection_RGBT_* + ConvertCocoPolysToMask_fuse): both images are
read with PIL `.convert('RGB')` (IR as three equal channels); boxes are COCO xywh -> xyxy, clipped to the image;
crowd and degenerate boxes are dropped from the training target; `category_id` is used directly as the class
index into a `num_classes`-wide head.

What differs from the reference:
- Images are returned by name, `(rgb, ir, target)`. The reference swaps them inside `prepare` (docs/REFERENCE.md §0);
  here the model's routing (`query_modality`) decides which image takes which role.
- Community JSON quirks are normalised instead of crashing: string image ids (mapped to ints, mapping kept in
  `image_id_map`), 0-based ids, int boxes, boxes partly outside the image (clipped), zero-area boxes (dropped
  from the file's ground truth and the targets), images without annotations (kept as negatives). Annotation ids
  are renumbered 1..M because pycocotools treats a ground-truth id of 0 as "unmatched".
- Bad input is an error naming the file: missing key, category id >= num_classes, missing partner image,
  unreadable image, RGB/IR size mismatch. A training set built with `skip_bad_pairs=True` logs a bad pair and
  returns another one instead.
"""
import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from util.errors import DataError

logger = logging.getLogger('caff_dino.datasets')

PairNames = Callable[[dict], tuple[str, str]]

REQUIRED_TOP_KEYS = ('images', 'annotations')
REQUIRED_IMAGE_KEYS = ('id',)
REQUIRED_ANNOTATION_KEYS = ('image_id', 'bbox', 'category_id')


class BadPairError(DataError):
    """An image pair that cannot be used: a file is missing or unreadable, or the two sizes differ."""


def same_file_name(image: dict) -> tuple[str, str]:
    """LLVIP naming: the RGB and IR files share `file_name`."""
    if 'file_name' not in image:
        raise KeyError(f"image entry has keys {sorted(image)}; it must name its files with 'file_name'")
    return str(image['file_name']), str(image['file_name'])


@dataclass
class NormalisedAnnotations:
    """A COCO dict with int image ids, float clipped boxes, ids 1..M, plus what the normalising changed."""
    dataset: dict
    image_id_map: Optional[dict]
    dropped_degenerate: int = 0
    clipped: int = 0
    notes: list = field(default_factory=list)


def _missing(entry, keys) -> list[str]:
    return [k for k in keys if not isinstance(entry, dict) or k not in entry]


def map_image_ids(ids: list, path: str) -> Optional[dict]:
    """None when every id is an int; otherwise {original id: int id}.

    Digit strings ("010001") map to their integer value when those values are unique; any other set of ids
    maps to 1..N in file order.
    """
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        if len(set(ids)) != len(ids):
            raise ValueError(f'{path}: duplicate image ids in "images"; every image needs its own id')
        return None
    if len(set(map(str, ids))) != len(ids):
        raise ValueError(f'{path}: duplicate image ids in "images"; every image needs its own id')
    as_text = [str(i) for i in ids]
    if all(t.isdigit() for t in as_text) and len({int(t) for t in as_text}) == len(ids):
        return {i: int(str(i)) for i in ids}
    return {i: n for n, i in enumerate(ids, start=1)}


def _integer_id(value, path: str, where: str) -> int:
    """An integral category id (int, integral float or digit string), else an error naming the entry."""
    problem = ValueError(f'{path}: {where} has category_id {value!r}; it must be an integer class index')
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise problem
    try:
        as_float = float(value)
    except ValueError:
        raise problem from None
    if not as_float.is_integer():
        raise problem
    return int(as_float)


def _category_index(value, path: str, where: str, num_classes: int) -> int:
    """The class index of an annotation: its category_id, which must lie in [0, num_classes)."""
    index = _integer_id(value, path, where)
    if not 0 <= index < num_classes:
        raise ValueError(f'{path}: {where} has category_id {index}, outside [0, {num_classes - 1}] for '
                         f'num_classes={num_classes}. category_id is the class index of the head: raise '
                         f'num_classes in the config or remap the ids in the annotation file')
    return index


def _normalise_categories(listed: Optional[list], used: set[int], path: str, num_classes: int,
                          notes: list[str]) -> list[dict]:
    """Category entries with int ids for the evaluator: listed ones within the head, plus any used but unlisted.

    Listed categories outside [0, num_classes) are dropped (no annotation uses them, or loading would have
    failed already).
    """
    if listed is None:
        notes.append('no "categories" in the file; named them by id')
        return [{'id': c, 'name': str(c)} for c in sorted(used)]
    categories = []
    for n, category in enumerate(listed):
        if not isinstance(category, dict) or 'id' not in category:
            raise ValueError(f"{path}: categories[{n}] lacks key 'id'")
        index = _integer_id(category['id'], path, f'categories[{n}]')
        if 0 <= index < num_classes:
            categories.append(dict(category, id=index))
        else:
            notes.append(f'category {index} ({category.get("name")}) is outside num_classes={num_classes} and '
                         f'unused; left out')
    for c in sorted(used - {c['id'] for c in categories}):
        categories.append({'id': c, 'name': str(c)})
        notes.append(f'category {c} is used by annotations but not listed; added')
    return categories


def _clip_xywh(box: list[float], width, height) -> tuple[list[float], bool]:
    """Clip an xywh box to [0, width] x [0, height] (when known); returns the box and whether it changed."""
    x0, y0, w, h = box
    x1, y1 = x0 + w, y0 + h
    cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
    cx1 = min(x1, float(width)) if width else x1
    cy1 = min(y1, float(height)) if height else y1
    clipped = [cx0, cy0, cx1 - cx0, cy1 - cy0]
    return clipped, clipped != [x0, y0, w, h]


def _normalise_images(raw_images: list, path: str, pair_names: PairNames) -> tuple[list[dict], Optional[dict]]:
    """Copies of the `images` entries with int ids, and the id mapping (None when ids were ints already)."""
    images = []
    for n, image in enumerate(raw_images):
        missing = _missing(image, REQUIRED_IMAGE_KEYS)
        if missing:
            raise ValueError(f'{path}: images[{n}] lacks key(s) {missing}')
        try:
            pair_names(image)
        except KeyError as err:
            raise ValueError(f'{path}: images[{n}] (id {image["id"]!r}): {err.args[0]}') from None
        images.append(dict(image))
    id_map = map_image_ids([im['id'] for im in images], path)
    if id_map is not None:
        for image in images:
            image['id'] = id_map[image['id']]
    return images, id_map


def _normalise_annotation(ann, where: str, path: str, id_map: Optional[dict], sizes: dict,
                          num_classes: int) -> tuple[Optional[dict], bool]:
    """A cleaned copy of one annotation (None when its box is empty after clipping) and whether it was clipped."""
    missing = _missing(ann, REQUIRED_ANNOTATION_KEYS)
    if missing:
        raise ValueError(f'{path}: {where} lacks key(s) {missing}; each annotation needs '
                         f'{list(REQUIRED_ANNOTATION_KEYS)}')
    image_id = ann['image_id']
    if id_map is not None:
        image_id = id_map.get(image_id, id_map.get(str(image_id)))
    if image_id not in sizes:
        raise ValueError(f'{path}: {where} refers to image_id {ann["image_id"]!r}, which is not in "images"')
    bbox = ann['bbox']
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise ValueError(f'{path}: {where} has bbox {bbox!r}; expected [x, y, width, height] numbers')
    label = _category_index(ann['category_id'], path, where, num_classes)
    box, clipped = _clip_xywh([float(v) for v in bbox], *sizes[image_id])
    if box[2] <= 0 or box[3] <= 0:
        return None, clipped
    clean = dict(ann, image_id=image_id, bbox=box, category_id=label, iscrowd=int(bool(ann.get('iscrowd', 0))),
                 area=float(ann['area']) if ann.get('area') else box[2] * box[3])
    return clean, clipped


def normalise_annotations(raw: dict, path: str, num_classes: int, pair_names: PairNames) -> NormalisedAnnotations:
    """Validates a COCO detection dict and returns a cleaned copy (see the module docstring for the rules).

    Every problem raises ValueError naming `path` and the entry. Checks: top-level `images`/`annotations`, `id`
    and the file-name keys of each image, `image_id`/`bbox`/`category_id` of each annotation, bbox of 4 finite
    numbers, image ids unique, annotations pointing at a listed image, 0 <= category_id < num_classes.
    Annotation ids become 1..M in file order. Extra fields (e.g. "visibility") are kept untouched.
    """
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: top level is a {type(raw).__name__}; expected a COCO dict with '
                         f'"images" and "annotations"')
    missing = _missing(raw, REQUIRED_TOP_KEYS)
    if missing:
        raise ValueError(f'{path}: missing top-level key(s) {missing}; a COCO detection file needs '
                         f'{list(REQUIRED_TOP_KEYS)} (and usually "categories")')
    for key in REQUIRED_TOP_KEYS:
        if not isinstance(raw[key], list):
            raise ValueError(f'{path}: "{key}" is a {type(raw[key]).__name__}; expected a list')
    images, id_map = _normalise_images(raw['images'], path, pair_names)
    sizes = {image['id']: (image.get('width'), image.get('height')) for image in images}
    result = NormalisedAnnotations(dataset={}, image_id_map=id_map)
    annotations = []
    for n, ann in enumerate(raw['annotations']):
        where = f'annotations[{n}] (id {ann.get("id")!r})' if isinstance(ann, dict) else f'annotations[{n}]'
        clean, clipped = _normalise_annotation(ann, where, path, id_map, sizes, num_classes)
        if clean is None:
            result.dropped_degenerate += 1
            continue
        result.clipped += int(clipped)
        clean['id'] = len(annotations) + 1
        annotations.append(clean)
    categories = _normalise_categories(raw.get('categories'), {a['category_id'] for a in annotations}, path,
                                       num_classes, result.notes)
    result.dataset = {'images': images, 'annotations': annotations, 'categories': categories}
    for key in ('info', 'licenses'):
        if key in raw:
            result.dataset[key] = raw[key]
    return result


def load_annotations(path: str, num_classes: int, pair_names: PairNames = same_file_name) -> NormalisedAnnotations:
    """Reads and normalises a COCO annotation file (errors name `path`)."""
    try:
        with open(path, encoding='utf-8') as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f'{path}: not valid JSON ({err})') from None
    return normalise_annotations(raw, path, num_classes, pair_names)


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO index over an in-memory dict (its progress prints silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_image(path: str) -> PIL.Image.Image:
    """Opens an image as 3-channel RGB (a grey IR frame becomes three equal channels)."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert('RGB')
    except FileNotFoundError:
        raise BadPairError(f'{path}: file not found') from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadPairError(f'{path}: unreadable or corrupt image ({type(err).__name__}: {err})') from None


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

    Bad input: file existence is checked when the dataset is built (a missing file raises BadPairError, or
    with `skip_bad_pairs` the pair is left out and counted); decoding and the size check happen when an item
    is read (BadPairError, or with `skip_bad_pairs` the pair is logged, remembered and the next good pair is
    returned). Only training sets should skip: evaluation must see every image.

    Attributes: `coco` (pycocotools COCO over the normalised annotations, int image ids), `image_id_map`
    ({original id: int id} when the file used string ids, else None), `annotation_file`, `ids` (image ids in
    item order), `num_skipped` (bad pairs skipped so far, in this process).
    """

    def __init__(self, rgb_dir: str, ir_dir: str, annotation_file: str, num_classes: int,
                 transforms: Optional[Callable] = None, pair_names: PairNames = same_file_name,
                 skip_bad_pairs: bool = False):
        self.rgb_dir, self.ir_dir = rgb_dir, ir_dir
        self.annotation_file = annotation_file
        self.transforms = transforms
        self.skip_bad_pairs = skip_bad_pairs
        self.pair_names = pair_names
        loaded = load_annotations(annotation_file, num_classes, pair_names)
        self.coco = coco_from_dict(loaded.dataset)
        self.image_id_map = loaded.image_id_map
        self.num_skipped = 0
        self._bad: set[int] = set()
        self.ids = self._present_image_ids([im['id'] for im in loaded.dataset['images']])
        if not self.ids:
            raise ValueError(f'{annotation_file}: no usable image pairs under {rgb_dir} and {ir_dir}')
        self._log_summary(loaded)

    def _paths(self, image_id: int) -> tuple[str, str]:
        rgb_name, ir_name = self.pair_names(self.coco.imgs[image_id])
        return os.path.join(self.rgb_dir, rgb_name), os.path.join(self.ir_dir, ir_name)

    def _present_image_ids(self, image_ids: list[int]) -> list[int]:
        """Image ids whose two files exist; a missing file raises unless bad pairs are skipped."""
        kept, missing = [], 0
        for image_id in image_ids:
            rgb_path, ir_path = self._paths(image_id)
            absent = [p for p in (rgb_path, ir_path) if not os.path.isfile(p)]
            if not absent:
                kept.append(image_id)
                continue
            if len(absent) == 2:
                message = f'{rgb_path} and {ir_path}: both files missing'
            else:
                partner = ir_path if absent[0] == rgb_path else rgb_path
                message = f'{absent[0]}: missing partner of {partner}'
            message += f' (image id {image_id} in {self.annotation_file})'
            if not self.skip_bad_pairs:
                raise BadPairError(message + '; fix the data, or set skip_bad_pairs=True for training')
            missing += 1
            logger.warning('skipping pair: %s', message)
        if missing:
            logger.warning('%s: skipped %d of %d pairs with a missing file', self.annotation_file, missing,
                           len(image_ids))
        return kept

    def _log_summary(self, loaded: NormalisedAnnotations) -> None:
        num_negative = sum(1 for i in self.ids if not self.coco.imgToAnns.get(i))
        logger.info('annotations: %s (%d pairs, %d boxes, %d without boxes)', self.annotation_file, len(self.ids),
                    len(self.coco.anns), num_negative)
        if loaded.image_id_map is not None:
            logger.info('%s: image ids were not ints; mapped to ints (dataset.image_id_map)', self.annotation_file)
        if loaded.clipped or loaded.dropped_degenerate:
            logger.info('%s: %d boxes clipped to the image, %d zero-area boxes dropped', self.annotation_file,
                        loaded.clipped, loaded.dropped_degenerate)
        for note in loaded.notes:
            logger.info('%s: %s', self.annotation_file, note)

    def __len__(self) -> int:
        return len(self.ids)

    def load_pair(self, index: int):
        """(rgb PIL, ir PIL, target in xyxy pixels) of item `index`, before transforms; BadPairError if unusable."""
        image_id = self.ids[index]
        rgb_path, ir_path = self._paths(image_id)
        rgb, ir = read_image(rgb_path), read_image(ir_path)
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
