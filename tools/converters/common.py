"""What every converter shares: the output layouts, pairing checks, splits, label maps, and the writing step.

A converter reads its source format and hands a :class:`Conversion` one :class:`Pair` per image pair (or a skip
with its reason); ``Conversion.write()`` then writes one of the two output layouts that ``datasets/layouts.py``
reads, and returns the :class:`Report`:

    llvip   OUT/visible/{train,test}/NAME, OUT/infrared/{train,test}/NAME, OUT/coco_annotations/{train,val}.json
            (one ``file_name`` per image: the two files share NAME)
    flir    OUT/{train,val}_RGB/NAME_RGB, OUT/{train,val}_thermal/NAME_IR, OUT/annotations/{train,val}.json
            (``file_name_RGB`` + ``file_name_IR``)

Rules every converter follows:
- Unpaired images are refused by name: an entry whose RGB or thermal file is missing, unreadable or of another
  size is skipped and listed in the report with the reason; nothing else about it is written.
- Idempotent: the same source and options give byte-identical JSON and report files, and files already in
  place are not rewritten (a copy whose size and modification time match its source, the same hard link, the
  same symlink target). A second run reports everything as up to date.
- Deterministic: pairs are written in name order, annotation ids run 1..M per split in that order. A split
  without pairs gets no annotation file (the report says so).
- ``category_id`` is the class index of the head (``num_classes`` > the largest id); the report states the
  mapping. Boxes of unmapped classes or without area are dropped from the file and counted per reason.
"""
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tools.converters.files import MODES, image_size, place_file, write_if_changed
from tools.converters.report import Report
from util.errors import DataError, UsageError

SPLITS = ('train', 'val')
REPORT_FILE = 'conversion_report.json'
EXAMPLES = 5


@dataclass(frozen=True)
class OutputLayout:
    """Where one output layout puts the images and annotation file of a split, and how an image names its files."""
    name: str
    rgb_dir: str
    ir_dir: str
    annotation_file: str
    folders: tuple[tuple[str, str], ...]
    name_keys: tuple[str, str] | None  # None: one shared 'file_name'

    def folder(self, split: str) -> str:
        return dict(self.folders)[split]


LLVIP = OutputLayout('llvip', 'visible/{folder}', 'infrared/{folder}', 'coco_annotations/{split}.json',
                     (('train', 'train'), ('val', 'test')), None)
FLIR = OutputLayout('flir', '{folder}_RGB', '{folder}_thermal', 'annotations/{split}.json',
                    (('train', 'train'), ('val', 'val')), ('file_name_RGB', 'file_name_IR'))
LAYOUTS = {layout.name: layout for layout in (LLVIP, FLIR)}


