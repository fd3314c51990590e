"""PairedCocoDataset: items and targets, reading bad pairs, skip-bad-pairs, adopting the data check's verdict."""
import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from datasets.annotations import load_annotations
from datasets.images import BitDepthRule
from datasets.pairs import BadPairError, PairedCocoDataset


def write_images(root, name, size=(40, 30), ir_size=None, rgb=True, ir=True):
    w, h = size
    if rgb:
        PIL.Image.new('RGB', (w, h), (200, 30, 30)).save(root / 'visible' / name)
    if ir:
        PIL.Image.new('L', ir_size or size, 90).save(root / 'infrared' / name)


def make_split(tmp_path, coco, sizes=None, **image_kwargs):
    """Writes the two folders and the annotation file for `coco`; returns the dataset constructor arguments."""
    (tmp_path / 'visible').mkdir(exist_ok=True)
    (tmp_path / 'infrared').mkdir(exist_ok=True)
    for image in coco.get('images', []):
        name = image['file_name']
        write_images(tmp_path, name, (sizes or {}).get(name, (40, 30)), **image_kwargs)
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(coco))
    return str(tmp_path / 'visible'), str(tmp_path / 'infrared'), str(ann)


def coco(images, annotations, categories=({'id': 1, 'name': 'person'},)):
    return {'images': images, 'annotations': annotations, 'categories': list(categories)}


def img(image_id, name, **extra):
    return dict(id=image_id, file_name=name, **extra)


def ann(image_id, bbox, category_id=1, **extra):
    return dict(image_id=image_id, bbox=bbox, category_id=category_id, **extra)


def test_item_is_rgb_ir_and_target_in_pixels(tmp_path):
    ds = PairedCocoDataset(*make_split(tmp_path, coco([img(7, 'a.png')], [ann(7, [2, 3, 10, 5], id=1)])),
                           num_classes=3)
    rgb, ir, target = ds[0]
    assert rgb.mode == ir.mode == 'RGB'
    assert np.asarray(rgb)[0, 0].tolist() == [200, 30, 30]
    assert np.asarray(ir)[0, 0].tolist() == [90, 90, 90]  # grey IR read as three equal channels
    assert target['boxes'].tolist() == [[2, 3, 12, 8]]
    assert target['labels'].dtype == torch.int64 and target['labels'].tolist() == [1]
    assert target['image_id'].dtype == torch.int64 and target['image_id'].ndim == 0 and target['image_id'] == 7
    assert target['orig_size'].tolist() == target['size'].tolist() == [30, 40]
    assert target['area'].tolist() == [50.0] and target['iscrowd'].tolist() == [0]
    assert ds.ids == [7] and ds.image_id_map is None


def test_string_image_ids_map_to_ints_and_the_mapping_is_kept(tmp_path):
    data = coco([img('010001', 'a.png'), img('010002', 'b.png')], [ann('010002', [1, 1, 5, 5], id=1)])
    ds = PairedCocoDataset(*make_split(tmp_path, data), num_classes=2)
    assert ds.image_id_map == {'010001': 10001, '010002': 10002}
    assert ds.ids == [10001, 10002]
    assert ds[1][2]['image_id'] == 10002 and ds[1][2]['labels'].tolist() == [1]
    assert sorted(ds.coco.imgs) == [10001, 10002]


def test_int_boxes_become_float_and_partly_outside_boxes_are_clipped(tmp_path):
    data = coco([img(1, 'a.png', width=40, height=30), img(2, 'b.png')],
                [ann(1, [30, 20, 20, 20], id=1), ann(2, [-5, -5, 10, 10], id=2)])
    ds = PairedCocoDataset(*make_split(tmp_path, data), num_classes=2)
    assert ds.coco.anns[1]['bbox'] == [30.0, 20.0, 10.0, 10.0]  # clipped in the file ground truth (size known)
    assert ds[0][2]['boxes'].dtype == torch.float32
    assert ds[0][2]['boxes'].tolist() == [[30, 20, 40, 30]]
    assert ds[1][2]['boxes'].tolist() == [[0, 0, 5, 5]]  # size not in the file: clipped to the image read


