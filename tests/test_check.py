"""datasets/check.py: pair probing, the split verdict, the on-disk cache, the training policy and its rank handling."""
import logging
import os
import re

import numpy as np
import PIL.Image
import pytest

from datasets.annotations import same_file_name
from datasets.check import ProbeCache, apply_check, check_before_training, check_split, probe_files
from datasets.images import ImageInfo
from datasets.pairs import PairedCocoDataset
from pair_fixtures import edit_json, image_path, split_paths, write_llvip
from util.errors import DataError


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv('CAFF_DATA_CHECK_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


@pytest.fixture
def root(tmp_path):
    return write_llvip(tmp_path / 'data')


def check(root, split='train', **kwargs):
    rgb_dir, ir_dir, ann = split_paths(root, split)
    return check_split(split, str(rgb_dir), str(ir_dir), str(ann), 3, same_file_name, **kwargs)


def dataset(root, split='train', skip=False):
    rgb_dir, ir_dir, ann = split_paths(root, split)
    return PairedCocoDataset(str(rgb_dir), str(ir_dir), str(ann), 3, skip_bad_pairs=skip)


def test_clean_split(root):
    result = check(root)
    assert result.clean and not result.bad_pairs and result.num_pairs == 4 and result.num_files == 8
    assert result.report_lines()[1] == '  no problems'
    assert len(result.annotations.dataset['annotations']) == 4


@pytest.mark.parametrize('which, kind, message', [
    ('ir', 'missing_file', r'infrared/train/000002.png: missing partner of .*visible/train/000002.png'),
    ('rgb', 'missing_file', r'visible/train/000002.png: missing partner of .*infrared/train/000002.png'),
    ('both', 'missing_file', 'both files missing'),
])
def test_missing_files(root, which, kind, message):
    for modality in (('rgb', 'ir') if which == 'both' else (which,)):
        image_path(root, 'train', modality, 2).unlink()
    result = check(root)
    assert list(result.bad_pairs) == [2] and dict(result.problems.counts) == {kind: 1}
    assert re.search(message, result.bad_pairs[2]), result.bad_pairs[2]


@pytest.mark.parametrize('damage', ['garbage', 'empty', 'truncated'])
def test_unreadable_images(root, damage):
    path = image_path(root, 'train', 'ir', 3)
    content = path.read_bytes()
    path.write_bytes({'garbage': b'not an image', 'empty': b'', 'truncated': content[:len(content) // 2]}[damage])
    result = check(root)
    assert list(result.bad_pairs) == [3] and result.problems.counts['unreadable_image'] == 1
    assert '000003.png: unreadable, truncated or corrupt image' in result.bad_pairs[3]
    assert result.problems.examples['unreadable_image'][0].ref == 'IR 000003.png'


def test_truncated_file_passes_a_header_only_check(root):
    path = image_path(root, 'train', 'ir', 3)
    path.write_bytes(path.read_bytes()[:300])
    assert check(root, verify=False).clean
    assert not check(root, verify=True).clean  # a header-only cache entry does not answer a verifying check


def test_size_mismatch_and_json_size_mismatch(root):
    PIL.Image.new('L', (60, 48)).save(image_path(root, 'train', 'ir', 1))
    edit_json(root, 'train', lambda d: d['images'][1].update(width=50))
    result = check(root)
    assert set(result.bad_pairs) == {1, 2}
    assert 'is 64x48 but its IR partner' in result.bad_pairs[1] and 'is 60x48' in result.bad_pairs[1]
    assert 'image 2 declares 50x48 (WxH) but' in result.bad_pairs[2] and 'is 64x48' in result.bad_pairs[2]


def test_json_size_of_the_unturned_image_is_explained(root):
    exif = PIL.Image.Exif()
    exif[274] = 6
    for modality in ('rgb', 'ir'):  # both stored 48 wide, 64 tall, displayed turned: 64x48 as the JSON says
        path = image_path(root, 'train', modality, 1)
        PIL.Image.open(path).transpose(PIL.Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes())
    assert check(root).clean
    assert check(root).problems.counts['exif_rotated'] == 2
    edit_json(root, 'train', lambda d: d['images'][0].update(width=48, height=64))
    message = check(root).bad_pairs[1]
    assert 'declares 48x64' in message
    assert 'after EXIF orientation 6; the JSON gives the stored, unturned size' in message


def test_boxes_are_clipped_with_the_file_size_when_the_json_has_none(tmp_path):
    root = write_llvip(tmp_path / 'data', with_sizes=False)
    edit_json(root, 'val', lambda d: d['annotations'][0].update(bbox=[50, 40, 30, 30]))
    result = check(root, 'val')
    assert result.clean and result.problems.counts['size_from_file'] == 2
    assert result.problems.counts['box_clipped'] == 1
    assert result.annotations.dataset['annotations'][0]['bbox'] == [50.0, 40.0, 14.0, 8.0]


def test_high_bit_depth_note(root):
    PIL.Image.fromarray(np.full((48, 64), 30000, np.uint16)).save(image_path(root, 'train', 'ir', 4))
    result = check(root)
    assert result.clean and [e.ref for e in result.problems.examples['high_bit_depth']] == ['000004.png (I;16)']


def test_category_out_of_range_is_an_error_of_the_split(root):
    edit_json(root, 'train', lambda d: d['annotations'][0].update(category_id=7))
    result = check(root)
    assert not result.clean and result.problems.counts['category_out_of_range'] == 1


def test_cache_answers_unchanged_files_and_reprobes_changed_ones(root, cache_in_tmp):
    first = check(root)
    assert first.num_cached == 0 and len(list(cache_in_tmp.iterdir())) == 2  # one file per image folder
    assert check(root).num_cached == 8
    path = image_path(root, 'train', 'rgb', 1)
    path.write_bytes(b'broken now')
    again = check(root)
    assert again.num_cached == 7 and list(again.bad_pairs) == [1]
    os.utime(path, ns=(0, 0))
    assert check(root).num_cached == 7  # a different mtime: probed again


def test_cache_off_and_unwritable_cache(root, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv('CAFF_DATA_CHECK_CACHE', 'off')
    assert check(root).num_cached == 0 and check(root).num_cached == 0
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the cache folder should be')
    monkeypatch.setenv('CAFF_DATA_CHECK_CACHE', str(blocker / 'cache'))
    with caplog.at_level(logging.WARNING, logger='caff_dino.datasets'):
        assert check(root).clean
    assert 'cannot write the cache' in caplog.text


def test_corrupt_cache_file_is_ignored(root, cache_in_tmp):
    check(root)
    for entry in cache_in_tmp.iterdir():
        entry.write_text('{not json')
    assert check(root).num_cached == 0


def test_probe_files_runs_in_parallel_and_keeps_every_outcome(tmp_path):
    paths = {}
    for n in range(12):
        PIL.Image.new('L', (10 + n, 8)).save(tmp_path / f'{n}.png')
        paths[str(tmp_path / f'{n}.png')] = str(tmp_path)
    paths[str(tmp_path / 'absent.png')] = str(tmp_path)
    outcomes, cached = probe_files(paths, workers=4, cache=ProbeCache(str(tmp_path / 'c')))
    assert cached == 0 and outcomes[str(tmp_path / 'absent.png')] is None
    assert [outcomes[str(tmp_path / f'{n}.png')] for n in range(12)] == \
        [ImageInfo(10 + n, 8, 'L', 'PNG', 1) for n in range(12)]


def test_bad_val_pair_stops_before_training_with_one_line(root):
    image_path(root, 'val', 'rgb', 2).write_bytes(b'x')
    datasets = {'train': dataset(root, skip=True), 'val': dataset(root, 'val')}
    with pytest.raises(DataError) as info:
        check_before_training(datasets)
    message = str(info.value)
    assert '\n' not in message and message.startswith('1 unusable pair(s) in the val split')
    assert 'visible/test/000002.png: unreadable' in message and 'evaluation never skips a pair' in message


def test_bad_train_pair_without_skip_stops(root):
    image_path(root, 'train', 'ir', 1).unlink()
    with pytest.raises(DataError, match=r'1 unusable pair\(s\) in the train split.*set skip_bad_pairs=True'):
        check_before_training({'train': dataset(root), 'val': dataset(root, 'val')})


def test_bad_train_pairs_are_left_out_counted_and_named(root, caplog):
    image_path(root, 'train', 'ir', 1).unlink()
    image_path(root, 'train', 'rgb', 3).write_bytes(b'x')
    train, val = dataset(root, skip=True), dataset(root, 'val')
    with caplog.at_level(logging.INFO, logger='caff_dino.datasets'):
        check_before_training({'train': train, 'val': val})
    assert train.ids == [2, 4] and set(train.left_out) == {1, 3} and len(val) == 2
    assert '1 pairs with a missing image file [missing_file]: IR 000001.png' in caplog.text
    assert 'unreadable_image]: RGB 000003.png' in caplog.text
    assert '2 of 4 pairs left out, 2 remain' in caplog.text


def test_val_ground_truth_gets_the_clipped_boxes_and_the_warning(tmp_path, caplog):
    root = write_llvip(tmp_path / 'data', with_sizes=False)
    edit_json(root, 'val', lambda d: d['annotations'][1].update(bbox=[-10, 30, 30, 30]))
    val = dataset(root, 'val')
    assert val.coco.anns[2]['bbox'] == [0.0, 30.0, 20.0, 30.0]  # before the check: the height is unknown
    with caplog.at_level(logging.WARNING, logger='caff_dino.datasets'):
        check_before_training({'val': val})
    assert val.coco.anns[2]['bbox'] == [0.0, 30.0, 20.0, 18.0]
    assert 'val split: 1 boxes partly outside their image, clipped to it [box_clipped]: ann 2 of image 2' in caplog.text


def test_every_training_pair_bad_is_an_error(root):
    for n in range(1, 5):
        image_path(root, 'train', 'ir', n).unlink()
    with pytest.raises(DataError, match='every image pair is unusable'):
        check_before_training({'train': dataset(root, skip=True)})


def test_other_ranks_use_rank_zeros_verdict(root, monkeypatch):
    """Rank 1 probes nothing: it applies what rank 0 sent, so every rank leaves out the same pairs."""
    from datasets import check as check_module
    image_path(root, 'train', 'ir', 2).unlink()
    verdict = {'train': check(root)}
    sent = []
    monkeypatch.setattr(check_module.dist, 'is_main_process', lambda: False)
    monkeypatch.setattr(check_module.dist, 'all_gather', lambda obj: sent.append(obj) or [verdict, obj])
    monkeypatch.setattr(check_module, 'check_dataset', lambda *a, **k: pytest.fail('rank 1 must not probe'))
    train = dataset(root, skip=True)
    check_before_training({'train': train})
    assert sent == [None] and train.ids == [1, 3, 4]


def test_rank_zero_failure_reaches_every_rank(root, monkeypatch):
    from datasets import check as check_module
    gathered = []
    monkeypatch.setattr(check_module.dist, 'all_gather', lambda obj: gathered.append(obj) or [obj, None])
    monkeypatch.setattr(check_module, 'check_dataset', lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # rank 0 keeps its traceback ...
        check_before_training({'train': dataset(root)})
    assert isinstance(gathered[0], DataError) and 'failed on rank 0' in str(gathered[0])  # ... the others a line
    gathered.clear()
    monkeypatch.setattr(check_module, 'check_dataset', lambda *a, **k: (_ for _ in ()).throw(DataError('x.json: bad')))
    with pytest.raises(DataError, match='x.json: bad'):
        check_before_training({'train': dataset(root)})
    assert str(gathered[0]) == 'x.json: bad'  # the same user error for every rank


def test_apply_check_raises_annotation_errors_first(root):
    train = dataset(root, skip=True)
    edit_json(root, 'train', lambda d: d['annotations'][0].update(category_id=9))
    with pytest.raises(DataError, match='category_id 9'):
        apply_check(check(root), train)


def test_report_names_the_annotation_file_and_counts(root):
    header = check(root, 'val').report_lines()[0]
    assert header.startswith(f'val: {split_paths(root, "val")[2]} (2 pairs, 2 boxes; images in ')
