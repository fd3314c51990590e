"""build_dataset(image_set, cfg): config keys -> layout, transforms, skip policy; batches through collate_fn."""
import json

import PIL.Image
import pytest
import torch

from datasets import BadPairError, build_dataset
from datasets.synthetic import generate_synthetic_dataset
from util.config import load_config
from util.misc import collate_fn


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    generate_synthetic_dataset(str(root), 3, 2, seed=0, width=160, height=128)
    return root


def tiny_cfg(root, **overrides):
    """The shipped tiny config pointed at `root`."""
    options = {'coco_path': str(root), **overrides}
    return load_config('config/DINO/CAFF_tiny.py', options)


def test_train_split_gives_normalised_tensors_and_targets(synthetic_root):
    ds = build_dataset('train', tiny_cfg(synthetic_root, strong_aug=True))
    assert ds.annotation_file.endswith('LLVIP_train.json') and len(ds) == 3
    rgb, ir, target = ds[0]
    assert rgb.dtype == ir.dtype == torch.float32 and rgb.shape == ir.shape and rgb.shape[0] == 3
    assert rgb.mean() != ir.mean()  # the two modalities stay distinct images
    assert set(target) == {'boxes', 'labels', 'image_id', 'orig_size', 'size', 'area', 'iscrowd'}
    assert target['orig_size'].tolist() == [128, 160]
    assert target['size'].tolist() == list(rgb.shape[-2:])
    assert 0 <= target['boxes'].min() and target['boxes'].max() <= 1  # cxcywh normalised
    assert target['labels'].dtype == torch.int64 and target['image_id'].dtype == torch.int64
    assert min(rgb.shape[-2:]) in (112, 128, 144)  # CAFF_tiny.py data_aug_scales


def test_val_split_resizes_to_eval_size_and_batches_with_one_mask(synthetic_root):
    ds = build_dataset('val', tiny_cfg(synthetic_root, eval_size=128, eval_max_size=192))
    assert ds.annotation_file.endswith('LLVIP_test.json')
    rgb, ir, target = ds[0]
    assert rgb.shape == ir.shape == (3, 128, 160) and target['size'].tolist() == [128, 160]
    samples_rgb, samples_ir, targets = collate_fn([ds[0], ds[1]])
    assert samples_rgb.tensors.shape == samples_ir.tensors.shape == (2, 3, 128, 160)
    assert torch.equal(samples_rgb.mask, samples_ir.mask) and len(targets) == 2
    assert ds.coco.getImgIds() == [1, 2]


def test_reference_scales_are_used_when_the_config_says_so(synthetic_root):
    cfg = tiny_cfg(synthetic_root, eval_size=800, eval_max_size=1333)
    rgb, _, _ = build_dataset('val', cfg)[0]
    assert rgb.shape[-2:] == (800, 1000)


def corrupt_first_val_image(root):
    data = json.loads((root / 'coco_annotations' / 'LLVIP_test.json').read_text())
    path = root / 'visible' / 'test' / data['images'][0]['file_name']
    original = path.read_bytes()
    path.write_bytes(b'corrupt')
    return path, original


def test_eval_never_skips_a_bad_pair(synthetic_root):
    path, original = corrupt_first_val_image(synthetic_root)
    try:
        ds = build_dataset('val', tiny_cfg(synthetic_root, skip_bad_pairs=True))
        with pytest.raises(BadPairError, match=path.name):
            ds[0]
    finally:
        path.write_bytes(original)


def test_training_skips_a_bad_pair_when_configured(tmp_path):
    generate_synthetic_dataset(str(tmp_path), 3, 1, seed=1, width=160, height=128)
    (tmp_path / 'visible' / 'train' / '000001.png').write_bytes(b'corrupt')
    with pytest.raises(BadPairError, match='000001.png'):
        build_dataset('train', tiny_cfg(tmp_path))[0]
    ds = build_dataset('train', tiny_cfg(tmp_path, skip_bad_pairs=True))
    assert ds[0][2]['image_id'] == 2 and ds.num_skipped == 1


def test_flir_fusion_through_build_dataset(tmp_path):
    for folder in ('val_RGB', 'val_thermal', 'annotations'):
        (tmp_path / folder).mkdir()
    PIL.Image.new('RGB', (64, 48), (0, 0, 255)).save(tmp_path / 'val_RGB' / 'x.jpg')
    PIL.Image.new('L', (64, 48), 30).save(tmp_path / 'val_thermal' / 'x.jpeg')
    (tmp_path / 'annotations' / 'val.json').write_text(json.dumps(
        {'images': [{'id': 1, 'file_name_RGB': 'x.jpg', 'file_name_IR': 'x.jpeg'}],
         'annotations': [{'id': 1, 'image_id': 1, 'bbox': [4, 4, 16, 8], 'category_id': 2}],
         'categories': [{'id': 2, 'name': 'car'}]}))
    rgb, ir, target = build_dataset('val', tiny_cfg(tmp_path, dataset_file='flir_fusion', eval_size=128,
                                                    eval_max_size=192))[0]
    assert rgb.shape == ir.shape == (3, 128, 170)
    assert target['boxes'][0].tolist() == pytest.approx([12 / 64, 8 / 48, 16 / 64, 8 / 48], abs=1e-6)


def test_config_errors_name_the_value(synthetic_root):
    cfg = tiny_cfg(synthetic_root)
    cfg.dataset_file = 'coco'
    with pytest.raises(ValueError, match="unknown dataset_file 'coco'"):
        build_dataset('train', cfg)
    with pytest.raises(ValueError, match='category_id 2, outside'):
        build_dataset('train', tiny_cfg(synthetic_root, num_classes=2))


def test_eval_missing_modality_blanks_that_image_of_every_val_pair(synthetic_root):
    plain = build_dataset('val', tiny_cfg(synthetic_root))
    no_ir = build_dataset('val', tiny_cfg(synthetic_root, eval_missing_modality='ir'))
    for index in range(len(plain)):
        rgb, ir, target = plain[index]
        b_rgb, b_ir, b_target = no_ir[index]
        assert torch.equal(b_rgb, rgb) and b_ir.shape == ir.shape and not b_ir.any() and ir.any()
        assert torch.equal(b_target['boxes'], target['boxes'])


def test_modality_dropout_reaches_the_train_split(synthetic_root):
    ds = build_dataset('train', tiny_cfg(synthetic_root, modality_dropout=1.0))
    for index in range(len(ds)):
        rgb, ir, _ = ds[index]
        assert rgb.shape == ir.shape and (rgb.any() != ir.any()), 'exactly one image of each pair is missing'
