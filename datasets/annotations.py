"""COCO annotation files of paired data: read, validate and normalise them into one clean COCO dict.

Follows what CAFF-DINO's `datasets/coco.py` (ConvertCocoPolysToMask_fuse) does to the boxes: COCO xywh boxes,
clipped to the image, degenerate ones dropped, `category_id` used directly as the class index into a
`num_classes`-wide head (docs/REFERENCE.md §6.4). The reference does this to the training target only and reads
the file otherwise as it is. What differs:

- The same box rules are applied once, to the file's ground truth, so the training targets and the evaluation
  ground truth hold the same boxes: a box partly outside its image is clipped (``box_clipped``), one entirely
  outside or of zero/negative width or height is dropped (``box_outside``, ``box_degenerate``). Each is
  counted with the first few ids (`datasets/problems.py`), never silent. The image size is the file's when
  `image_sizes` is given (the data check passes what it read), else the JSON's `width`/`height`; with neither
  the box is left as it is here (the Dataset clips its training target to the image it reads).
- Community JSON quirks are normalised instead of crashing: string image ids (mapped to ints, the mapping kept
  in `image_id_map`), 0-based ids, int boxes, images without annotations (kept as negatives), a UTF-8 byte order
  mark, categories without a name (named by their id). Annotation ids are renumbered 1..M in file order
  because pycocotools treats a ground-truth id of 0 as "unmatched". Extra fields (e.g. "visibility", "ignore")
  are kept untouched.
- Bad input names the file and the entry: a file that is not JSON or not a COCO dict, an image entry without
  `id` or its file name keys, an image id that is neither a number nor a string, duplicate image ids, and, per
  annotation, missing keys, an unknown image id, a bbox that is not 4 finite numbers, an `iscrowd` that is not
  0 or 1 (a string "0" is 0, never read as true), a category id that is not an integer or not in
  [0, num_classes). The
  per-annotation problems are all collected (`NormalisedAnnotations.problems`); `load_annotations` raises the
  first as a one-line DataError that also gives their count.
"""
import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from pycocotools.coco import COCO

from datasets.problems import ERROR, ProblemLog
from util.errors import DataError

PairNames = Callable[[dict], tuple[str, str]]
ImageSizes = dict  # {int image id: (width, height)} of the files on disk

REQUIRED_TOP_KEYS = ('images', 'annotations')
REQUIRED_IMAGE_KEYS = ('id',)
REQUIRED_ANNOTATION_KEYS = ('image_id', 'bbox', 'category_id')


def same_file_name(image: dict) -> tuple[str, str]:
    """LLVIP naming: the RGB and IR files share `file_name`."""
    if 'file_name' not in image:
        raise KeyError(f"image entry has keys {sorted(image)}; it must name its files with 'file_name'")
    return str(image['file_name']), str(image['file_name'])


@dataclass
class NormalisedAnnotations:
    """A COCO dict with int image ids, float clipped boxes and ids 1..M, plus what the normalising found.

    `original_ids` maps each int image id back to the file's id (for messages and results).
    """
    dataset: dict
    image_id_map: Optional[dict]
    original_ids: dict = field(default_factory=dict)
    problems: ProblemLog = field(default_factory=ProblemLog)
    notes: list = field(default_factory=list)

    def raise_errors(self) -> None:
        """A one-line DataError for the first error-severity problem (and how many there are), if any."""
        first = self.problems.first(ERROR)
        if first is None:
            return
        total = self.problems.total(ERROR)
        more = f' ({total - 1} more problem(s) in this file; python tools/check_dataset.py lists them)' \
            if total > 1 else ''
        raise DataError(first.message + more)


