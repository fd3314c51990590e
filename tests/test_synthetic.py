"""Synthetic generators: determinism, layout, per-modality visibility of the objects; the KAIST-style variant's
frames, day/night split and ignore regions."""
import json

import numpy as np
import PIL.Image
import pytest

from datasets.layouts import resolve_layout
from datasets.pairs import PairedCocoDataset
from datasets.kaist import REASONABLE, ignore_reason
from datasets.synthetic import generate_synthetic_dataset, generate_synthetic_kaist, main

SIZE = dict(width=160, height=128)


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_json(tmp_path):
    generate_synthetic_dataset(str(tmp_path / 'a'), 4, 2, seed=3, **SIZE)
    generate_synthetic_dataset(str(tmp_path / 'b'), 4, 2, seed=3, **SIZE)
    a, b = tree_bytes(tmp_path / 'a'), tree_bytes(tmp_path / 'b')
    assert len(a) == 2 * 6 + 2 and a == b


def test_different_seed_gives_different_data(tmp_path):
    generate_synthetic_dataset(str(tmp_path / 'a'), 4, 2, seed=3, **SIZE)
    generate_synthetic_dataset(str(tmp_path / 'b'), 4, 2, seed=4, **SIZE)
    a, b = tree_bytes(tmp_path / 'a'), tree_bytes(tmp_path / 'b')
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_val_split_does_not_depend_on_train_size(tmp_path):
    generate_synthetic_dataset(str(tmp_path / 'a'), 2, 2, seed=0, **SIZE)
    generate_synthetic_dataset(str(tmp_path / 'b'), 5, 2, seed=0, **SIZE)
    a, b = tree_bytes(tmp_path / 'a'), tree_bytes(tmp_path / 'b')
    val = [k for k in a if 'test' in k]
    assert len(val) == 5 and all(a[k] == b[k] for k in val)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    summary = generate_synthetic_dataset(str(root), 24, 2, seed=0, **SIZE)
    return root, summary


def test_layout_and_annotations(dataset):
    root, summary = dataset
    ann_file = root / 'coco_annotations' / 'LLVIP_train.json'
    assert summary['splits']['train']['annotation_file'] == str(ann_file)
    data = json.loads(ann_file.read_text())
    assert [c['id'] for c in data['categories']] == [1, 2]
    per_image = {im['id']: 0 for im in data['images']}
    for ann in data['annotations']:
        per_image[ann['image_id']] += 1
        x, y, w, h = ann['bbox']
        assert all(isinstance(v, int) for v in ann['bbox'])
        assert 0 <= x and 0 <= y and x + w <= SIZE['width'] and y + h <= SIZE['height']
        assert 16 <= max(w, h) <= 90 and ann['category_id'] in (1, 2) and ann['iscrowd'] == 0
    assert all(1 <= n <= 5 for n in per_image.values())
    for image in data['images']:
        rgb = PIL.Image.open(root / 'visible' / 'train' / image['file_name'])
        ir = PIL.Image.open(root / 'infrared' / 'train' / image['file_name'])
        assert rgb.mode == 'RGB' and ir.mode == 'L' and rgb.size == ir.size == (SIZE['width'], SIZE['height'])


def test_objects_are_visible_only_where_their_visibility_says(dataset):
    """rgb-only objects have no heat; ir-only objects have no colour; both kinds occur."""
    root, summary = dataset
    data = json.loads((root / 'coco_annotations' / 'LLVIP_train.json').read_text())
    names = {im['id']: im['file_name'] for im in data['images']}
    seen = {'both': 0, 'rgb': 0, 'ir': 0}
    for ann in data['annotations']:
        name = names[ann['image_id']]
        rgb = np.asarray(PIL.Image.open(root / 'visible' / 'train' / name), dtype=np.int32)
        ir = np.asarray(PIL.Image.open(root / 'infrared' / 'train' / name), dtype=np.int32)
        x, y, w, h = ann['bbox']
        rgb_box, ir_box = rgb[y:y + h, x:x + w], ir[y:y + h, x:x + w]
        saturation = (rgb_box.max(-1) - rgb_box.min(-1)).max()  # saturated clothing / body colour
        hot, coloured = ir_box.max() > 180, saturation > 125
        visibility = ann['visibility']
        seen[visibility] += 1
        assert hot == (visibility in ('both', 'ir')), ann
        assert coloured == (visibility in ('both', 'rgb')), ann
    assert seen['rgb'] > 0 and seen['ir'] > 0 and seen['both'] > seen['rgb'] and seen['both'] > seen['ir']
    assert summary['splits']['train']['visibility'] == seen


def test_the_paired_reader_reads_it(dataset):
    root, _ = dataset
    layout = resolve_layout('synthetic', str(root), 'val')
    ds = PairedCocoDataset(layout.rgb_dir, layout.ir_dir, layout.annotation_file, 3, pair_names=layout.pair_names)
    assert len(ds) == 2
    rgb, ir, target = ds[0]
    assert rgb.size == ir.size == (160, 128) and len(target['boxes']) >= 1


