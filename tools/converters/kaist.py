"""KAIST converter: the original release, or its sanitized / improved annotations, to the ``kaist_fusion`` layout.

Source (Hwang et al., CVPR 2015; the frames are 640 x 512, not 640 x 480 as the release's README says)::

    IMAGES/setXX/VYYY/visible/I#####.jpg      RGB
    IMAGES/setXX/VYYY/lwir/I#####.jpg         thermal
    ANNOTATIONS/...                           one file per frame, the first found of
        setXX/VYYY/I#####.{txt,xml}, setXX/VYYY/visible/I#####.{txt,xml}, setXX_VYYY_I#####.{txt,xml}
    split lists (train-all-02.txt, test-all-20.txt): one frame name setXX/VYYY/I##### per line

Annotation formats (the sanitized training and improved test annotations use the same two):
- bbGt text: a ``% bbGt version=3`` header, then ``lbl x y w h occ vx vy vw vh ign ang`` per box (pixels; occ 0
  none, 1 partial, 2 heavy; ign 1 marks an ignore region).
- per-frame XML: ``<object><name>lbl</name><bndbox><x/><y/><w/><h/></bndbox><occlusion>occ</occlusion>`` (xywh;
  ``xmin``... corners are accepted too).

Output: the LLVIP-style layout that ``--dataset_file kaist_fusion`` reads, file names ``setXX/VYYY/I#####.jpg``
kept, image ids the frame names (strings), ``time_of_day`` per image, every box written by
``datasets.kaist.kaist_annotation`` (``category_id`` 1, ``label``, ``height``, ``occlusion``, ``ignore`` =
``iscrowd`` for ``people`` / ``cyclist`` / ``person?`` and for persons the reasonable setting excludes). A frame in a
list without both images or without an annotation file is skipped by name.
"""
import os
import re
import xml.etree.ElementTree as ElementTree

from datasets.kaist import CATEGORIES, FRAME_NAME, kaist_annotation, time_of_day
from tools.converters.common import LLVIP, SPLITS, Conversion, Pair, read_name_list
from tools.converters.labels import LabelFileError, read_voc
from util.errors import DataError, UsageError

ANNOTATION_FOLDERS = ('annotations-xml-new-sanitized', 'annotations-xml-new', 'annotations')
IMAGE_EXTENSIONS = ('.jpg', '.png')
FLAT_FRAME = re.compile(r'(set\d\d)_(V\d\d\d)_(I\d{5})')


def frame_name(line: str) -> str | None:
    """The frame name ``setXX/VYYY/I#####`` in a list line (extension, leading folders, ``_`` separators allowed)."""
    text = os.path.splitext(line.strip().replace('\\', '/'))[0]
    flat = FLAT_FRAME.search(text)
    if flat:
        return '/'.join(flat.groups())
    parts = text.split('/')
    candidate = '/'.join(parts[-3:])
    return candidate if FRAME_NAME.match(candidate) else None


def read_bbgt(path: str) -> list[tuple[str, list[float], int, bool]]:
    """[(label, [x, y, w, h], occlusion, ignore flag)] of a bbGt text file."""
    boxes = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith('%'):
                continue
            try:
                xywh = [float(v) for v in fields[1:5]]
                occlusion = int(float(fields[5])) if len(fields) > 5 else 0
                flagged = len(fields) > 10 and int(float(fields[10])) == 1
            except ValueError:
                raise LabelFileError(f'{path}:{number}: expected "lbl x y w h occ ...", got {line.strip()!r}') from None
            if len(xywh) != 4:
                raise LabelFileError(f'{path}:{number}: expected "lbl x y w h occ ...", got {line.strip()!r}')
            boxes.append((fields[0], xywh, occlusion, flagged))
    return boxes


