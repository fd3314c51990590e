"""The catalogue of bad data inputs: one named test per kind, run through the real entry point, and how it ends.

Each test writes a small clean LLVIP-layout data set (tests/pair_fixtures.py), breaks one thing in it and runs
`main.main` with config/DINO/CAFF_tiny.py, or tools/check_dataset.py. Two endings:

- unusable input: exit status 2, exactly one line on stderr, naming the file (and entry) at fault; nothing is
  trained (the data check runs before the model is even built);
- handled input: the run goes on towards training, and the log (OUTPUT_DIR/info.txt) holds a named warning or
  note with a count. These tests stop the run where the model is built (after every data check), so they take
  a second; test_messy_data_set_trains_end_to_end trains one epoch through all of them at once.
"""
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import main
from pair_fixtures import edit_json, image_path, split_paths, write_llvip
from tools import check_dataset

TINY = str(Path(__file__).resolve().parents[1] / 'config' / 'DINO' / 'CAFF_tiny.py')
# Keeps a one-epoch run of the tiny model at a few seconds (only the test that trains uses them).
FAST = ['msda_backend=pytorch', 'batch_size=2', 'eval_size=48', 'eval_max_size=64', 'data_aug_scales=[48]',
        'data_aug_max_size=64', 'data_aug_scales2_resize=[48]', 'data_aug_scales2_crop=[32,48]', 'num_queries=10',
        'num_select=10', 'dn_number=2']