def _missing(entry, keys) -> list[str]:
    return [k for k in keys if not isinstance(entry, dict) or k not in entry]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def map_image_ids(ids: list, path: str) -> Optional[dict]:
    """None when every id is an int; otherwise {original id: int id}.

    Digit strings ("010001") map to their integer value when those values are unique; any other set of ids
    maps to 1..N in file order. Duplicate ids, or an id that is neither a number nor a string, raise DataError.
    """
    for n, i in enumerate(ids):
        if isinstance(i, bool) or not isinstance(i, (int, float, str)):
            raise DataError(f'{path}: images[{n}] has id {i!r}; an image id must be an integer or a string')
    if all(isinstance(i, int) for i in ids):
        if len(set(ids)) != len(ids):
            raise DataError(f'{path}: duplicate image ids in "images"; every image needs its own id')
        return None
    if len(set(map(str, ids))) != len(ids):
        raise DataError(f'{path}: duplicate image ids in "images"; every image needs its own id')
    as_text = [str(i) for i in ids]
    if all(t.isdigit() for t in as_text) and len({int(t) for t in as_text}) == len(ids):
        return {i: int(str(i)) for i in ids}
    return {i: n for n, i in enumerate(ids, start=1)}


def _integer_id(value) -> Optional[int]:
    """An integral category id (int, integral float or digit string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        as_float = float(value)
    except ValueError:
        return None
    return int(as_float) if math.isfinite(as_float) and as_float.is_integer() else None


def _normalise_categories(listed: Optional[list], used: set[int], path: str, num_classes: int,
                          notes: list[str]) -> list[dict]:
    """Category entries with int ids for the evaluator: listed ones within the head, plus any used but unlisted.

    Listed categories outside [0, num_classes) are dropped (no annotation uses them, or loading fails anyway).
    """
    if listed is None:
        notes.append('no "categories" in the file; named them by id')
        return [{'id': c, 'name': str(c)} for c in sorted(used)]
    if not isinstance(listed, list):
        raise DataError(f'{path}: "categories" is a {type(listed).__name__}; expected a list')
    categories = []
    for n, category in enumerate(listed):
        if not isinstance(category, dict) or 'id' not in category:
            raise DataError(f"{path}: categories[{n}] lacks key 'id'")
        index = _integer_id(category['id'])
        if index is None:
            raise DataError(f'{path}: categories[{n}] has id {category["id"]!r}; it must be an integer class index')
        if 0 <= index < num_classes:
            name = category.get('name')
            if not (isinstance(name, str) and name):  # the evaluator's per-class table prints names
                label = str(index) if name in (None, '') else str(name)
                notes.append(f'categories[{n}] (id {index}) has name {name!r}; named it {label!r}')
                name = label
            categories.append(dict(category, id=index, name=name))
        else:
            notes.append(f'category {index} ({category.get("name")}) is outside num_classes={num_classes} and '
                         f'unused; left out')
    for c in sorted(used - {c['id'] for c in categories}):
        categories.append({'id': c, 'name': str(c)})
        notes.append(f'category {c} is used by annotations but not listed; added')
    return categories


def normalise_images(raw_images: list, path: str, pair_names: PairNames) -> tuple[list[dict], Optional[dict]]:
    """Copies of the `images` entries with int ids, and the id mapping (None when ids were ints already).

    An entry without `id` or without the file-name keys of `pair_names`, or duplicate ids, raise DataError.
    """
    images = []
    for n, image in enumerate(raw_images):
        missing = _missing(image, REQUIRED_IMAGE_KEYS)
        if missing:
            raise DataError(f'{path}: images[{n}] lacks key(s) {missing}')
        try:
            pair_names(image)
        except KeyError as err:
            raise DataError(f'{path}: images[{n}] (id {image["id"]!r}): {err.args[0]}') from None
        images.append(dict(image))
    id_map = map_image_ids([im['id'] for im in images], path)
    if id_map is not None:
        for image in images:
            image['id'] = id_map[image['id']]
    return images, id_map


def original_image_ids(images: list[dict], id_map: Optional[dict]) -> dict:
    """{int image id: the id the file gave it} for normalised `images` and their id mapping."""
    if id_map is None:
        return {image['id']: image['id'] for image in images}
    return {int_id: file_id for file_id, int_id in id_map.items()}


def _image_size(image: dict, original_id, path: str, problems: ProblemLog,
                file_size: Optional[tuple]) -> tuple[Optional[float], Optional[float]]:
    """The (width, height) boxes are clipped to: the file's when known (then also written into the entry), else
    the entry's own, else (None, None). A width/height that is present but not a positive number is an error."""
    declared = [image.get(k) for k in ('width', 'height')]
    if any(v is not None for v in declared) and not all(_is_number(v) and v > 0 for v in declared):
        problems.add('bad_image_entry', f'image {original_id!r}',
                     f'{path}: image {original_id!r} has width={declared[0]!r} height={declared[1]!r}; both must be '
                     f'positive numbers (or both left out)')
        declared = [None, None]
    if file_size is not None:
        if declared[0] is None:
            problems.add('size_from_file', f'image {original_id!r}')
        image['width'], image['height'] = int(file_size[0]), int(file_size[1])
        return float(file_size[0]), float(file_size[1])
    if declared[0] is None:
        return None, None
    return float(declared[0]), float(declared[1])


