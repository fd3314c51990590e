"""LLVIP / FLIR / synthetic directory layouts on tiny on-disk fixtures, read end to end."""
import json

import numpy as np
import PIL.Image
import pytest

from datasets.layouts import flir_layout, llvip_layout, resolve_layout
from datasets.pairs import PairedCocoDataset


def save_pair(rgb_path, ir_path, size=(32, 24)):
    rgb_path.parent.mkdir(parents=True, exist_ok=True)
    ir_path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new('RGB', size, (10, 200, 10)).save(rgb_path)
    PIL.Image.new('L', size, 250).save(ir_path)


def assert_rgb_and_ir(rgb, ir):
    """The green RGB file was read as `rgb`, the bright grey IR file as `ir` (three equal channels); JPEG tolerant."""
    r, g, b = np.asarray(rgb)[0, 0].tolist()
    assert g > 180 and r < 40 and b < 40
    assert len(set(np.asarray(ir)[0, 0].tolist())) == 1 and np.asarray(ir)[0, 0, 0] > 230


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def llvip_tree(root, split='train', ann_name='LLVIP_train.json'):
    save_pair(root / 'visible' / split / '010001.jpg', root / 'infrared' / split / '010001.jpg')
    write_json(root / 'coco_annotations' / ann_name,
               {'images': [{'id': 1, 'file_name': '010001.jpg'}],
                'annotations': [{'id': 1, 'image_id': 1, 'bbox': [1, 1, 4, 4], 'category_id': 1}],
                'categories': [{'id': 1, 'name': 'person'}]})


@pytest.mark.parametrize('image_set, folder, ann_name', [
    ('train', 'train', 'LLVIP_train.json'),  # the reference code's names
    ('train', 'train', 'train.json'),        # the reference README's names
    ('val', 'test', 'LLVIP_test.json'),
    ('val', 'test', 'val.json'),
])
def test_llvip_layout_accepts_code_and_readme_annotation_names(tmp_path, image_set, folder, ann_name):
    llvip_tree(tmp_path, folder, ann_name)
    layout = resolve_layout('llvip_fusion', str(tmp_path), image_set)
    assert layout.rgb_dir == str(tmp_path / 'visible' / folder)
    assert layout.ir_dir == str(tmp_path / 'infrared' / folder)
    assert layout.annotation_file == str(tmp_path / 'coco_annotations' / ann_name)
    ds = PairedCocoDataset(layout.rgb_dir, layout.ir_dir, layout.annotation_file, 2, pair_names=layout.pair_names)
    rgb, ir, target = ds[0]
    assert_rgb_and_ir(rgb, ir)
    assert target['labels'].tolist() == [1]


def test_llvip_prefers_the_reference_code_file_name(tmp_path):
    llvip_tree(tmp_path, 'train', 'LLVIP_train.json')
    llvip_tree(tmp_path, 'train', 'train.json')
    assert llvip_layout(str(tmp_path), 'train').annotation_file.endswith('LLVIP_train.json')


def test_synthetic_uses_the_llvip_layout(tmp_path):
    llvip_tree(tmp_path)
    assert resolve_layout('synthetic', str(tmp_path), 'train') == resolve_layout('llvip_fusion', str(tmp_path), 'train')


def test_missing_annotation_file_lists_every_candidate(tmp_path):
    llvip_tree(tmp_path, 'test', 'LLVIP_train.json')
    with pytest.raises(FileNotFoundError, match=r'LLVIP_test.json, .*coco_annotations/val.json'):
        llvip_layout(str(tmp_path), 'val')


def test_missing_image_folder_is_named(tmp_path):
    llvip_tree(tmp_path)
    (tmp_path / 'infrared' / 'train' / '010001.jpg').unlink()
    (tmp_path / 'infrared' / 'train').rmdir()
    with pytest.raises(FileNotFoundError, match=r'infrared folder not found: .*infrared/train'):
        llvip_layout(str(tmp_path), 'train')


@pytest.mark.parametrize('rgb_key, ir_key', [('file_name_RGB', 'file_name_IR'), ('file_name', 'image_IR')])
def test_flir_layout_reads_both_file_name_conventions(tmp_path, rgb_key, ir_key):
    save_pair(tmp_path / 'val_RGB' / 'FLIR_00001.jpg', tmp_path / 'val_thermal' / 'FLIR_00001.jpeg')
    write_json(tmp_path / 'annotations' / 'val.json',
               {'images': [{'id': 5, rgb_key: 'FLIR_00001.jpg', ir_key: 'FLIR_00001.jpeg'}],
                'annotations': [{'id': 1, 'image_id': 5, 'bbox': [2, 2, 6, 6], 'category_id': 3}],
                'categories': [{'id': 3, 'name': 'car'}]})
    layout = resolve_layout('flir_fusion', str(tmp_path), 'val')
    assert layout.annotation_file == str(tmp_path / 'annotations' / 'val.json')
    ds = PairedCocoDataset(layout.rgb_dir, layout.ir_dir, layout.annotation_file, 91, pair_names=layout.pair_names)
    rgb, ir, target = ds[0]
    assert_rgb_and_ir(rgb, ir)
    assert target['labels'].tolist() == [3] and target['image_id'] == 5


def test_flir_entry_without_pair_names_is_a_clear_error(tmp_path):
    save_pair(tmp_path / 'train_RGB' / 'a.jpg', tmp_path / 'train_thermal' / 'a.jpg')
    write_json(tmp_path / 'annotations' / 'train.json',
               {'images': [{'id': 1, 'file_name': 'a.jpg'}], 'annotations': [], 'categories': []})
    layout = flir_layout(str(tmp_path), 'train')
    with pytest.raises(ValueError, match=r"train.json: images\[0\] \(id 1\).*'file_name_RGB'\+'file_name_IR' or "
                                         r"'file_name'\+'image_IR'"):
        PairedCocoDataset(layout.rgb_dir, layout.ir_dir, layout.annotation_file, 91, pair_names=layout.pair_names)


def test_unknown_dataset_and_bad_root_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset_file 'coco'.*llvip_fusion"):
        resolve_layout('coco', str(tmp_path), 'train')
    with pytest.raises(ValueError, match='coco_path is empty'):
        resolve_layout('llvip_fusion', '', 'train')
    with pytest.raises(FileNotFoundError, match='is not a folder'):
        resolve_layout('llvip_fusion', str(tmp_path / 'nowhere'), 'train')
    with pytest.raises(ValueError, match="image_set must be one of"):
        resolve_layout('llvip_fusion', str(tmp_path), 'test')
