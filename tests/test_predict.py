"""tools/predict.py on a tiny random-weight CAFF-DINO checkpoint and a few 128 x 96 synthetic pairs."""
import json

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools.coco import COCO

from datasets.synthetic import generate_synthetic_dataset
from models import build_model
from tools import predict
from util.checkpoint import save_checkpoint
from util.config import load_config

WIDTH, HEIGHT = 128, 96  # the stride-64 level must be larger than 1 x 1 for its GroupNorm


@pytest.fixture(scope='module')
def workspace(tiny_model_options, tmp_path_factory, repo_root):
    """A synthetic data set (3 train / 2 val pairs, 128 x 96) and a checkpoint saved the way main.py saves one."""
    root = tmp_path_factory.mktemp('predict')
    data = root / 'data'
    generate_synthetic_dataset(str(data), num_train=3, num_val=2, width=WIDTH, height=HEIGHT)
    cfg = load_config(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py',
                      {**tiny_model_options, 'coco_path': str(data), 'device': 'cpu'})
    torch.manual_seed(0)
    model, _, _ = build_model(cfg)
    checkpoint = root / 'checkpoint.pth'
    save_checkpoint({'model': model.state_dict(), 'config': cfg.to_dict(), 'epoch': 0}, str(checkpoint))
    return {'root': root, 'data': data, 'checkpoint': checkpoint,
            'config': repo_root / 'config' / 'DINO' / 'CAFF_tiny.py'}


def _common(workspace, out) -> list[str]:
    return ['--checkpoint', str(workspace['checkpoint']), '--out', str(out), '--threshold', '0.0']


def _results(out) -> list[dict]:
    return json.loads((out / 'detections.json').read_text())


@pytest.mark.slow
def test_single_pair_side_by_side_png_and_results(tiny_model_options, workspace, tmp_path):
    data = workspace['data']
    out = tmp_path / 'single'
    argv = _common(workspace, out) + ['--rgb', str(data / 'visible' / 'test' / '000001.png'),
                                      '--ir', str(data / 'infrared' / 'test' / '000001.png')]
    assert predict.main(argv) == 0
    with PIL.Image.open(out / '000001.png') as image:
        assert image.size == (2 * WIDTH, HEIGHT)
    results = _results(out)
    assert len(results) == tiny_model_options['num_select']
    assert {r['image_id'] for r in results} == {1}
    for row in results:
        assert set(row) == {'image_id', 'category_id', 'bbox', 'score'}
        x, y, w, h = row['bbox']
        assert w >= 0 and h >= 0 and -1e-3 <= x <= WIDTH + 1e-3 and -1e-3 <= y <= HEIGHT + 1e-3
    index = json.loads((out / 'images.json').read_text())
    assert index['images'][0]['file_name'] == '000001.png'
    # names come from the data set of the config's coco_path (the checkpoint's saved config)
    assert {c['name'] for c in index['categories']} == {'person', 'car'}


@pytest.mark.slow
def test_folder_mode_ids_in_name_order_and_batching_changes_nothing(tiny_model_options, workspace, tmp_path):
    data = workspace['data']
    argv = _common(workspace, tmp_path) + ['-c', str(workspace['config']), '--options',
                                           *[f'{k}={v}' for k, v in tiny_model_options.items()],
                                           '--rgb-dir', str(data / 'visible' / 'train'),
                                           '--ir-dir', str(data / 'infrared' / 'train')]
    assert predict.main(argv + ['--out', str(tmp_path / 'b3'), '--batch-size', '3']) == 0
    for name in ('000001', '000002', '000003'):
        with PIL.Image.open(tmp_path / 'b3' / f'{name}.png') as image:
            assert image.size == (2 * WIDTH, HEIGHT)
    index = json.loads((tmp_path / 'b3' / 'images.json').read_text())
    assert [(im['id'], im['file_name']) for im in index['images']] == [(1, '000001.png'), (2, '000002.png'),
                                                                       (3, '000003.png')]
    three = _results(tmp_path / 'b3')
    assert {r['image_id'] for r in three} == {1, 2, 3}

    assert predict.main(argv + ['--out', str(tmp_path / 'b1'), '--batch-size', '1']) == 0
    one = _results(tmp_path / 'b1')
    assert [r['image_id'] for r in one] == [r['image_id'] for r in three]
    for a, b in zip(one, three):  # same sizes, so no padding: batching must not change the detections
        assert a['category_id'] == b['category_id']
        assert a['score'] == pytest.approx(b['score'], abs=1e-4)
        assert a['bbox'] == pytest.approx(b['bbox'], abs=1e-2)


@pytest.mark.slow
def test_split_mode_scores_against_the_annotations(workspace, tmp_path, capsys):
    out = tmp_path / 'split'
    assert predict.main(_common(workspace, out) + ['--split', 'val', '--coco_path', str(workspace['data'])]) == 0
    results = _results(out)
    gt = COCO(str(workspace['data'] / 'coco_annotations' / 'LLVIP_test.json'))
    assert {r['image_id'] for r in results} == set(gt.getImgIds())
    gt.loadRes(str(out / 'detections.json'))  # a valid results file for this ground truth
    assert 'Average Precision' in capsys.readouterr().out