def read_kaist_xml(path: str) -> list[tuple[str, list[float], int, bool]]:
    """[(label, [x, y, w, h], occlusion, False)] of a per-frame KAIST XML file (xywh or VOC corners)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as err:
        raise LabelFileError(f'{path}: not readable XML ({err})') from None
    if any(obj.find('bndbox/xmin') is not None for obj in root.iter('object')):
        return [(name, [x0, y0, x1 - x0, y1 - y0], 0, False) for name, (x0, y0, x1, y1) in read_voc(path)[1]]
    boxes = []
    for obj in root.iter('object'):
        try:
            xywh = [float(obj.findtext(f'bndbox/{tag}')) for tag in ('x', 'y', 'w', 'h')]
            occlusion = int(float(obj.findtext('occlusion') or 0))
        except (TypeError, ValueError):
            raise LabelFileError(f'{path}: an <object> lacks numeric <bndbox><x><y><w><h> or <occlusion>') from None
        boxes.append(((obj.findtext('name') or '').strip(), xywh, occlusion, False))
    return boxes


def find_annotation(folder: str, frame: str) -> str | None:
    """The annotation file of ``frame`` under ``folder`` (the candidates of the module docstring), or None."""
    set_name, video, image = frame.split('/')
    stems = (os.path.join(folder, set_name, video, image), os.path.join(folder, set_name, video, 'visible', image),
             os.path.join(folder, f'{set_name}_{video}_{image}'))
    for stem in stems:
        for ext in ('.txt', '.xml'):
            if os.path.isfile(stem + ext):
                return stem + ext
    return None


def _frame_image(images: str, frame: str, modality: str) -> str:
    set_name, video, image = frame.split('/')
    base = os.path.join(images, set_name, video, modality, image)
    return next((base + ext for ext in IMAGE_EXTENSIONS if os.path.isfile(base + ext)), base + IMAGE_EXTENSIONS[0])


def _default_annotations(root: str) -> str:
    tried = [os.path.join(root, name) for name in ANNOTATION_FOLDERS]
    found = next((path for path in tried if os.path.isdir(path)), None)
    if found is None:
        raise DataError(f'no KAIST annotation folder found; tried {", ".join(tried)}; pass --annotations DIR')
    return found


def convert(root: str, out_dir: str, train_list: str | None = None, val_list: str | None = None,
            images: str | None = None, annotations: str | None = None, train_annotations: str | None = None,
            val_annotations: str | None = None, mode: str = 'copy'):
    """Convert the frames named in the split lists; returns the ``Report`` (see ``tools/converters/common.py``)."""
    if not train_list and not val_list:
        raise UsageError('kaist: give --train-list and/or --val-list (e.g. train-all-02.txt, test-all-20.txt)')
    images = images or (os.path.join(root, 'images') if os.path.isdir(os.path.join(root, 'images')) else root)
    if not os.path.isdir(images):
        raise DataError(f'{images}: KAIST image folder not found (expected setXX/VYYY/{{visible,lwir}}/ inside)')
    lists = {'train': train_list, 'val': val_list}
    folders = {'train': train_annotations, 'val': val_annotations}
    conversion = Conversion('kaist', root, out_dir, LLVIP, [dict(c) for c in CATEGORIES], 'kaist_fusion', mode)
    for split in SPLITS:
        if not lists[split]:
            continue
        folder = folders[split] or annotations or _default_annotations(root)
        for line in read_name_list(lists[split]):
            frame = frame_name(line)
            if frame is None:
                conversion.skip(line, f'not a KAIST frame name setXX/VYYY/I##### (in {lists[split]})')
                continue
            _add_frame(conversion, split, frame, images, folder)
    return conversion.write()


def _add_frame(conversion: Conversion, split: str, frame: str, images: str, folder: str) -> None:
    rgb, ir = _frame_image(images, frame, 'visible'), _frame_image(images, frame, 'lwir')
    size = conversion.probe_pair(frame, rgb, ir)
    if size is None:
        return
    path = find_annotation(folder, frame)
    if path is None:
        conversion.skip(frame, f'no annotation file for it under {folder}')
        return
    try:
        boxes = read_bbgt(path) if path.endswith('.txt') else read_kaist_xml(path)
    except LabelFileError as err:
        conversion.skip(frame, str(err))
        return
    width, height = size
    written = []
    for label, xywh, occlusion, flagged in boxes:
        if xywh[2] <= 0 or xywh[3] <= 0:
            conversion.drop_box(frame, 'box without area')
            continue
        ann, reason = kaist_annotation(label, xywh, occlusion, width, height)
        if flagged and reason is None:
            ann.update(ignore=1, iscrowd=1)
            reason = 'flagged'
        if reason is not None:
            conversion.count_ignored(split, reason)
        written.append(ann)
    rgb_name, ir_name = frame + os.path.splitext(rgb)[1], frame + os.path.splitext(ir)[1]
    conversion.add(Pair(frame, split, rgb, ir, rgb_name, ir_name, frame, width, height, written,
                        {'time_of_day': time_of_day(frame)}))