def clip_xywh(box: list[float], width: Optional[float], height: Optional[float]) -> Optional[list[float]]:
    """The part of an xywh box inside [0, width] x [0, height] (with an unknown size only the sides at 0 are
    clipped); None when nothing of it is inside."""
    x0, y0, w, h = box
    cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
    cx1 = min(x0 + w, width) if width else x0 + w
    cy1 = min(y0 + h, height) if height else y0 + h
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return [cx0, cy0, cx1 - cx0, cy1 - cy0]


def _mapped_image_id(value, id_map: Optional[dict]):
    """The int image id an annotation's `image_id` refers to (None when the file's ids were mapped and it is not
    one of them, or not an id at all)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if id_map is not None:
        return id_map.get(value, id_map.get(str(value)))
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _crowd_flag(value) -> Optional[int]:
    """COCO's ``iscrowd`` as 0 or 1 (from 0/1, False/True, 0.0/1.0 or "0"/"1"); None for anything else."""
    flag = int(value) if isinstance(value, bool) else _integer_id(value)
    return flag if flag in (0, 1) else None


def _annotation_problem(ann, image_ids: dict, id_map: Optional[dict], num_classes: int) -> tuple[str, str] | None:
    """(kind, what is wrong) for an annotation that cannot be used, else None."""
    missing = _missing(ann, REQUIRED_ANNOTATION_KEYS)
    if missing:
        return 'annotation_missing_keys', f'lacks key(s) {missing}; each annotation needs ' \
                                          f'{list(REQUIRED_ANNOTATION_KEYS)}'
    if _mapped_image_id(ann['image_id'], id_map) not in image_ids:
        return 'unknown_image_id', f'refers to image_id {ann["image_id"]!r}, which is not in "images"'
    bbox = ann['bbox']
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return 'bad_bbox', f'has bbox {bbox!r}; expected [x, y, width, height] finite numbers'
    if _crowd_flag(ann.get('iscrowd', 0)) is None:
        return 'bad_iscrowd', f'has iscrowd {ann["iscrowd"]!r}; it must be 0 or 1'
    label = _integer_id(ann['category_id'])
    if label is None:
        return 'bad_category_id', f'has category_id {ann["category_id"]!r}; it must be an integer class index'
    if not 0 <= label < num_classes:
        return 'category_out_of_range', (
            f'has category_id {label}, outside [0, {num_classes - 1}] for num_classes={num_classes}. category_id '
            f'is the class index of the head: raise num_classes in the config or remap the ids in the file')
    return None


def check_top_level(raw, path: str) -> None:
    """DataError unless `raw` is a dict with `images` and `annotations` lists."""
    if not isinstance(raw, dict):
        raise DataError(f'{path}: top level is a {type(raw).__name__}; expected a COCO dict with '
                        f'"images" and "annotations"')
    missing = _missing(raw, REQUIRED_TOP_KEYS)
    if missing:
        raise DataError(f'{path}: missing top-level key(s) {missing}; a COCO detection file needs '
                        f'{list(REQUIRED_TOP_KEYS)} (and usually "categories")')
    for key in REQUIRED_TOP_KEYS:
        if not isinstance(raw[key], list):
            raise DataError(f'{path}: "{key}" is a {type(raw[key]).__name__}; expected a list')