def test_ground_truth_is_drawn_in_green(workspace):
    rgb = PIL.Image.new('RGB', (40, 30), (0, 0, 0))
    ir = PIL.Image.new('RGB', (40, 30), (0, 0, 0))
    empty = {'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}
    gt = {'boxes': torch.tensor([[5.0, 5.0, 20.0, 25.0]]), 'labels': torch.tensor([1])}
    canvas = predict.draw_pair(rgb, ir, empty, {}, 0.3, gt)
    assert canvas.size == (80, 30)
    assert canvas.getpixel((5, 15)) == predict.GT_COLOUR  # left edge of the box, RGB half
    assert canvas.getpixel((45, 15)) == predict.GT_COLOUR  # same box on the IR half
    assert canvas.getpixel((12, 15)) == (0, 0, 0)


def test_detections_below_threshold_are_not_drawn():
    rgb = PIL.Image.new('RGB', (40, 30))
    ir = PIL.Image.new('RGB', (40, 30))
    detections = {'scores': torch.tensor([0.9, 0.1]), 'labels': torch.tensor([1, 2]),
                  'boxes': torch.tensor([[20.0, 15.0, 35.0, 28.0], [2.0, 2.0, 10.0, 10.0]])}
    canvas = predict.draw_pair(rgb, ir, detections, {1: 'person'}, 0.5)
    assert canvas.getpixel((34, 22)) == predict.CLASS_COLOURS[1]
    assert canvas.getpixel((2, 6)) == (0, 0, 0)


@pytest.mark.slow
def test_image_without_partner_is_predicted_with_the_partner_missing_and_one_warning(workspace, tmp_path, capsys):
    data = workspace['data']
    rgb_dir, ir_dir = tmp_path / 'rgb', tmp_path / 'ir'
    rgb_dir.mkdir()
    ir_dir.mkdir()
    for name in ('000001.png', '000002.png', '000003.png'):
        (rgb_dir / name).write_bytes((data / 'visible' / 'train' / name).read_bytes())
    (ir_dir / '000001.png').write_bytes((data / 'infrared' / 'train' / '000001.png').read_bytes())
    out = tmp_path / 'out'
    argv = _common(workspace, out) + ['--rgb-dir', str(rgb_dir), '--ir-dir', str(ir_dir), '--batch-size', '2']
    assert predict.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 1 and '2 of 3 pair(s) without their thermal image' in warnings[0]
    assert {r['image_id'] for r in _results(out)} == {1, 2, 3}
    index = json.loads((out / 'images.json').read_text())
    assert [im['file_name_IR'] for im in index['images']] == ['000001.png', None, None]
    with PIL.Image.open(out / '000002.png') as image:  # the thermal half is black but for its label and boxes
        right = image.convert('L').crop((WIDTH, 0, 2 * WIDTH, HEIGHT))
        assert (np.asarray(right) == 0).mean() > 0.5


@pytest.mark.slow
def test_rgb_alone_predicts_with_the_thermal_image_missing(tiny_model_options, workspace, tmp_path, capsys):
    data = workspace['data']
    out = tmp_path / 'rgb_only'
    argv = _common(workspace, out) + ['--rgb', str(data / 'visible' / 'test' / '000001.png')]
    assert predict.main(argv) == 0
    assert 'without their thermal image' in capsys.readouterr().err
    assert len(_results(out)) == tiny_model_options['num_select']


def test_named_file_that_does_not_exist_is_a_one_line_error(workspace, tmp_path, capsys):
    data = workspace['data']
    missing = tmp_path / 'nope.png'
    argv = _common(workspace, tmp_path / 'out') + ['--rgb', str(data / 'visible' / 'test' / '000001.png'),
                                                   '--ir', str(missing)]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and 'file not found' in err


def test_unreadable_image_and_bad_checkpoint_are_one_line_errors(workspace, tmp_path, capsys):
    data = workspace['data']
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    argv = _common(workspace, tmp_path / 'out') + ['--rgb', str(broken),
                                                   '--ir', str(data / 'infrared' / 'test' / '000001.png')]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err

    bad_ckpt = tmp_path / 'bad.pth'
    bad_ckpt.write_bytes(b'garbage')
    argv = ['--checkpoint', str(bad_ckpt), '--out', str(tmp_path / 'out'),
            '--rgb', str(data / 'visible' / 'test' / '000001.png'),
            '--ir', str(data / 'infrared' / 'test' / '000001.png')]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad_ckpt) in err


def test_checkpoint_of_another_model_is_refused(workspace, tmp_path, capsys):
    data = workspace['data']
    argv = _common(workspace, tmp_path / 'out') + ['-c', str(workspace['config']), '--options', 'hidden_dim=64',
                                                   '--rgb', str(data / 'visible' / 'test' / '000001.png'),
                                                   '--ir', str(data / 'infrared' / 'test' / '000001.png')]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert 'does not fit the model' in err and len(err.splitlines()) == 1


def test_input_modes_are_exclusive(workspace, tmp_path, capsys):
    argv = _common(workspace, tmp_path) + ['--rgb', 'a.png', '--split', 'val']
    assert predict.main(argv) == 2
    assert 'exactly one input' in capsys.readouterr().err


@pytest.mark.slow
def test_split_mode_keeps_string_image_ids(workspace, tmp_path, string_image_ids):
    data = tmp_path / 'string_ids'
    generate_synthetic_dataset(str(data), num_train=3, num_val=2, width=WIDTH, height=HEIGHT)
    string_image_ids(data, 'night-{:03d}')
    out = tmp_path / 'out'
    assert predict.main(_common(workspace, out) + ['--split', 'val', '--coco_path', str(data)]) == 0
    assert {r['image_id'] for r in _results(out)} == {'night-001', 'night-002'}
    assert {im['id'] for im in json.loads((out / 'images.json').read_text())['images']} == {'night-001', 'night-002'}