def test_cli_writes_jpeg_when_asked(tmp_path, capsys):
    summary = main(['--out', str(tmp_path), '--num-train', '2', '--num-val', '1', '--seed', '1', '--size', '96x80',
                    '--format', 'jpg'])
    assert json.loads(capsys.readouterr().out)['splits'] == summary['splits']
    assert sorted(p.name for p in (tmp_path / 'visible' / 'train').iterdir()) == ['000001.jpg', '000002.jpg']
    assert PIL.Image.open(tmp_path / 'infrared' / 'test' / '000001.jpg').size == (96, 80)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(['--out', str(tmp_path), '--size', '320by256'])
    with pytest.raises(ValueError, match="image_format must be 'png' or 'jpg'"):
        generate_synthetic_dataset(str(tmp_path), 1, 1, image_format='bmp')
    with pytest.raises(ValueError, match='too small'):
        generate_synthetic_dataset(str(tmp_path), 1, 1, width=32, height=32)


KAIST_SIZE = dict(width=320, height=256)


@pytest.fixture(scope='module')
def kaist(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic_kaist')
    summary = generate_synthetic_kaist(str(root), 24, 6, seed=0, **KAIST_SIZE)
    return root, summary


def test_kaist_variant_is_deterministic(tmp_path):
    generate_synthetic_kaist(str(tmp_path / 'a'), 2, 2, seed=5, width=128, height=96)
    generate_synthetic_kaist(str(tmp_path / 'b'), 2, 2, seed=5, width=128, height=96)
    a, b = tree_bytes(tmp_path / 'a'), tree_bytes(tmp_path / 'b')
    assert len(a) == 2 * 4 + 2 and a == b
    assert 'visible/train/set03/V000/I00000.png' in a and 'infrared/test/set09/V000/I00000.png' in a


def test_kaist_variant_frames_alternate_day_and_night(kaist):
    root, summary = kaist
    data = json.loads((root / 'coco_annotations' / 'val.json').read_text())
    assert [im['id'] for im in data['images']][:3] == ['set06/V000/I00000', 'set09/V000/I00000', 'set06/V000/I00001']
    assert [im['time_of_day'] for im in data['images']] == ['day', 'night'] * 3
    assert summary['splits']['val']['time_of_day'] == {'day': 3, 'night': 3}
    assert data['categories'] == [{'id': 1, 'name': 'person'}]
    night = [im['file_name'] for im in data['images'] if im['time_of_day'] == 'night']
    day = [im['file_name'] for im in data['images'] if im['time_of_day'] == 'day']
    brightness = {name: np.asarray(PIL.Image.open(root / 'visible' / 'test' / name)).mean() for name in night + day}
    assert max(brightness[n] for n in night) < 60 < min(brightness[n] for n in day)


def test_kaist_variant_marks_ignore_regions_by_the_reasonable_setting(kaist):
    root, summary = kaist
    data = json.loads((root / 'coco_annotations' / 'train.json').read_text())
    labels = {a['label'] for a in data['annotations']}
    assert labels == {'person', 'people', 'cyclist', 'person?'}
    reasons = set()
    for ann in data['annotations']:
        x, y, w, h = ann['bbox']
        assert ann['category_id'] == 1 and ann['height'] == h and ann['ignore'] == ann['iscrowd']
        assert 0 <= x and 0 <= y and x + w <= KAIST_SIZE['width'] and y + h <= KAIST_SIZE['height']
        # An independent re-derivation of the rule: only tall, not heavily occluded persons off the border count.
        evaluated = (ann['label'] == 'person' and h >= 55 and ann['occlusion'] in (0, 1) and x >= 5 and y >= 5
                     and x + w <= KAIST_SIZE['width'] - 5 and y + h <= KAIST_SIZE['height'] - 5)
        assert ann['ignore'] == (not evaluated), ann
        reasons.add(ignore_reason(ann['label'], ann['bbox'], ann['occlusion'], 320, 256, REASONABLE))
    assert {'label', 'height', 'occlusion', None} <= reasons
    split = summary['splits']['train']
    assert split['targets'] == sum(1 for a in data['annotations'] if not a['ignore']) > 0
    assert split['targets'] + sum(split['ignored'].values()) == split['objects'] == len(data['annotations'])


def test_kaist_variant_persons_are_warm_where_visible_in_ir(kaist):
    root, _ = kaist
    data = json.loads((root / 'coco_annotations' / 'train.json').read_text())
    names = {im['id']: im['file_name'] for im in data['images']}
    hot = 0
    for ann in data['annotations']:
        if ann['label'] == 'person?':  # unsure persons are faint in both images
            ir = np.asarray(PIL.Image.open(root / 'infrared' / 'train' / names[ann['image_id']]), dtype=np.int32)
            x, y, w, h = map(int, ann['bbox'])
            assert ir[y:y + h, x:x + w].max() < 150
        elif ann['label'] == 'person' and ann['occlusion'] == 0:
            ir = np.asarray(PIL.Image.open(root / 'infrared' / 'train' / names[ann['image_id']]), dtype=np.int32)
            x, y, w, h = map(int, ann['bbox'])
            hot += int(ir[y:y + h, x:x + w].max() > 180)
    assert hot > 0


def test_cli_writes_the_kaist_variant(tmp_path, capsys):
    main(['--out', str(tmp_path), '--variant', 'kaist', '--num-train', '2', '--num-val', '0', '--size', '96x80'])
    assert json.loads(capsys.readouterr().out)['splits']['train']['images'] == 2
    assert PIL.Image.open(tmp_path / 'visible' / 'train' / 'set00' / 'V000' / 'I00000.png').size == (96, 80)
    assert json.loads((tmp_path / 'coco_annotations' / 'val.json').read_text())['images'] == []
