"""tools/check_dataset.py: one report over every split, exit 0 when clean and 2 when not, one-line argument errors."""
import subprocess
import sys

import PIL.Image
import pytest

from pair_fixtures import edit_json, image_path, split_paths, write_llvip
from tools import check_dataset

TINY = 'config/DINO/CAFF_tiny.py'


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv('CAFF_DATA_CHECK_CACHE', str(tmp_path / 'cache'))


@pytest.fixture
def root(tmp_path):
    return write_llvip(tmp_path / 'data')


def run_tool(capsys, *args):
    status = check_dataset.main(['-c', TINY, '--dataset_file', 'llvip_fusion', *args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_clean_data_set_exits_0_and_names_the_annotation_files(root, capsys):
    status, out, err = run_tool(capsys, '--coco_path', str(root))
    assert status == 0 and err == []
    assert out[1] == f'annotation files read: {split_paths(root, "train")[2]}, {split_paths(root, "val")[2]}'
    assert out[-1] == 'result: clean'
    assert sum(line.startswith(('train: ', 'val: ')) for line in out) == 2


def test_problems_of_every_kind_are_counted_with_examples_and_exit_2(root, capsys):
    image_path(root, 'train', 'ir', 1).unlink()
    image_path(root, 'train', 'rgb', 2).write_bytes(b'garbage')
    PIL.Image.new('L', (10, 10)).save(image_path(root, 'val', 'ir', 1))
    edit_json(root, 'val', lambda d: d['annotations'].append(
        {'id': 9, 'image_id': 2, 'bbox': [60, 0, 20, 10], 'category_id': 1}))
    edit_json(root, 'train', lambda d: d['annotations'].append(
        {'id': 10, 'image_id': 3, 'bbox': [1, 1, 5, 5], 'category_id': 5}))
    status, out, err = run_tool(capsys, '--coco_path', str(root))
    text = '\n'.join(out)
    assert status == 2 and err == []
    assert '  bad pair  1 pairs with a missing image file [missing_file]: IR 000001.png' in text
    assert '  bad pair  1 pairs with an unreadable, truncated or corrupt image [unreadable_image]: RGB 000002.png' \
        in text
    assert 'pairs whose RGB and IR images differ in size [size_mismatch]: 000001.png' in text
    assert '  fixed     1 boxes partly outside their image, clipped to it [box_clipped]: ann 9 of image 2' in text
    assert "  error     1 annotations whose category_id is outside [0, num_classes) [category_out_of_range]: " \
           "annotations[4] (id 10)" in text
    assert out[-1] == 'result: NOT clean: 1 annotation error(s), 3 bad pair(s)'


def test_clipped_boxes_alone_are_reported_but_clean(root, capsys):
    edit_json(root, 'train', lambda d: d['annotations'][0].update(bbox=[-4, 0, 10, 10]))
    status, out, _ = run_tool(capsys, '--coco_path', str(root), '--split', 'train')
    assert status == 0 and any('[box_clipped]: ann 1 of image 1' in line for line in out)
    assert not any(line.startswith('val:') for line in out)


def test_missing_split_folder_and_broken_json_are_report_entries(root, capsys):
    for modality in ('rgb', 'ir'):
        for n in (1, 2):
            image_path(root, 'val', modality, n).unlink()
    split_paths(root, 'val')[0].rmdir()
    split_paths(root, 'train')[2].write_text('{"images": [')
    status, out, err = run_tool(capsys, '--coco_path', str(root))
    text = '\n'.join(out)
    assert status == 2 and err == []
    assert '[annotation_file]: ' in text and 'LLVIP_train.json: not valid JSON' in text
    assert '[layout]: LLVIP RGB folder not found' in text and 'annotation files read: none' in text


@pytest.mark.parametrize('args, message', [
    (['--coco_path', '/no/such/folder'], "coco_path '/no/such/folder' is not a folder"),
    (['--dataset_file', 'coco'], "key 'dataset_file' = 'coco' is not allowed"),
    (['--options'], 'unrecognized arguments'),
    (['--workers', '0'], '--workers 0: give at least 1'),
])
def test_unusable_arguments_are_one_line(root, capsys, args, message):
    with pytest.raises(SystemExit) as info:  # argparse errors exit from inside the parser
        status = check_dataset.main(['-c', TINY, '--coco_path', str(root), *args])
        raise SystemExit(status)
    _, err = capsys.readouterr()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bad_config_value_is_one_line(root, capsys, write_file):
    config = write_file('cfg.py', f"_base_ = ['{check_dataset.Path(TINY).resolve()}']\nhigh_bit_depth_rule = 'clip'\n")
    status = check_dataset.main(['-c', str(config), '--coco_path', str(root)])
    _, err = capsys.readouterr()
    assert status == 2 and len(err.splitlines()) == 1 and "key 'high_bit_depth_rule' = 'clip' is not allowed" in err


@pytest.mark.slow
def test_runs_as_a_script_with_headers_only(root, tmp_path):
    path = image_path(root, 'val', 'ir', 2)
    path.write_bytes(path.read_bytes()[:300])  # cut after its header: only a decoding check notices
    command = [sys.executable, 'tools/check_dataset.py', '-c', TINY, '--dataset_file', 'llvip_fusion',
               '--coco_path', str(root)]
    env = {'CAFF_DATA_CHECK_CACHE': str(tmp_path / 'cache2'), 'PATH': ''}
    quick = subprocess.run(command + ['--headers-only'], capture_output=True, text=True, env=env)
    full = subprocess.run(command, capture_output=True, text=True, env=env)
    assert quick.returncode == 0, quick.stderr
    assert full.returncode == 2 and '[unreadable_image]: IR 000002.png' in full.stdout
