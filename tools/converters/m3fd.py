"""M3FD converter: the released ``Vis/``, ``Ir/``, ``Annotation/`` folders to the LLVIP-style layout.

Source (Liu et al., CVPR 2022; 4,200 registered 1024 x 768 pairs)::

    ROOT/Vis/NNNNN.png   RGB        ROOT/Ir/NNNNN.png   thermal        ROOT/Annotation/NNNNN.xml   Pascal VOC

M3FD has no official split: ``--val-list FILE`` names the validation pairs, or ``--val-ratio`` (default 0.2) of
them are drawn with ``--seed``. It is the generic converter (``tools/converters/generic.py``) with these folders
and :data:`M3FD_LABELS`: COCO's ids for its six classes, so a COCO-pretrained 91-wide head starts from the matching
classes: People 1 (person), Car 3, Motorcycle 4, Bus 6, Truck 8, Lamp 10 (COCO's nearest, traffic light).
``--label-map`` replaces the mapping. Output: ``--dataset_file llvip_fusion``.
"""
import os

from tools.converters import generic
from util.errors import DataError

M3FD_LABELS = {'People': 1, 'Car': 3, 'Motorcycle': 4, 'Bus': 6, 'Truck': 8, 'Lamp': 10}
FOLDERS = ('Vis', 'Ir', 'Annotation')


def convert(root: str, out_dir: str, val_list: str | None = None, val_ratio: float = 0.2, seed: int = 0,
            label_map: str | None = None, mode: str = 'copy'):
    """Convert the release under ``root``; returns the ``Report``."""
    missing = [name for name in FOLDERS if not os.path.isdir(os.path.join(root, name))]
    if missing:
        raise DataError(f'{root}: no {", ".join(f"{m}/" for m in missing)} folder; point --root at the M3FD release '
                        f'(it holds Vis/, Ir/ and Annotation/)')
    rgb, ir, labels = (os.path.join(root, name) for name in FOLDERS)
    return generic.convert(rgb, ir, labels, out_dir, 'voc', label_map=label_map, val_list=val_list,
                           val_ratio=val_ratio, seed=seed, mode=mode, command='m3fd', source=root,
                           default_labels=M3FD_LABELS)