def normalise_annotations(raw, path: str, num_classes: int, pair_names: PairNames = same_file_name,
                          image_sizes: Optional[ImageSizes] = None) -> NormalisedAnnotations:
    """Validates a COCO detection dict and returns a cleaned copy (see the module docstring for the rules).

    A file-level problem (not a dict, missing `images`/`annotations`, a bad image entry, duplicate ids) raises
    DataError naming `path`. Per-annotation problems are recorded in `.problems` (kinds of datasets/problems.py)
    and the annotation is left out; call `.raise_errors()` to stop on them. `image_sizes` ({int image id:
    (w, h)}) are the sizes of the files, used instead of the JSON's `width`/`height` where given.
    """
    check_top_level(raw, path)
    images, id_map = normalise_images(raw['images'], path, pair_names)
    original = original_image_ids(images, id_map)
    result = NormalisedAnnotations(dataset={}, image_id_map=id_map, original_ids=original)
    problems = result.problems
    sizes = {im['id']: _image_size(im, original[im['id']], path, problems, (image_sizes or {}).get(im['id']))
             for im in images}
    annotations = []
    for n, ann in enumerate(raw['annotations']):
        ann_id = ann.get('id') if isinstance(ann, dict) else None
        where = f'annotations[{n}]' + (f' (id {ann_id!r})' if ann_id is not None else '')
        problem = _annotation_problem(ann, sizes, id_map, num_classes)
        if problem is not None:
            problems.add(problem[0], where, f'{path}: {where} {problem[1]}')
            continue
        image_id = _mapped_image_id(ann['image_id'], id_map)
        ref = f'ann {ann_id if ann_id is not None else f"[{n}]"} of image {original[image_id]!r}'
        box = [float(v) for v in ann['bbox']]
        if box[2] <= 0 or box[3] <= 0:
            problems.add('box_degenerate', ref)
            continue
        clipped = clip_xywh(box, *sizes[image_id])
        if clipped is None:
            problems.add('box_outside', ref)
            continue
        if clipped != box:
            problems.add('box_clipped', ref)
        clean = dict(ann, image_id=image_id, bbox=clipped, category_id=_integer_id(ann['category_id']),
                     iscrowd=_crowd_flag(ann.get('iscrowd', 0)),
                     area=float(ann['area']) if _is_number(ann.get('area')) and ann['area'] > 0
                     else clipped[2] * clipped[3])
        clean['id'] = len(annotations) + 1
        annotations.append(clean)
    categories = _normalise_categories(raw.get('categories'), {a['category_id'] for a in annotations}, path,
                                       num_classes, result.notes)
    result.dataset = {'images': images, 'annotations': annotations, 'categories': categories}
    for key in ('info', 'licenses'):
        if key in raw:
            result.dataset[key] = raw[key]
    return result


def read_annotation_file(path: str):
    """The parsed JSON of an annotation file (UTF-8, a byte order mark allowed); DataError naming `path`."""
    try:
        with open(path, encoding='utf-8-sig') as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f'{path}: annotation file not found') from None
    except json.JSONDecodeError as err:
        raise DataError(f'{path}: not valid JSON ({err})') from None
    except UnicodeDecodeError as err:
        raise DataError(f'{path}: not UTF-8 text (byte {err.start}); save the annotation file as UTF-8 JSON') from None
    except (IsADirectoryError, PermissionError) as err:
        raise DataError(f'{path}: cannot read the annotation file ({err.strerror})') from None


def load_annotations(path: str, num_classes: int, pair_names: PairNames = same_file_name,
                     image_sizes: Optional[ImageSizes] = None, strict: bool = True) -> NormalisedAnnotations:
    """Reads and normalises a COCO annotation file; with `strict` any error-severity problem raises DataError."""
    loaded = normalise_annotations(read_annotation_file(path), path, num_classes, pair_names, image_sizes)
    if strict:
        loaded.raise_errors()
    return loaded


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO index over an in-memory dict (its progress prints silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
