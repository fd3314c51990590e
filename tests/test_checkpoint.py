"""util/checkpoint.py: atomic saves, weights-only loads, partial loads with a report, DDP prefixes."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from util import checkpoint as ckpt
from util.checkpoint import CheckpointError


class Net(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.class_embed = nn.Linear(8, num_classes)


class NotAllowed:
    """A class outside the weights-only allow-list."""


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    ckpt.save_checkpoint({'model': {'w': torch.ones(2)}, 'epoch': 0}, path)
    real_save = torch.save

    def save_then_die(obj, f):
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt('killed mid-save')

    monkeypatch.setattr(torch, 'save', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({'model': {'w': torch.zeros(2)}, 'epoch': 1}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    loaded = ckpt.load_checkpoint(path)
    assert loaded['epoch'] == 0 and torch.equal(loaded['model']['w'], torch.ones(2))
    assert os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.mark.slow
def test_a_save_killed_mid_write_leaves_a_stray_that_the_next_save_removes(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    ckpt.save_checkpoint({'model': {'w': torch.ones(2)}, 'epoch': 0}, str(path))
    # A fresh process dies (os._exit: no cleanup runs, as with kill -9) after writing part of the next save.
    killed_save = (
        'import os, sys, torch\n'
        'from util import checkpoint\n'
        'def write_part_then_die(obj, f):\n'
        '    f.write(b"partial"); f.flush(); os._exit(9)\n'
        'torch.save = write_part_then_die\n'
        'checkpoint.save_checkpoint({"epoch": 1}, sys.argv[1])\n')
    repo = Path(__file__).resolve().parents[1]
    rc = subprocess.run([sys.executable, '-c', killed_save, str(path)], cwd=repo).returncode
    assert rc == 9
    assert len(os.listdir(tmp_path)) == 2, 'the killed save should have left its temporary file'
    assert ckpt.load_checkpoint(str(path))['epoch'] == 0
    ckpt.save_checkpoint({'model': {'w': torch.zeros(2)}, 'epoch': 2}, str(path))
    assert os.listdir(tmp_path) == ['checkpoint.pth']
    assert ckpt.load_checkpoint(str(path))['epoch'] == 2


def test_saved_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    ckpt.save_checkpoint({'model': {}}, str(path))
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_copy_checkpoint_survives_the_source_being_replaced(tmp_path):
    last, best = str(tmp_path / 'checkpoint.pth'), str(tmp_path / 'checkpoint_best_regular.pth')
    ckpt.save_checkpoint({'model': {'w': torch.ones(2)}, 'epoch': 0}, last)
    ckpt.copy_checkpoint(last, best)
    ckpt.save_checkpoint({'model': {'w': torch.zeros(2)}, 'epoch': 1}, last)
    assert ckpt.load_checkpoint(best)['epoch'] == 0 and ckpt.load_checkpoint(last)['epoch'] == 1
    ckpt.copy_checkpoint(last, best)
    assert ckpt.load_checkpoint(best)['epoch'] == 1
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'checkpoint_best_regular.pth']


def test_namespace_is_allowed_other_objects_need_the_unsafe_flag(tmp_path):
    ok = tmp_path / 'ref.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'args': argparse.Namespace(lr=1e-4)}, ok)
    assert ckpt.load_checkpoint(str(ok))['args'].lr == 1e-4

    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'extra': NotAllowed()}, unsafe)
    with pytest.raises(CheckpointError, match='--allow_unsafe_checkpoint'):
        ckpt.load_checkpoint(str(unsafe))
    assert isinstance(ckpt.load_checkpoint(str(unsafe), allow_unsafe=True)['extra'], NotAllowed)


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all', None])
def test_unreadable_or_truncated_files_raise_one_line_errors(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content is None:
        torch.save({'model': {'w': torch.randn(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(str(path))
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_missing_file_and_non_checkpoint_dict(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        ckpt.load_checkpoint(str(tmp_path / 'nope.pth'))
    path = tmp_path / 'odd.pth'
    torch.save({'weights': [1, 2]}, path)
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        ckpt.load_checkpoint(str(path))
    torch.save({'model': [1, 2]}, path)
    with pytest.raises(CheckpointError, match='not a state dict'):
        ckpt.load_checkpoint(str(path))
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match='holds a list'):
        ckpt.load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match='is a directory'):
        ckpt.load_checkpoint(str(tmp_path))


def test_a_failed_write_is_a_checkpoint_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    ckpt.save_checkpoint({'model': {'w': torch.ones(2)}, 'epoch': 0}, str(path))

    def disk_full(src, dst):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'replace', disk_full)
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint({'model': {'w': torch.zeros(2)}, 'epoch': 1}, str(path))
    monkeypatch.undo()
    assert str(path) in str(info.value) and 'No space left' in str(info.value) and '\n' not in str(info.value)
    assert ckpt.load_checkpoint(str(path))['epoch'] == 0 and os.listdir(tmp_path) == ['checkpoint.pth']


def test_bare_state_dict_is_wrapped(tmp_path):
    path = tmp_path / 'bare.pth'
    torch.save(Net().state_dict(), path)
    assert set(ckpt.load_checkpoint(str(path))['model']) == set(Net().state_dict())


def test_partial_load_skips_shape_mismatch_and_ignored_keys_and_reports_them():
    source = Net(num_classes=5)
    target = Net(num_classes=3)
    before = target.class_embed.weight.clone()
    state = {**source.state_dict(), 'extra.weight': torch.zeros(1)}
    report = ckpt.load_partial_state_dict(target, state, ignore=['backbone.bias'], source='test')
    assert torch.equal(target.backbone.weight, source.backbone.weight)
    assert torch.equal(target.class_embed.weight, before)
    assert [k for k, _, _ in report.skipped_shape] == ['class_embed.weight', 'class_embed.bias']
    assert report.skipped_shape[0][1:] == ((5, 8), (3, 8))
    assert report.ignored == ['backbone.bias'] and report.unexpected == ['extra.weight']
    assert report.loaded == ['backbone.weight']
    assert set(report.new) == {'backbone.bias', 'class_embed.weight', 'class_embed.bias'}
    text = report.summary()
    assert 'class_embed.weight: checkpoint [5, 8] vs model [3, 8]' in text and 'skipped, shape mismatch: 2' in text


def test_wrapped_model_and_prefixed_source_lose_no_key():
    source = Net()
    prefixed = {f'module.{k}': v for k, v in source.state_dict().items()}
    wrapped = nn.DataParallel(Net())
    report = ckpt.load_partial_state_dict(wrapped, prefixed)
    assert len(report.loaded) == 4 and not report.new and not report.unexpected
    assert torch.equal(wrapped.module.class_embed.bias, source.class_embed.bias)