def test_zero_area_dropped_and_crowd_kept_for_eval_only(tmp_path):
    data = coco([img(1, 'a.png', width=40, height=30)],
                [ann(1, [5, 5, 0, 10], id=1), ann(1, [50, 5, 10, 10], id=2),  # zero area, fully outside
                 ann(1, [1, 1, 8, 8], iscrowd=1, id=3), ann(1, [10, 10, 5, 5], id=4)])
    ds = PairedCocoDataset(*make_split(tmp_path, data), num_classes=2)
    assert len(ds.coco.anns) == 2 and sum(a['iscrowd'] for a in ds.coco.anns.values()) == 1
    target = ds[0][2]
    assert target['boxes'].tolist() == [[10, 10, 15, 15]]
    assert target['iscrowd'].tolist() == [0]


def test_images_without_annotations_are_kept_as_negatives(tmp_path):
    ds = PairedCocoDataset(*make_split(tmp_path, coco([img(1, 'a.png'), img(2, 'b.png')], [ann(1, [1, 1, 5, 5])])),
                           num_classes=2)
    assert len(ds) == 2
    target = ds[1][2]
    assert target['boxes'].shape == (0, 4) and target['labels'].shape == (0,) and target['labels'].dtype == torch.int64


def test_corrupt_image_raises_naming_the_file(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], []))
    (tmp_path / 'visible' / 'a.png').write_bytes(b'not a png at all')
    ds = PairedCocoDataset(*args, num_classes=2)
    with pytest.raises(BadPairError, match=r'visible/a.png: unreadable, truncated or corrupt image'):
        ds[0]


def test_truncated_image_raises_naming_the_file(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], []), sizes={'a.png': (64, 64)})
    path = tmp_path / 'infrared' / 'a.png'
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    PIL.Image.fromarray(noisy).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadPairError, match=r'infrared/a.png: unreadable, truncated or corrupt image'):
        PairedCocoDataset(*args, num_classes=2)[0]


def test_size_mismatch_names_both_files(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], []), ir_size=(20, 30))
    with pytest.raises(BadPairError, match=r'visible/a.png is 40x30 but its IR partner .*infrared/a.png is 20x30'):
        PairedCocoDataset(*args, num_classes=2)[0]


def test_bad_pair_is_skipped_lazily_with_a_count(tmp_path, caplog):
    args = make_split(tmp_path, coco([img(1, 'a.png'), img(2, 'b.png'), img(3, 'c.png')], []))
    (tmp_path / 'visible' / 'b.png').write_bytes(b'garbage')
    ds = PairedCocoDataset(*args, num_classes=2, skip_bad_pairs=True)
    assert len(ds) == 3  # nothing is read until asked for
    with caplog.at_level(logging.WARNING, logger='caff_dino.datasets'):
        target = ds[1][2]
    assert target['image_id'] == 3 and ds.num_skipped == 1
    assert 'b.png' in caplog.text and '1 skipped so far' in caplog.text
    assert ds[1][2]['image_id'] == 3 and ds.num_skipped == 1  # a known bad pair is not read again


def test_all_pairs_bad_is_an_error(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], []))
    (tmp_path / 'visible' / 'a.png').write_bytes(b'garbage')
    with pytest.raises(BadPairError, match='every image pair failed'):
        PairedCocoDataset(*args, num_classes=2, skip_bad_pairs=True)[0]


def test_transforms_receive_the_pair_and_target(tmp_path):
    seen = []

    def record(rgb, ir, target):
        seen.append((rgb.size, ir.size, target['boxes'].clone()))
        return 'rgb', 'ir', target

    ds = PairedCocoDataset(*make_split(tmp_path, coco([img(1, 'a.png')], [ann(1, [1, 2, 3, 4])])),
                           num_classes=2, transforms=record)
    assert ds[0][:2] == ('rgb', 'ir')
    assert seen[0][0] == seen[0][1] == (40, 30) and seen[0][2].tolist() == [[1, 2, 4, 6]]


