"""FLIR-aligned converter: the published release to the ``flir_fusion`` layout.

Source (the aligned subset of FLIR ADAS v1 by Zhang et al., ICIP 2020; ROOT may also hold it under ``align/``)::

    ROOT/JPEGImages/FLIR_#####_RGB.jpg            RGB, registered to the thermal frame
    ROOT/JPEGImages/FLIR_#####_PreviewData.jpeg   thermal
    ROOT/Annotations/FLIR_#####_PreviewData.xml   Pascal VOC XML (FLIR_#####.xml is accepted too)
    ROOT/align_train.txt, ROOT/align_validation.txt   one FLIR_##### per line (ROOT/ImageSets/Main/ also searched;
                                                  a _PreviewData / _RGB suffix or an extension is ignored)

Output: ``OUT/{train,val}_RGB/``, ``OUT/{train,val}_thermal/`` (file names kept), ``OUT/annotations/{train,val}.json``
with ``file_name_RGB`` / ``file_name_IR``; the image id is the frame number (FLIR_08863 -> 8863).

Category ids are COCO's, as the released CAFF-DINO FLIR checkpoints expect in their 91-wide head (and as FLIR
numbers its own classes): person 1, bicycle 2, car 3 (:data:`FLIR_LABELS`). Other classes (the few ``dog`` boxes)
are dropped and counted unless ``--label-map`` maps them.
"""
import os
import re

from tools.converters.common import (FLIR, SPLITS, Conversion, Pair, add_labelled_boxes, categories_from_map,
                                     load_label_map, read_name_list)
from tools.converters.labels import LabelFileError, read_voc
from util.errors import DataError

FLIR_LABELS = {'person': 1, 'bicycle': 2, 'car': 3}
LIST_FILES = {'train': 'align_train.txt', 'val': 'align_validation.txt'}
FRAME = re.compile(r'(FLIR_\d+)')


def source_root(root: str) -> str:
    """``root``, or ``root/align`` when the release is nested there; the folder that holds JPEGImages/."""
    for candidate in (root, os.path.join(root, 'align')):
        if os.path.isdir(os.path.join(candidate, 'JPEGImages')):
            return candidate
    raise DataError(f'{root}: no JPEGImages/ folder (nor align/JPEGImages/); point --root at the FLIR-aligned release')


def split_list(root: str, split: str) -> str:
    tried = [os.path.join(root, LIST_FILES[split]), os.path.join(root, 'ImageSets', 'Main', LIST_FILES[split])]
    found = next((path for path in tried if os.path.isfile(path)), None)
    if found is None:
        raise DataError(f'no {LIST_FILES[split]} found; tried {", ".join(tried)}')
    return found


def convert(root: str, out_dir: str, label_map: str | None = None, mode: str = 'copy'):
    """Convert both splits of the release under ``root``; returns the ``Report``."""
    root = source_root(root)
    labels = load_label_map(label_map, FLIR_LABELS)
    conversion = Conversion('flir', root, out_dir, FLIR, categories_from_map(labels), 'flir_fusion', mode)
    for split in SPLITS:
        listed = split_list(root, split)
        for line in read_name_list(listed):
            match = FRAME.search(line)
            if match is None:
                conversion.skip(line, f'not a FLIR_##### name (in {listed})')
                continue
            _add_frame(conversion, root, split, match.group(1), labels)
    return conversion.write()


def _add_frame(conversion: Conversion, root: str, split: str, frame: str, labels: dict[str, int]) -> None:
    rgb_name, ir_name = f'{frame}_RGB.jpg', f'{frame}_PreviewData.jpeg'
    rgb, ir = os.path.join(root, 'JPEGImages', rgb_name), os.path.join(root, 'JPEGImages', ir_name)
    size = conversion.probe_pair(frame, rgb, ir)
    if size is None:
        return
    candidates = [os.path.join(root, 'Annotations', f'{frame}{suffix}.xml') for suffix in ('_PreviewData', '', '_RGB')]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        conversion.skip(frame, f'no annotation file {candidates[0]}')
        return
    try:
        _, objects = read_voc(path)
    except LabelFileError as err:
        conversion.skip(frame, str(err))
        return
    annotations = add_labelled_boxes(conversion, frame, objects, labels)
    conversion.add(Pair(frame, split, rgb, ir, rgb_name, ir_name, int(frame.split('_')[1]), *size, annotations))