class ReachedModel(Exception):
    """Raised in place of building the model: every data check has passed and training would start."""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own data-check cache; afterwards the 'caff_dino' logger main.py configured goes back to plain propagation."""
    monkeypatch.setenv('CAFF_DATA_CHECK_CACHE', str(tmp_path / 'cache'))
    yield
    logger = logging.getLogger('caff_dino')
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate, logger.level = True, logging.NOTSET


@pytest.fixture
def root(tmp_path):
    return write_llvip(tmp_path / 'data')


def main_args(root, tmp_path, *options):
    return ['-c', TINY, '--dataset_file', 'llvip_fusion', '--coco_path', str(root), '--output_dir',
            str(tmp_path / 'out'), '--options', 'msda_backend=pytorch', 'batch_size=2', *options]


def ends_with_one_line(root, tmp_path, capsys, *fragments, options=(), flags=()):
    """Runs main.main; asserts exit 2 and exactly one stderr line holding every fragment; returns that line."""
    status = main.main([*main_args(root, tmp_path, *options), *flags])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith('error: ') and all(f in err[0] for f in fragments), err[0]
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()
    return err[0]


def runs_on(root, tmp_path, monkeypatch, *options, flags=()) -> str:
    """Runs main.main up to building the model; returns the log it wrote."""

    def stop(cfg):
        raise ReachedModel

    monkeypatch.setattr(main, 'build_model', stop)
    with pytest.raises(ReachedModel):
        main.main([*main_args(root, tmp_path, *options), *flags])
    return (tmp_path / 'out' / 'info.txt').read_text()


# ---------------------------------------------------------------------------- images: the run stops (val split)

def test_corrupt_val_image(root, tmp_path, capsys):
    image_path(root, 'val', 'rgb', 2).write_bytes(b'\x89PNG this is not a picture')
    ends_with_one_line(root, tmp_path, capsys, 'in the val split', 'visible/test/000002.png: unreadable',
                       'evaluation never skips a pair')


def test_truncated_val_jpeg(tmp_path, capsys):
    root = write_llvip(tmp_path / 'data', suffix='.jpg')
    path = image_path(root, 'val', 'ir', 1, '.jpg')
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    ends_with_one_line(root, tmp_path, capsys, 'infrared/test/000001.jpg: unreadable, truncated or corrupt',
                       'image file is truncated')


def test_truncated_val_png(root, tmp_path, capsys):
    path = image_path(root, 'val', 'ir', 2)
    path.write_bytes(path.read_bytes()[:-40])
    ends_with_one_line(root, tmp_path, capsys, 'infrared/test/000002.png: unreadable, truncated or corrupt')


def test_empty_val_image_file(root, tmp_path, capsys):
    image_path(root, 'val', 'ir', 1).write_bytes(b'')
    ends_with_one_line(root, tmp_path, capsys, 'infrared/test/000001.png: unreadable')


def test_missing_val_ir_partner(root, tmp_path, capsys):
    image_path(root, 'val', 'ir', 2).unlink()
    ends_with_one_line(root, tmp_path, capsys, 'infrared/test/000002.png: missing partner of',
                       'visible/test/000002.png')


def test_missing_val_rgb_image(root, tmp_path, capsys):
    image_path(root, 'val', 'rgb', 1).unlink()
    ends_with_one_line(root, tmp_path, capsys, 'visible/test/000001.png: missing partner of')


def test_val_image_path_is_a_folder(root, tmp_path, capsys):
    path = image_path(root, 'val', 'rgb', 1)
    path.unlink()
    path.mkdir()
    ends_with_one_line(root, tmp_path, capsys, 'visible/test/000001.png: is not a regular file')


def test_val_rgb_ir_size_mismatch(root, tmp_path, capsys):
    PIL.Image.new('L', (60, 40)).save(image_path(root, 'val', 'ir', 1))
    ends_with_one_line(root, tmp_path, capsys, 'visible/test/000001.png is 64x48 but its IR partner',
                       'infrared/test/000001.png is 60x40')


def test_val_json_size_differs_from_the_file(root, tmp_path, capsys):
    edit_json(root, 'val', lambda d: d['images'][0].update(width=1280, height=1024))
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP_test.json: image 1 declares 1280x1024 (WxH)',
                       'infrared/test/000001.png is 64x48')


def test_val_json_size_of_an_exif_turned_image(root, tmp_path, capsys):
    exif = PIL.Image.Exif()
    exif[274] = 8
    for modality in ('rgb', 'ir'):
        path = image_path(root, 'val', modality, 1)
        PIL.Image.open(path).transpose(PIL.Image.Transpose.ROTATE_270).save(path, exif=exif.tobytes())
    edit_json(root, 'val', lambda d: d['images'][0].update(width=48, height=64))
    ends_with_one_line(root, tmp_path, capsys, 'declares 48x64', 'after EXIF orientation 8')


def test_rotated_rgb_only_is_a_size_mismatch(root, tmp_path, capsys):
    exif = PIL.Image.Exif()
    exif[274] = 6
    path = image_path(root, 'val', 'rgb', 2)
    PIL.Image.open(path).save(path, exif=exif.tobytes())  # same pixels, now displayed turned: 48x64
    ends_with_one_line(root, tmp_path, capsys, 'is 48x64 but its IR partner', 'turning the RGB by EXIF orientation 6')


# --------------------------------------------------------------------------------- images: the training split

def test_corrupt_train_image_without_skip_bad_pairs(root, tmp_path, capsys):
    image_path(root, 'train', 'ir', 3).write_bytes(b'junk')
    ends_with_one_line(root, tmp_path, capsys, 'in the train split', 'infrared/train/000003.png',
                       'set skip_bad_pairs=True')


def test_bad_train_pairs_with_skip_bad_pairs_are_left_out_counted_and_named(root, tmp_path, monkeypatch):
    image_path(root, 'train', 'ir', 1).unlink()
    image_path(root, 'train', 'rgb', 4).write_bytes(b'junk')
    log = runs_on(root, tmp_path, monkeypatch, 'skip_bad_pairs=True')
    assert 'WARNING: data check: train split: left out before training (skip_bad_pairs=True): 1 pairs with a ' \
           'missing image file [missing_file]: IR 000001.png' in log
    assert '[unreadable_image]: RGB 000004.png' in log and '2 of 4 pairs left out, 2 remain' in log


def test_skip_bad_pairs_never_skips_a_val_pair(root, tmp_path, capsys):
    image_path(root, 'val', 'ir', 1).write_bytes(b'junk')
    ends_with_one_line(root, tmp_path, capsys, 'in the val split', 'infrared/test/000001.png',
                       options=('skip_bad_pairs=True',))


def test_every_train_pair_bad_with_skip_bad_pairs(root, tmp_path, capsys):
    for n in range(1, 5):
        image_path(root, 'train', 'rgb', n).write_bytes(b'junk')
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP_train.json: every image pair is unusable',
                       options=('skip_bad_pairs=True',))


def test_too_few_train_pairs_left_for_one_batch(root, tmp_path, capsys):
    for n in (1, 2, 3):
        image_path(root, 'train', 'ir', n).unlink()
    ends_with_one_line(root, tmp_path, capsys, 'the train split has 1 image pairs, fewer than one batch',
                       options=('skip_bad_pairs=True',))


# ------------------------------------------------------------------------- images: read the way cameras write them

@pytest.mark.parametrize('kind', ['I;16 png', 'I;16 tif', 'I;16B tif', 'I tif', 'F tif'])
def test_high_bit_depth_thermal(tmp_path, monkeypatch, kind):
    mode, fmt = kind.split()
    root = write_llvip(tmp_path / 'data', suffix=f'.{fmt}')
    counts = np.linspace(20000, 30000, 48 * 64).reshape(48, 64)
    for split, n in (('train', 1), ('train', 2), ('val', 1)):
        path = image_path(root, split, 'ir', n, f'.{fmt}')
        if mode == 'I;16B':
            PIL.Image.frombytes(mode, (64, 48), counts.astype('>u2').tobytes()).save(path)
        else:
            PIL.Image.fromarray(counts.astype({'I;16': np.uint16, 'I': np.int32, 'F': np.float32}[mode])).save(path)
    log = runs_on(root, tmp_path, monkeypatch)
    assert f'train split: 2 images wider than 8 bits, mapped to 0..255 by high_bit_depth_rule [high_bit_depth]: ' \
           f'000001.{fmt} ({mode})' in log
    assert f'val split: 1 images wider than 8 bits' in log


def test_exif_rotated_pair(root, tmp_path, monkeypatch):
    exif = PIL.Image.Exif()
    exif[274] = 3  # upside down: the same size, so only the pixels would be wrong without the rule
    for modality in ('rgb', 'ir'):
        path = image_path(root, 'train', modality, 2)
        PIL.Image.open(path).rotate(180).save(path, exif=exif.tobytes())
    log = runs_on(root, tmp_path, monkeypatch)
    assert 'train split: 2 images turned upright by their EXIF orientation [exif_rotated]: 000002.png ' \
           '(orientation 3), 000002.png (orientation 3)' in log


@pytest.mark.parametrize('mode', ['RGBA', 'LA', 'P', 'CMYK', '1', 'L'])
def test_other_channel_modes_are_read_as_rgb(tmp_path, monkeypatch, mode):
    root = write_llvip(tmp_path / 'data', suffix='.jpg' if mode == 'CMYK' else '.png')
    suffix = '.jpg' if mode == 'CMYK' else '.png'
    path = image_path(root, 'val', 'rgb', 1, suffix)
    PIL.Image.open(path).convert(mode).save(path)
    log = runs_on(root, tmp_path, monkeypatch)
    assert 'data check: val:' in log and 'WARNING' not in log
    from datasets.images import read_image
    assert read_image(str(path)).mode == 'RGB'


# ------------------------------------------------------------------------------- boxes: handled, counted, named

def test_boxes_outside_the_image_are_clipped_or_dropped_in_both_splits(root, tmp_path, monkeypatch):
    edit_json(root, 'train', lambda d: d['annotations'].extend([
        {'id': 21, 'image_id': 1, 'bbox': [50, 40, 30, 30], 'category_id': 1},    # partly outside
        {'id': 22, 'image_id': 2, 'bbox': [100, 100, 10, 10], 'category_id': 1}]))  # entirely outside
    edit_json(root, 'val', lambda d: d['annotations'].extend([
        {'id': 31, 'image_id': 1, 'bbox': [-10, -10, 20, 20], 'category_id': 2},
        {'id': 32, 'image_id': 2, 'bbox': [5, 5, 0, 9], 'category_id': 2},          # zero width
        {'id': 33, 'image_id': 2, 'bbox': [5, 5, 9, -1], 'category_id': 2}]))       # negative height
    log = runs_on(root, tmp_path, monkeypatch)
    assert 'train split: 1 boxes partly outside their image, clipped to it [box_clipped]: ann 21 of image 1' in log
    assert 'train split: 1 boxes entirely outside their image, dropped [box_outside]: ann 22 of image 2' in log
    assert 'val split: 1 boxes partly outside their image, clipped to it [box_clipped]: ann 31 of image 1' in log
    assert 'val split: 2 boxes of zero or negative width or height, dropped [box_degenerate]: ann 32 of image 2, ' \
           'ann 33 of image 2 (in the training targets and the evaluation ground truth alike)' in log


def test_json_without_width_and_height(tmp_path, monkeypatch):
    root = write_llvip(tmp_path / 'data', with_sizes=False)
    edit_json(root, 'val', lambda d: d['annotations'][0].update(bbox=[40, 30, 50, 50]))
    log = runs_on(root, tmp_path, monkeypatch)
    assert 'val split: 2 images without width/height in the JSON (taken from the file) [size_from_file]' in log
    assert 'val split: 1 boxes partly outside their image, clipped to it [box_clipped]: ann 1 of image 1' in log


# ----------------------------------------------------------------------- annotation files: the run stops at once

@pytest.mark.parametrize('split', ['train', 'val'])
def test_category_id_out_of_range(root, tmp_path, capsys, split):
    edit_json(root, split, lambda d: d['annotations'][1].update(category_id=3))
    ends_with_one_line(root, tmp_path, capsys, f'{split_paths(root, split)[2].name}: annotations[1] (id 2) has '
                       f'category_id 3, outside [0, 2] for num_classes=3', 'raise num_classes')


# (split, edit of the parsed JSON, fragments of the one line the run ends with)
ENTRY_ERRORS = {
    'many_category_ids_out_of_range_counted': (
        'train', lambda d: [a.update(category_id=90) for a in d['annotations']],
        ['annotations[0] (id 1) has category_id 90', '(3 more problem(s)']),
    'category_id_not_an_integer': (
        'train', lambda d: d['annotations'][0].update(category_id='person'),
        ["LLVIP_train.json: annotations[0] (id 1) has category_id 'person'"]),
    'annotation_of_an_unknown_image': (
        'train', lambda d: d['annotations'][0].update(image_id=77), ['annotations[0] (id 1) refers to image_id 77']),
    'annotation_without_bbox': (
        'train', lambda d: d['annotations'][2].pop('bbox'), ["annotations[2] (id 3) lacks key(s) ['bbox']"]),
    'duplicate_image_ids': ('val', lambda d: d['images'][1].update(id=1), ['LLVIP_test.json: duplicate image ids']),
    'image_entry_without_file_name': (
        'train', lambda d: d['images'][0].pop('file_name'), ['LLVIP_train.json: images[0] (id 1)', "'file_name'"]),
    'image_entry_with_a_bad_width': (
        'val', lambda d: d['images'][0].update(width='wide'), ["LLVIP_test.json: image 1 has width='wide'"]),
    'empty_images_list': (
        'val', lambda d: d.update(images=[], annotations=[]), ['LLVIP_test.json: "images" is empty']),
}


@pytest.mark.parametrize('case', list(ENTRY_ERRORS))
def test_a_bad_entry_ends_the_run_with_one_line_naming_it(root, tmp_path, capsys, case):
    split, edit, fragments = ENTRY_ERRORS[case]
    edit_json(root, split, edit)
    ends_with_one_line(root, tmp_path, capsys, *fragments)


@pytest.mark.parametrize('bbox', [[1, 2, 3], [1, 'a', 3, 4], [1, None, 3, 4], 'box'])
def test_bbox_not_four_numbers(root, tmp_path, capsys, bbox):
    edit_json(root, 'val', lambda d: d['annotations'][0].update(bbox=bbox))
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP_test.json: annotations[0] (id 1) has bbox',
                       'expected [x, y, width, height] finite numbers')


def test_bbox_with_nan(root, tmp_path, capsys):
    path = split_paths(root, 'val')[2]
    path.write_text(path.read_text().replace('[8, 6, 24, 20]', '[8, NaN, 24, 20]', 1))
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP_test.json: annotations[0] (id 1) has bbox [8, nan, 24, 20]')


@pytest.mark.parametrize('content, fragment', [
    (b'{"images": [', 'not valid JSON'),
    (b'', 'not valid JSON'),
    (b'[1, 2]', 'top level is a list'),
    (b'{"images": []}', "missing top-level key(s) ['annotations']"),
    ('{"images": [], "annotations": [], "info": "\xe9t\xe9"}'.encode('latin-1'), 'not UTF-8 text'),
])
def test_unusable_annotation_file(root, tmp_path, capsys, content, fragment):
    split_paths(root, 'train')[2].write_bytes(content)
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP_train.json: ' + fragment)


def test_annotation_file_with_byte_order_mark(root, tmp_path, monkeypatch):
    path = split_paths(root, 'val')[2]
    path.write_bytes(b'\xef\xbb\xbf' + path.read_bytes())
    assert 'data check: val:' in runs_on(root, tmp_path, monkeypatch)


def test_string_image_ids(root, tmp_path, monkeypatch):
    def stringify(data):
        for image in data['images']:
            image['id'] = f'night_{image["id"]}'
        for ann in data['annotations']:
            ann['image_id'] = f'night_{ann["image_id"]}'
    edit_json(root, 'val', stringify)
    assert 'image ids were not ints; mapped to ints' in runs_on(root, tmp_path, monkeypatch)


def test_images_without_annotations_are_negatives(root, tmp_path, monkeypatch):
    edit_json(root, 'val', lambda d: d.update(annotations=[]))
    assert 'LLVIP_test.json (2 pairs, 0 boxes, 2 without boxes)' in runs_on(root, tmp_path, monkeypatch)


# --------------------------------------------------------------------------------------------------- layout

def test_missing_annotation_file(root, tmp_path, capsys):
    split_paths(root, 'val')[2].unlink()
    ends_with_one_line(root, tmp_path, capsys, 'no LLVIP val annotation file found; tried:', 'LLVIP_test.json')


def test_missing_image_folder(root, tmp_path, capsys):
    import shutil
    shutil.rmtree(split_paths(root, 'train')[1])
    ends_with_one_line(root, tmp_path, capsys, 'LLVIP infrared folder not found', 'infrared/train')


def test_coco_path_not_a_folder(tmp_path, capsys):
    ends_with_one_line(tmp_path / 'nowhere', tmp_path, capsys, 'nowhere', 'is not a folder')


def test_bad_high_bit_depth_rule(root, tmp_path, capsys):
    ends_with_one_line(root, tmp_path, capsys, 'high_bit_depth_limits = [99.0, 1.0]',
                       options=('high_bit_depth_limits=[99.0,1.0]',))


# ------------------------------------------------------------------------------- --eval: the val split alone

def eval_options(tmp_path) -> tuple[str, ...]:
    """--eval with a weights file: the data check runs before the file is read (the model stops the run first)."""
    weights = tmp_path / 'weights.pth'
    weights.write_bytes(b'read after the data check')
    return '--eval', '--pretrain_model_path', str(weights)


def test_eval_without_a_train_split(root, tmp_path, monkeypatch):
    import shutil
    rgb_dir, ir_dir, annotation_file = split_paths(root, 'train')
    shutil.rmtree(rgb_dir)
    shutil.rmtree(ir_dir)
    annotation_file.unlink()
    log = runs_on(root, tmp_path, monkeypatch, flags=eval_options(tmp_path))
    assert 'data check: val:' in log and 'data check: train' not in log


def test_eval_ignores_a_bad_train_pair(root, tmp_path, monkeypatch):
    image_path(root, 'train', 'ir', 3).write_bytes(b'junk')
    assert 'infrared/train/000003.png' not in runs_on(root, tmp_path, monkeypatch, flags=eval_options(tmp_path))


def test_eval_with_a_bad_val_pair(root, tmp_path, capsys):
    image_path(root, 'val', 'rgb', 1).write_bytes(b'junk')
    ends_with_one_line(root, tmp_path, capsys, 'in the val split', 'visible/test/000001.png',
                       flags=eval_options(tmp_path))


# ------------------------------------------------------------------------------------- the checker command

def test_checker_counts_every_bad_input_of_a_split(root, capsys):
    image_path(root, 'train', 'ir', 1).unlink()
    image_path(root, 'train', 'rgb', 2).write_bytes(b'junk')
    edit_json(root, 'train', lambda d: d['annotations'][3].update(category_id=12, bbox=[0, 0, 1, 1]))
    status = check_dataset.main(['-c', TINY, '--dataset_file', 'llvip_fusion', '--coco_path', str(root)])
    out = capsys.readouterr().out
    assert status == 2 and 'result: NOT clean: 1 annotation error(s), 2 bad pair(s)' in out
    assert '[missing_file]: IR 000001.png' in out and '[unreadable_image]: RGB 000002.png' in out
    assert '[category_out_of_range]: annotations[3] (id 4)' in out


@pytest.mark.slow
def test_messy_data_set_trains_end_to_end(tmp_path):
    """One epoch of the tiny model through a data set with a bad training pair (skipped), a 16-bit thermal image,
    an EXIF-turned pair, clipped boxes and no sizes in the JSON; the val ground truth holds the clipped box."""
    root = write_llvip(tmp_path / 'data', num_train=5, with_sizes=False)
    image_path(root, 'train', 'ir', 5).write_bytes(b'junk')
    PIL.Image.fromarray(np.linspace(20000, 30000, 48 * 64).reshape(48, 64).astype(np.uint16)).save(
        image_path(root, 'train', 'ir', 1))
    exif = PIL.Image.Exif()
    exif[274] = 3
    for modality in ('rgb', 'ir'):
        path = image_path(root, 'train', modality, 2)
        PIL.Image.open(path).rotate(180).save(path, exif=exif.tobytes())
    edit_json(root, 'val', lambda d: d['annotations'][0].update(bbox=[50, 40, 30, 30]))
    status = main.main(['-c', TINY, '--dataset_file', 'llvip_fusion', '--coco_path', str(root), '--output_dir',
                        str(tmp_path / 'out'), '--options', 'epochs=1', 'skip_bad_pairs=True', *FAST])
    assert status == 0 and (tmp_path / 'out' / 'checkpoint.pth').exists()
    log = (tmp_path / 'out' / 'info.txt').read_text()
    assert '1 of 5 pairs left out, 4 remain' in log and '[high_bit_depth]' in log and '[exif_rotated]' in log
    assert '[box_clipped]: ann 1 of image 1' in log
    assert 'skipping bad pair' not in log  # left out before training: the loader never met it
    detections = json.loads((tmp_path / 'out' / 'detections_bbox.json').read_text())
    assert detections and {d['image_id'] for d in detections} <= {1, 2}


@pytest.mark.slow
def test_bad_val_pair_under_torchrun_stops_every_rank(root, tmp_path):
    """Rank 0 checks, both ranks get its verdict and stop before training: no rank waits for the other."""
    import os
    import subprocess
    import sys
    image_path(root, 'val', 'ir', 2).write_bytes(b'junk')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(main.__file__), *main_args(root, tmp_path), '--device', 'cpu'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if 'error: ' in line]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all('in the val split' in line and 'infrared/test/000002.png: unreadable' in line for line in errors)
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()