def test_missing_file_is_found_when_the_item_is_read(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png'), img(2, 'b.png')], []))
    (tmp_path / 'infrared' / 'b.png').unlink()
    ds = PairedCocoDataset(*args, num_classes=2)  # building reads only the annotation file
    assert len(ds) == 2
    with pytest.raises(BadPairError, match=r'infrared/b.png: file not found'):
        ds[1]


def test_category_error_raises_when_the_dataset_is_built(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], [ann(1, [1, 1, 5, 5], 5)]))
    with pytest.raises(ValueError, match=r'ann.json: annotations\[0\] has category_id 5, outside \[0, 1\]'):
        PairedCocoDataset(*args, num_classes=2)


def test_empty_images_list_is_an_error(tmp_path):
    args = make_split(tmp_path, coco([], []))
    with pytest.raises(BadPairError, match='"images" is empty'):
        PairedCocoDataset(*args, num_classes=2)


def test_use_check_adopts_checked_ground_truth_and_leaves_pairs_out(tmp_path):
    data = coco([img(1, 'a.png'), img(2, 'b.png'), img(3, 'c.png')], [ann(1, [-5, 0, 50, 10], id=1)])
    args = make_split(tmp_path, data)
    ds = PairedCocoDataset(*args, num_classes=2)
    assert ds.coco.anns[1]['bbox'] == [0.0, 0.0, 45.0, 10.0]  # no size in the JSON: only the left side is known
    checked = load_annotations(args[2], 2, image_sizes={1: (40, 30), 2: (40, 30), 3: (40, 30)})
    ds.use_check(checked, {2: 'b.png: corrupt'})
    assert ds.ids == [1, 3] and ds.left_out == {2: 'b.png: corrupt'}
    assert ds.coco.anns[1]['bbox'] == [0.0, 0.0, 40.0, 10.0]  # the evaluation ground truth = the training target
    assert ds[0][2]['boxes'].tolist() == [[0, 0, 40, 10]]
    with pytest.raises(BadPairError, match='every image pair is unusable'):
        ds.use_check(checked, {1: 'x', 2: 'y', 3: 'z'})


def test_sixteen_bit_thermal_pair_reads_with_the_configured_rule(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.png')], []), ir=False)
    counts = np.tile(np.linspace(1000, 5000, 40), (30, 1)).astype(np.uint16)
    PIL.Image.fromarray(counts).save(tmp_path / 'infrared' / 'a.png')
    ir = np.asarray(PairedCocoDataset(*args, num_classes=2)[0][1])
    assert ir[0, 0].tolist() == [0, 0, 0] and ir[0, -1].tolist() == [255, 255, 255]
    fixed = PairedCocoDataset(*args, num_classes=2, bit_depth=BitDepthRule('range', [0, 10000]))
    assert np.asarray(fixed[0][1])[0, -1].tolist() == [128, 128, 128]  # 5000 of 0..10000


def test_exif_rotated_rgb_pairs_with_its_ir_partner(tmp_path):
    args = make_split(tmp_path, coco([img(1, 'a.jpg')], [ann(1, [2, 3, 10, 5], id=1)]), rgb=False)
    exif = PIL.Image.Exif()
    exif[274] = 6  # stored 30 wide, 40 tall; displayed turned 90 degrees clockwise: 40x30, like the IR image
    PIL.Image.new('RGB', (30, 40), (200, 30, 30)).save(tmp_path / 'visible' / 'a.jpg', exif=exif.tobytes())
    rgb, ir, target = PairedCocoDataset(*args, num_classes=2)[0]
    assert rgb.size == ir.size == (40, 30) and target['boxes'].tolist() == [[2, 3, 12, 8]]