@dataclass
class Pair:
    """One image pair to write: its source files, output names, COCO image id and size, and its boxes.

    ``annotations``: dicts with ``bbox`` [x, y, w, h] (pixels) and ``category_id``, plus any extra fields (KAIST
    writes ``label``, ``height``, ``occlusion``, ``ignore``, ``iscrowd``); ``extra``: extra image-entry fields.
    """
    name: str
    split: str
    rgb: str
    ir: str
    rgb_name: str
    ir_name: str
    image_id: int | str
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def read_name_list(path: str) -> list[str]:
    """The non-empty lines of a split list (``#`` comments and surrounding blanks removed), in file order."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: split list not found; pass an existing file')
    with open(path, encoding='utf-8') as f:
        names = [line.split('#', 1)[0].strip() for line in f]
    return [name for name in names if name]


def seeded_split(names: list[str], val_ratio: float, seed: int) -> dict[str, str]:
    """{name: 'train' | 'val'}: round(val_ratio * N) names drawn for val by a generator seeded with ``seed``.

    The draw is over the sorted names, so it depends only on the set of names, the ratio and the seed.
    """
    if not 0 <= val_ratio <= 1:
        raise UsageError(f'--val-ratio {val_ratio} must lie in [0, 1]')
    ordered = sorted(names)
    val = set(np.random.default_rng(seed).permutation(len(ordered))[:int(round(val_ratio * len(ordered)))].tolist())
    return {name: 'val' if i in val else 'train' for i, name in enumerate(ordered)}


def load_label_map(path: str | None, default: dict[str, int]) -> dict[str, int]:
    """Class name -> category id: ``default``, or the JSON object {name: id} in ``path`` (ids >= 0 integers)."""
    if path is None:
        return dict(default)
    try:
        with open(path, encoding='utf-8') as f:
            mapping = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f'{path}: cannot read the label map ({err}); expected a JSON object {{"name": id}}') from None
    if not isinstance(mapping, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mapping.values()):
        raise UsageError(f'{path}: the label map must be a JSON object of class name -> integer id >= 0')
    return {str(k): v for k, v in mapping.items()}


class Conversion:
    """Collects the pairs, skips and dropped boxes of one conversion, then writes the layout and the report."""

    def __init__(self, command: str, source: str, out_dir: str, layout: OutputLayout, categories: list[dict],
                 dataset_file: str, mode: str = 'copy'):
        if mode not in MODES:
            raise UsageError(f'--mode {mode!r}: expected one of {MODES}')
        self.out_dir, self.layout, self.mode = out_dir, layout, mode
        self.categories = sorted(categories, key=lambda c: c['id'])
        self.report = Report(command, os.path.abspath(source), out_dir, layout.name, dataset_file, self.categories)
        self.pairs: list[Pair] = []
        self._ignored = {split: Counter() for split in SPLITS}
        self._dropped: dict[str, list[str]] = {}
        self._notes = Counter()

    def skip(self, entry: str, reason: str) -> None:
        """Refuse an entry: it is not written and the report names it with ``reason``."""
        self.report.skipped.append([entry, reason])

    def drop_box(self, entry: str, reason: str) -> None:
        """Leave one box of ``entry`` out of the annotation file, counted under ``reason``."""
        self._dropped.setdefault(reason, []).append(entry)

    def note(self, what: str) -> None:
        """Count something the report should mention (e.g. pairs kept without a label file)."""
        self._notes[what] += 1

    def count_ignored(self, split: str, reason: str) -> None:
        """Count an ignore region written for ``split`` (the report lists them per reason)."""
        self._ignored[split][reason] += 1

    def probe_pair(self, entry: str, rgb: str, ir: str) -> tuple[int, int] | None:
        """(width, height) of a usable pair; otherwise the entry is skipped by name with the reason, and None."""
        missing = [(kind, path) for kind, path in (('RGB', rgb), ('thermal', ir)) if not os.path.isfile(path)]
        if len(missing) == 2:
            self.skip(entry, f'no RGB image {rgb} and no thermal image {ir}')
            return None
        if missing:
            kind, path = missing[0]
            self.skip(entry, f'unpaired: no {kind} image {path}')
            return None
        sizes = []
        for path in (rgb, ir):
            try:
                sizes.append(image_size(path))
            except (OSError, SyntaxError, ValueError) as err:
                self.skip(entry, f'unreadable image {path} ({type(err).__name__})')
                return None
        if sizes[0] != sizes[1]:
            self.skip(entry, f'RGB is {sizes[0][0]}x{sizes[0][1]} but thermal is {sizes[1][0]}x{sizes[1][1]}; '
                             f'the pair must be registered to one size')
            return None
        return sizes[0]

    def add(self, pair: Pair) -> None:
        """Queue a pair for writing; in the llvip layout its two output names must agree, else it is skipped."""
        if self.layout.name_keys is None and pair.rgb_name != pair.ir_name:
            self.skip(pair.name, f'RGB and thermal names differ ({pair.rgb_name}, {pair.ir_name}); the '
                                 f'{self.layout.name} layout needs one name per pair (use --layout flir)')
            return
        self.pairs.append(pair)

    def _unique_pairs(self) -> list[Pair]:
        """Pairs in name order; a second pair with the same image id or output file is skipped by name."""
        kept, seen = [], {}
        for pair in sorted(self.pairs, key=lambda p: (SPLITS.index(p.split), p.name)):
            keys = [('id', pair.image_id), (pair.split, pair.rgb_name), (pair.split, pair.ir_name, 'ir')]
            clash = next((seen[k] for k in keys if k in seen), None)
            if clash is not None:
                self.skip(pair.name, f'same image id or output file as {clash}')
                continue
            seen.update({k: pair.name for k in keys})
            kept.append(pair)
        return kept

    def _image_entry(self, pair: Pair) -> dict:
        names = {'file_name': pair.rgb_name} if self.layout.name_keys is None else \
            dict(zip(self.layout.name_keys, (pair.rgb_name, pair.ir_name)))
        return {'id': pair.image_id, **names, 'width': pair.width, 'height': pair.height, **pair.extra}

    def write(self) -> Report:
        """Write the images, one annotation file per split that has pairs, and conversion_report.json."""
        pairs = self._unique_pairs()
        report = self.report
        for split in SPLITS:
            self._write_split(split, [p for p in pairs if p.split == split])
        report.skipped.sort()
        report.notes = dict(sorted(self._notes.items()))
        report.dropped_boxes = {reason: {'count': len(entries), 'examples': sorted(set(entries))[:EXAMPLES]}
                                for reason, entries in sorted(self._dropped.items())}
        write_if_changed(os.path.join(self.out_dir, REPORT_FILE),
                         json.dumps(report.to_dict(), indent=1, sort_keys=True) + '\n')
        return report

    def _write_split(self, split: str, pairs: list[Pair]) -> None:
        """Place the images of one split and write its annotation file (none for a split without pairs)."""
        report, folder = self.report, self.layout.folder(split)
        names = {c['id']: c['name'] for c in self.categories}
        images, annotations, boxes = [], [], Counter()
        for pair in pairs:
            for src, directory, name in ((pair.rgb, self.layout.rgb_dir, pair.rgb_name),
                                         (pair.ir, self.layout.ir_dir, pair.ir_name)):
                if place_file(src, os.path.join(self.out_dir, directory.format(folder=folder), name), self.mode):
                    report.files_written += 1
                else:
                    report.files_up_to_date += 1
            images.append(self._image_entry(pair))
            for ann in pair.annotations:
                annotations.append({**ann, 'id': len(annotations) + 1, 'image_id': pair.image_id})
                boxes[ann.get('label', names[ann['category_id']])] += 1
        report.splits[split] = {'pairs': len(images), 'boxes': dict(sorted(boxes.items())),
                                'ignored': dict(sorted(self._ignored[split].items()))}
        if not images:
            return
        path = os.path.join(self.out_dir, self.layout.annotation_file.format(split=split))
        coco = {'images': images, 'annotations': annotations, 'categories': self.categories}
        if write_if_changed(path, json.dumps(coco, indent=1, sort_keys=True) + '\n'):
            report.annotations_written.append(path)
        report.annotation_files[split] = path


def categories_from_map(label_map: dict[str, int]) -> list[dict]:
    """COCO categories of a label map, one per id (the first name given for an id names it), by id."""
    by_id: dict[int, str] = {}
    for name, category_id in label_map.items():
        by_id.setdefault(category_id, name)
    return [{'id': category_id, 'name': name} for category_id, name in sorted(by_id.items())]


def box_annotation(xyxy, category_id: int) -> dict:
    """A COCO annotation (without ids) of a box given as x0, y0, x1, y1 pixels."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return {'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0), 'category_id': int(category_id),
            'iscrowd': 0}


def add_labelled_boxes(conversion: Conversion, entry: str, objects, label_map: dict[str, int]) -> list[dict]:
    """Annotations of ``(class name, (x0, y0, x1, y1))`` objects; unmapped classes and empty boxes are dropped."""
    lowered = {name.lower(): cid for name, cid in label_map.items()}
    annotations = []
    for name, xyxy in objects:
        category_id = lowered.get(str(name).lower())
        if category_id is None:
            conversion.drop_box(entry, f'class {name!r} not in the label map')
        elif xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
            conversion.drop_box(entry, 'box without area')
        else:
            annotations.append(box_annotation(xyxy, category_id))
    return annotations
