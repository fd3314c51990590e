"""Where the images and the annotation file of each supported data set live on disk.

Follows the directory layouts read by CAFF-DINO (kevinhelvig/CAFF-DETR, `datasets/coco.py` build_RGBT_LLVIP /
build_RGBT_FLIR) and also accepts the spellings its README shows:

LLVIP (`llvip_fusion`, and `synthetic`, which `datasets/synthetic.py` writes in this layout; also `kaist_fusion`,
which `tools/convert.py kaist` writes with NAME = setXX/VYYY/I#####.jpg and train.json / val.json)::

    root/visible/{train,test}/NAME        RGB image
    root/infrared/{train,test}/NAME       thermal image with the same NAME
    root/coco_annotations/LLVIP_train.json, LLVIP_test.json   (reference code)
                       or train.json,       val.json          (reference README)

FLIR (`flir_fusion`)::

    root/{train,val}_RGB/, root/{train,val}_thermal/, root/annotations/{train,val}.json
    each image entry names its pair with file_name_RGB + file_name_IR (reference code)
                                      or file_name + image_IR        (reference README)

What differs from the reference: the README spellings are accepted, the file that was found is reported, and a
missing folder or annotation file is an error that lists every path that was tried.
"""
import os
from dataclasses import dataclass

DATASET_FILES = ('llvip_fusion', 'flir_fusion', 'synthetic', 'kaist_fusion')
IMAGE_SETS = ('train', 'val')

# Key pairs an image entry may use to name its RGB and IR files, tried in this order.
FLIR_NAME_KEYS = (('file_name_RGB', 'file_name_IR'), ('file_name', 'image_IR'))
LLVIP_NAME_KEYS = (('file_name', 'file_name'),)


@dataclass(frozen=True)
class PairLayout:
    """Resolved location of one split: the two image folders, the annotation file and how to name a pair."""
    rgb_dir: str
    ir_dir: str
    annotation_file: str
    name_keys: tuple[tuple[str, str], ...]

    def pair_names(self, image: dict) -> tuple[str, str]:
        """(rgb file name, ir file name) of a COCO `images` entry, using the first key pair it carries."""
        for rgb_key, ir_key in self.name_keys:
            if rgb_key in image and ir_key in image:
                return str(image[rgb_key]), str(image[ir_key])
        accepted = ' or '.join(f'{a!r}+{b!r}' if a != b else repr(a) for a, b in self.name_keys)
        raise KeyError(f'image entry has keys {sorted(image)}; it must name its files with {accepted}')


def _first_existing(paths: list[str], what: str) -> str:
    for path in paths:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f'no {what} found; tried: {", ".join(paths)}')


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{what} folder not found: {path} (check --coco_path and --dataset_file)')
    return path


def llvip_layout(root: str, image_set: str) -> PairLayout:
    """LLVIP layout; the 'val' split reads the `test` folders, as the reference does."""
    split = 'train' if image_set == 'train' else 'test'
    ann_dir = os.path.join(root, 'coco_annotations')
    candidates = [os.path.join(ann_dir, f'LLVIP_{split}.json'), os.path.join(ann_dir, f'{image_set}.json')]
    return PairLayout(
        rgb_dir=_require_dir(os.path.join(root, 'visible', split), 'LLVIP RGB'),
        ir_dir=_require_dir(os.path.join(root, 'infrared', split), 'LLVIP infrared'),
        annotation_file=_first_existing(candidates, f'LLVIP {image_set} annotation file'),
        name_keys=LLVIP_NAME_KEYS)


def flir_layout(root: str, image_set: str) -> PairLayout:
    """FLIR aligned layout: `{train,val}_RGB`, `{train,val}_thermal`, `annotations/{train,val}.json`."""
    ann = os.path.join(root, 'annotations', f'{image_set}.json')
    return PairLayout(
        rgb_dir=_require_dir(os.path.join(root, f'{image_set}_RGB'), 'FLIR RGB'),
        ir_dir=_require_dir(os.path.join(root, f'{image_set}_thermal'), 'FLIR thermal'),
        annotation_file=_first_existing([ann], f'FLIR {image_set} annotation file'),
        name_keys=FLIR_NAME_KEYS)


def resolve_layout(dataset_file: str, root: str, image_set: str) -> PairLayout:
    """The layout of `dataset_file` ('llvip_fusion' | 'flir_fusion' | 'synthetic' | 'kaist_fusion') under `root`."""
    if image_set not in IMAGE_SETS:
        raise ValueError(f'image_set must be one of {IMAGE_SETS}, got {image_set!r}')
    if not root:
        raise ValueError(f'coco_path is empty: pass --coco_path pointing at the {dataset_file} data root')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'coco_path {root!r} is not a folder (dataset_file={dataset_file!r})')
    if dataset_file in ('llvip_fusion', 'synthetic', 'kaist_fusion'):
        return llvip_layout(root, image_set)
    if dataset_file == 'flir_fusion':
        return flir_layout(root, image_set)
    raise ValueError(f'unknown dataset_file {dataset_file!r}; expected one of {DATASET_FILES}')
