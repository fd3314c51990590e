"""Generic converter: a folder of RGB images, a folder of thermal images and a folder of VOC or YOLO labels.

Source::

    RGB_DIR/KEY[RGB_SUFFIX].ext     e.g. 0001.jpg, or 0001_rgb.jpg with --rgb-suffix _rgb
    IR_DIR/KEY[IR_SUFFIX].ext       the same KEY; any image extension (.jpg .jpeg .png .bmp .tif .tiff)
    LABELS_DIR/KEY.xml (VOC) or KEY.txt (YOLO; also named after the RGB file's stem)

Images are paired by KEY; an image without a partner is refused by name. A pair without a label file is kept as
an image without boxes (YOLO writes none for background images) and counted in the report.

Category ids (the class index of the head; 0 is left unused, as ``datasets/synthetic.py`` does): ``--label-map
FILE.json`` ({name: id}) when given, else the names of ``--classes`` in order -> 1..K (YOLO's index i -> i + 1),
else (VOC only) every class name found, sorted -> 1..K. Boxes of other classes are dropped and counted.

Split: ``--val-list FILE`` (the KEYs of the validation pairs, one per line; the rest train) or a seeded draw of
``--val-ratio`` of the pairs (``tools/converters/common.py::seeded_split``).

Output: the ``llvip`` layout (OUT/visible, OUT/infrared, OUT/coco_annotations; both files named KEY.ext, so the
two extensions must agree) or the ``flir`` layout (original file names). Image ids: KEY as an int when it is all
digits, else the KEY string (mapped to ints when read, the originals kept in results).
"""
import os

from tools.converters.common import (LAYOUTS, Conversion, Pair, add_labelled_boxes, categories_from_map,
                                     load_label_map, read_name_list, seeded_split)
from tools.converters.labels import LabelFileError, read_voc, read_yolo
from util.errors import DataError, UsageError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
LABEL_FORMATS = ('voc', 'yolo')
DATASET_FILES = {'llvip': 'llvip_fusion', 'flir': 'flir_fusion'}


def _images_by_key(conversion: Conversion, folder: str, suffix: str, kind: str) -> dict[str, str]:
    """{KEY: path} of the images in ``folder`` (KEY = stem without ``suffix``); a second file of a KEY is skipped."""
    if not os.path.isdir(folder):
        raise DataError(f'{folder}: {kind} image folder not found')
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(os.path.join(folder, name)):
            continue
        key = stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem
        if key in found:
            conversion.skip(os.path.join(folder, name), f'a second {kind} image for {key} '
                                                        f'({os.path.basename(found[key])} is used)')
            continue
        found[key] = os.path.join(folder, name)
    return found


def _label_file(labels_dir: str, key: str, rgb: str, label_format: str) -> str | None:
    ext = '.xml' if label_format == 'voc' else '.txt'
    stems = (key, os.path.splitext(os.path.basename(rgb))[0])
    return next((os.path.join(labels_dir, s + ext) for s in stems if os.path.isfile(os.path.join(labels_dir, s + ext))),
                None)


def _label_map(label_format: str, classes: list[str] | None, label_map: str | None,
               default: dict[str, int] | None, labels_dir: str) -> dict[str, int]:
    if label_format == 'yolo' and not classes:
        raise UsageError('generic --format yolo needs --classes NAME ... (YOLO files hold class indices)')
    if label_map or default:
        return load_label_map(label_map, default or {})
    if classes:
        return {name: i for i, name in enumerate(classes, start=1)}
    names = set()
    for name in sorted(os.listdir(labels_dir)):
        if name.endswith('.xml'):
            try:
                names.update(n for n, _ in read_voc(os.path.join(labels_dir, name))[1])
            except LabelFileError:
                continue  # reported when its pair is converted
    return {name: i for i, name in enumerate(sorted(names), start=1)}


def convert(rgb_dir: str, ir_dir: str, labels_dir: str, out_dir: str, label_format: str = 'voc',
            classes: list[str] | None = None, label_map: str | None = None, val_list: str | None = None,
            val_ratio: float = 0.2, seed: int = 0, layout: str = 'llvip', rgb_suffix: str = '',
            ir_suffix: str = '', mode: str = 'copy', command: str = 'generic', source: str | None = None,
            default_labels: dict[str, int] | None = None):
    """Convert paired folders with VOC or YOLO labels; returns the ``Report``. ``m3fd`` calls this with its defaults."""
    if label_format not in LABEL_FORMATS:
        raise UsageError(f'--format {label_format!r}: expected one of {LABEL_FORMATS}')
    if layout not in LAYOUTS:
        raise UsageError(f'--layout {layout!r}: expected one of {tuple(LAYOUTS)}')
    if not os.path.isdir(labels_dir):
        raise DataError(f'{labels_dir}: label folder not found')
    labels = _label_map(label_format, classes, label_map, default_labels, labels_dir)
    conversion = Conversion(command, source or os.path.commonpath([os.path.abspath(rgb_dir), os.path.abspath(ir_dir)]),
                            out_dir, LAYOUTS[layout], categories_from_map(labels), DATASET_FILES[layout], mode)
    rgb_images = _images_by_key(conversion, rgb_dir, rgb_suffix, 'RGB')
    ir_images = _images_by_key(conversion, ir_dir, ir_suffix, 'thermal')
    for key in sorted(set(rgb_images) ^ set(ir_images)):
        kind, folder = ('thermal', ir_dir) if key in rgb_images else ('RGB', rgb_dir)
        present = rgb_images.get(key) or ir_images.get(key)
        conversion.skip(key, f'unpaired: {present} has no {kind} partner in {folder}')
    keys = sorted(set(rgb_images) & set(ir_images))
    splits = _splits(conversion, keys, val_list, val_ratio, seed)
    for key in keys:
        _add_pair(conversion, key, splits[key], rgb_images[key], ir_images[key], labels_dir, label_format, labels,
                  classes or [])
    return conversion.write()


def _splits(conversion: Conversion, keys: list[str], val_list: str | None, val_ratio: float,
            seed: int) -> dict[str, str]:
    if val_list is None:
        return seeded_split(keys, val_ratio, seed)
    listed = {os.path.splitext(os.path.basename(line))[0] for line in read_name_list(val_list)}
    for name in sorted(listed - set(keys)):
        conversion.skip(name, f'listed in {val_list} but no image pair has this name')
    return {key: 'val' if key in listed else 'train' for key in keys}


def _add_pair(conversion: Conversion, key: str, split: str, rgb: str, ir: str, labels_dir: str, label_format: str,
              labels: dict[str, int], classes: list[str]) -> None:
    size = conversion.probe_pair(key, rgb, ir)
    if size is None:
        return
    path = _label_file(labels_dir, key, rgb, label_format)
    objects = []
    if path is None:
        conversion.note('pairs without a label file (kept without boxes)')
    else:
        try:
            objects = read_voc(path)[1] if label_format == 'voc' else read_yolo(path, *size, classes)
        except LabelFileError as err:
            conversion.skip(key, str(err))
            return
    annotations = add_labelled_boxes(conversion, key, objects, labels)
    if conversion.layout.name_keys is None:
        rgb_name, ir_name = key + os.path.splitext(rgb)[1], key + os.path.splitext(ir)[1]
    else:
        rgb_name, ir_name = os.path.basename(rgb), os.path.basename(ir)
    image_id = int(key) if key.isdigit() else key
    conversion.add(Pair(key, split, rgb, ir, rgb_name, ir_name, image_id, *size, annotations))
