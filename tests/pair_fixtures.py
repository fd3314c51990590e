"""Helpers for tests that need a small paired data set on disk (imported by test_check*.py and test_bad_data.py).

`write_llvip(root)` writes the LLVIP layout (`visible/` and `infrared/` per split, `coco_annotations/LLVIP_*.json`)
with noisy, distinct frames and one box per image; the other helpers break one thing in it.
"""
import json
from pathlib import Path

import numpy as np
import PIL.Image

SPLIT_FOLDERS = {'train': 'train', 'val': 'test'}


def split_paths(root: Path, split: str) -> tuple[Path, Path, Path]:
    """(rgb folder, ir folder, annotation file) of a split of the LLVIP layout under root."""
    folder = SPLIT_FOLDERS[split]
    return root / 'visible' / folder, root / 'infrared' / folder, root / 'coco_annotations' / f'LLVIP_{folder}.json'


def frame(size, seed: int, channels: int) -> np.ndarray:
    """A noisy (H, W[, 3]) uint8 frame, different for every seed."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_llvip(root: Path, num_train: int = 4, num_val: int = 2, size=(64, 48), suffix: str = '.png',
                with_sizes: bool = True) -> Path:
    """Writes a clean LLVIP-layout data set under root (categories 1 'person', 2 'car'); returns root."""
    for split, count in (('train', num_train), ('val', num_val)):
        rgb_dir, ir_dir, ann_file = split_paths(root, split)
        for folder in (rgb_dir, ir_dir, ann_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for n in range(1, count + 1):
            name = f'{n:06d}{suffix}'
            seed = n + (0 if split == 'train' else 1000)
            PIL.Image.fromarray(frame(size, seed, 3)).save(rgb_dir / name)
            PIL.Image.fromarray(frame(size, seed + 500, 1)).save(ir_dir / name)
            image = {'id': n, 'file_name': name}
            if with_sizes:
                image.update(width=size[0], height=size[1])
            images.append(image)
            annotations.append({'id': n, 'image_id': n, 'bbox': [8, 6, 24, 20], 'category_id': 1 + n % 2,
                                'area': 480, 'iscrowd': 0})
        ann_file.write_text(json.dumps({'images': images, 'annotations': annotations,
                                        'categories': [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'}]}))
    return root


def edit_json(root: Path, split: str, edit) -> None:
    """Rewrites a split's annotation file with `edit(data)` applied (edit changes the dict in place)."""
    path = split_paths(root, split)[2]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def image_path(root: Path, split: str, modality: str, n: int = 1, suffix: str = '.png') -> Path:
    """Path of image number n of a split; modality 'rgb' or 'ir'."""
    rgb_dir, ir_dir, _ = split_paths(root, split)
    return (rgb_dir if modality == 'rgb' else ir_dir) / f'{n:06d}{suffix}'
