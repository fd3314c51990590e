"""The catalogue of bad run inputs and faults, one named test per kind, and how each ends.

Every case runs ``main.main`` (the command line) and must end the same way: exit status 2, exactly one line on
stderr (``error: ...``), naming the culprit (the flag, file, key or value) and saying what to do; never a
traceback. Bad data sets are catalogued in tests/test_bad_data.py; distributed runs in tests/test_torchrun.py.

| kind | case | ends with |
|---|---|---|
| command line | unknown flag, flag without its value, value of the wrong type, no config | the flag / value |
| command line | --resume with --pretrain_*, --eval without weights | the flags |
| config file | missing, not .py, syntax error, raises while executing, missing _base_ | the file (and line) |
| config keys | unknown key, wrong type | the key (and the closest known one) |
| config values | out of range (options and file), bad choice, probability > 1, hidden_dim % 32 | key, value, rule |
| config across keys | dn_labelbook_size < num_classes, num_feature_levels < levels, hidden_dim % nheads | the keys |
| device | not a device name | the value |
| checkpoint | missing, a directory, not a torch file, truncated, not a checkpoint dict, unsafe | the file |
| checkpoint | a damaged entry (epoch, lr_scheduler, best, rng_state); a finished run with no epoch left | the file, the entry |
| checkpoint | another architecture (--resume), CAFF file to --pretrain_model_coco, DINO file to | the file, the flag |
|            | --pretrain_model_path | that fits |
| output dir | holds a run (no --resume), is a file | the dir |
| data | coco_path missing, fewer pairs than a batch, a pair failing inside a DataLoader worker | the path |
| data | images the eval sizes make too small for the model (a 1x1 map under GroupNorm), fewer feature-map tokens than num_queries | the sizes, the keys |
| config | all matching costs 0; a value a model constructor refuses | the keys |
| run integrity | the weights diverge (NaN outputs) after a good epoch | the step; the last good checkpoint, kept |
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from datasets.pairs import BadPairError, PairedCocoDataset
from datasets.synthetic import generate_synthetic_dataset
from models import build_model
from util.checkpoint import load_checkpoint, save_checkpoint
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / 'config' / 'DINO' / 'CAFF_tiny.py'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_dataset(root, num_train=4, num_val=2, width=128, height=96)
    return root


@pytest.fixture
def cli(tiny_run_options):
    """cli(data_root, output_dir, *flags, options=[...], config=TINY) -> main.py's argv."""

    def argv(data_root, output_dir, *extra: str, options=(), config=TINY) -> list[str]:
        return ['-c', str(config), '--coco_path', str(data_root), '--output_dir', str(output_dir),
                '--num_workers', '0', *extra, '--options', *tiny_run_options, 'epochs=1', *options]

    return argv


@pytest.fixture(scope='module')
def good_run(tmp_path_factory, data_root, tiny_run_options) -> Path:
    """An output dir with one completed training epoch (checkpoint.pth of epoch 0)."""
    out = tmp_path_factory.mktemp('good') / 'run'
    argv = ['-c', str(TINY), '--coco_path', data_root, '--output_dir', str(out), '--num_workers', '0',
            '--options', *tiny_run_options, 'epochs=1']
    assert main.main(argv) == 0
    return out


def ends_with_one_line(capsys, argv: list[str], *culprits: str) -> str:
    """Run main.main(argv); assert exit 2 and one stderr line that names every culprit; return the line."""
    assert main.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def tiny_state(tiny_run_options, **overrides) -> dict:
    model, _, _ = build_model(load_config(TINY, [*tiny_run_options, *(f'{k}={v!r}' for k, v in overrides.items())]))
    return model.state_dict()


# ----------------------------------------------------------------------------------------------- command line

def test_unknown_flag(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, [*cli(data_root, tmp_path / 'o'), '--epochs', '3'], '--epochs', 'unrecognized')


def test_flag_without_its_value(capsys):
    ends_with_one_line(capsys, ['-c', str(TINY), '--resume'], '--resume', 'expected one argument')


def test_flag_value_of_the_wrong_type(capsys):
    ends_with_one_line(capsys, ['-c', str(TINY), '--seed', 'abc'], '--seed', "'abc'")


def test_no_config_file(capsys):
    ends_with_one_line(capsys, ['--coco_path', 'x'], 'config file is required', '-c')


def test_resume_combined_with_a_pretrain_flag(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', 'a.pth', '--pretrain_model_path', 'b.pth'),
                       '--resume', '--pretrain_model_path', 'cannot be combined')


def test_finetune_ignore_with_an_empty_substring(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--pretrain_model_path', 'a.pth', '--finetune_ignore',
                                   ''), "--finetune_ignore ''", 'nothing would load')


def test_eval_without_a_checkpoint(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--eval'), '--eval', '--resume', '--pretrain_model_path')
    assert not (tmp_path / 'o' / 'detections_bbox.json').exists(), 'nothing was evaluated'


# ------------------------------------------------------------------------------------------------ config file

def test_config_file_missing(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=tmp_path / 'nope.py'), 'nope.py',
                       'no such config file')


def test_config_file_not_python(capsys, data_root, tmp_path, cli, write_file):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=write_file('c.yaml', 'lr: 1')), 'c.yaml', '.py')


def test_config_file_with_a_syntax_error(capsys, data_root, tmp_path, cli, write_file):
    config = write_file('broken.py', f"_base_ = ['{TINY}']\nlr = (1e-4\n")
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=config), 'broken.py', 'line 2')


def test_config_file_that_raises_while_it_executes(capsys, data_root, tmp_path, cli, write_file):
    config = write_file('raises.py', f"_base_ = ['{TINY}']\nimport math\n\nlr = math.sqrt(-1)\n")
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=config), 'raises.py', 'line 4', 'ValueError',
                       'math domain error')


def test_config_base_that_does_not_exist(capsys, data_root, tmp_path, cli, write_file):
    config = write_file('child.py', "_base_ = ['absent_base.py']\n")
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=config), 'absent_base.py')


# ------------------------------------------------------------------------------------------------ config keys

def test_unknown_key_in_options(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['hiden_dim=32']), 'hiden_dim', "'hidden_dim'")


def test_unknown_key_in_a_file(capsys, data_root, tmp_path, cli, write_file):
    config = write_file('typo.py', f"_base_ = ['{TINY}']\nnum_querys = 10\n")
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=config), 'typo.py', 'num_querys', 'num_queries')


def test_value_of_the_wrong_type(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['epochs=1.5']), 'epochs', '1.5')


# ---------------------------------------------------------------------------------------------- config values

@pytest.mark.parametrize('option,culprits', [
    ('batch_size=0', ('batch_size', '0', '>= 1')),
    ('epochs=0', ('epochs', '>= 1')),
    ('lr_drop=0', ('lr_drop', '>= 1')),
    ('lr=-0.001', ('lr', '-0.001', '> 0')),
    ('print_freq=0', ('print_freq', '>= 1')),
    ('ema_decay=1.0', ('ema_decay', '(0, 1)')),
])
def test_numeric_value_out_of_range(capsys, data_root, tmp_path, cli, option, culprits):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=[option]), '--options', *culprits)


def test_value_out_of_range_names_the_file_that_set_it(capsys, data_root, tmp_path, cli, write_file):
    config = write_file('zero_drop.py', f"_base_ = ['{TINY}']\nlr_drop = 0\n")
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', config=config), 'zero_drop.py', 'lr_drop', '>= 1')


def test_string_value_not_among_the_choices(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=["fusion_type='sum'"]), 'fusion_type', "'sum'",
                       "'caff'", "'concat'")


def test_dataset_file_not_among_the_choices(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--dataset_file', 'kitti'), 'dataset_file', 'kitti',
                       'llvip_fusion')


def test_probability_above_one(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['dn_label_noise_ratio=1.5']),
                       'dn_label_noise_ratio', '1.5', '[0, 1]')


def test_hidden_dim_not_a_multiple_of_32(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['hidden_dim=48']), 'hidden_dim', '48',
                       'multiple of 32')


@pytest.mark.parametrize('options,culprits', [
    (['dn_labelbook_size=2'], ('dn_labelbook_size=2', 'num_classes=3')),
    (['num_feature_levels=2'], ('num_feature_levels=2', 'return_interm_indices')),
    (['hidden_dim=64', 'nheads=3'], ('hidden_dim=64', 'nheads=3')),
    (['set_cost_class=0', 'set_cost_bbox=0', 'set_cost_giou=0'], ('set_cost_class=0', 'set_cost_giou=0')),
], ids=['dn_labelbook_size_vs_num_classes', 'levels_vs_returned_stages', 'hidden_dim_vs_nheads',
        'all_matching_costs_zero'])
def test_keys_that_contradict_each_other(capsys, data_root, tmp_path, cli, options, culprits):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=options), *culprits)


def test_device_that_is_not_a_device_name(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--device', 'gpu0'), 'gpu0', 'cpu')


# ------------------------------------------------------------------------------------------------- checkpoint

def test_resume_from_a_missing_file(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(tmp_path / 'gone.pth')), '--resume',
                       'gone.pth', 'does not exist')


def test_resume_from_a_directory(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(tmp_path)), str(tmp_path),
                       'is a directory')


@pytest.mark.parametrize('content', [b'', b'\x00' * 64, b'epoch,loss\n0,1.5\n'], ids=['empty', 'zeros', 'csv'])
def test_a_file_that_is_not_a_checkpoint(capsys, data_root, tmp_path, cli, content):
    path = tmp_path / 'broken.pth'
    path.write_bytes(content)
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--pretrain_model_path', str(path)), 'broken.pth',
                       'not a torch checkpoint')


def test_a_truncated_checkpoint(capsys, data_root, tmp_path, cli, tiny_run_options):
    path = tmp_path / 'cut.pth'
    save_checkpoint({'model': tiny_state(tiny_run_options)}, str(path))
    path.write_bytes(path.read_bytes()[:4096])
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(path)), 'cut.pth', 'truncated')


@pytest.mark.parametrize('obj,culprit', [([1, 2, 3], 'saved by main.py or the reference'),
                                         ({'epoch': 3, 'results': [0.5]}, "no 'model' state dict"),
                                         ({'stats': torch.zeros(12)}, "holds none of the model's keys")],
                         ids=['a_list', 'a_dict_without_model', 'tensors_of_something_else'])
def test_a_torch_file_that_is_not_a_checkpoint_dict(capsys, data_root, tmp_path, cli, obj, culprit):
    path = tmp_path / 'other.pth'
    torch.save(obj, path)
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(path)), 'other.pth', culprit)


class Unknown:
    """A class outside the weights-only allow-list."""


def test_a_checkpoint_with_objects_beyond_weights(capsys, data_root, tmp_path, cli):
    path = tmp_path / 'pickled.pth'
    torch.save({'model': {}, 'extra': Unknown()}, path)
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(path)), 'pickled.pth',
                       '--allow_unsafe_checkpoint')


@pytest.mark.parametrize('key,value,culprit', [('epoch', 'zero', 'lr_scheduler / epoch entry is damaged'),
                                               ('lr_scheduler', 5, 'lr_scheduler / epoch entry is damaged'),
                                               ('best', {'metric': 'high'}, 'best entry is damaged'),
                                               ('rng_state', [{'python': 1}], 'rng_state entry is damaged')])
@pytest.mark.slow
def test_a_training_checkpoint_with_a_damaged_entry(capsys, good_run, data_root, tmp_path, cli, key, value, culprit):
    path = tmp_path / 'damaged.pth'
    save_checkpoint({**load_checkpoint(str(good_run / 'checkpoint.pth')), key: value}, str(path))
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(path), options=['epochs=2']),
                       'damaged.pth', culprit)


@pytest.mark.slow
def test_resume_of_a_run_with_no_epoch_left(capsys, good_run, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(good_run / 'checkpoint.pth')),
                       'completed epoch 0 and epochs=1', 'nothing is left to train', '--eval')


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_architecture(capsys, data_root, tmp_path, cli, tiny_run_options):
    path = tmp_path / 'wide.pth'
    save_checkpoint({'model': tiny_state(tiny_run_options, hidden_dim=64), 'epoch': 0}, str(path))
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--resume', str(path)), 'wide.pth',
                       'does not match the model', '--pretrain_model_path')


@pytest.mark.slow
def test_a_caff_checkpoint_given_as_the_coco_pretrained_model(capsys, data_root, tmp_path, cli, tiny_run_options):
    path = tmp_path / 'caff_llvip.pth'
    save_checkpoint({'model': tiny_state(tiny_run_options)}, str(path))
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--pretrain_model_coco', str(path)), 'caff_llvip.pth',
                       'is a CAFF-DINO checkpoint', '--pretrain_model_path')


def test_a_dino_checkpoint_given_as_the_caff_pretrained_model(capsys, data_root, tmp_path, cli, tiny_run_options):
    dino = {('backbone.' + k[len('backbone_visible.'):] if k.startswith('backbone_visible.') else k): v
            for k, v in tiny_state(tiny_run_options).items()
            if not k.startswith(('backbone_ir.', 'input_proj_ir.', 'conv_corr.', 'redim_corr.'))}
    path = tmp_path / 'dino_coco.pth'
    save_checkpoint({'model': dino}, str(path))
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', '--pretrain_model_path', str(path)), 'dino_coco.pth',
                       'mono-spectral DINO', '--pretrain_model_coco')


# ------------------------------------------------------------------------------------------------- output dir

def test_output_dir_that_holds_a_run(capsys, data_root, tmp_path, cli):
    out = tmp_path / 'used'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(b'previous run')
    ends_with_one_line(capsys, cli(data_root, out), str(out), '--resume')
    assert (out / 'checkpoint.pth').read_bytes() == b'previous run'


def test_output_dir_that_is_a_file(capsys, data_root, tmp_path, cli):
    out = tmp_path / 'a_file'
    out.write_text('x')
    ends_with_one_line(capsys, cli(data_root, out), 'a_file', '--output_dir')


# ------------------------------------------------------------------------------------------------------- data

def test_coco_path_that_does_not_exist(capsys, tmp_path, cli):
    ends_with_one_line(capsys, cli(tmp_path / 'no_such_dir', tmp_path / 'o'), 'no_such_dir')


def test_fewer_pairs_than_one_batch(capsys, data_root, tmp_path, cli):
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['batch_size=8']), 'batch_size=8',
                       '4 image pairs')


@pytest.mark.slow
def test_a_pair_that_fails_inside_a_dataloader_worker(capsys, data_root, tmp_path, cli, monkeypatch):
    real_getitem = PairedCocoDataset.__getitem__

    def fail_on_the_second(self, index):
        if index == 1:
            raise BadPairError(f'{data_root}/visible/train/000002.png: unreadable or corrupt image (truncated)')
        return real_getitem(self, index)

    monkeypatch.setattr(PairedCocoDataset, '__getitem__', fail_on_the_second)
    argv = cli(data_root, tmp_path / 'o', options=['num_workers=1', 'batch_size=1'])
    argv.remove('--num_workers')
    argv.remove('0')
    line = ends_with_one_line(capsys, argv, '000002.png', 'unreadable or corrupt image')
    assert 'Traceback' not in line and 'DataLoader worker' not in line


@pytest.mark.slow
def test_more_queries_than_feature_map_tokens(capsys, data_root, tmp_path, cli):
    # 96x128 training images give 192 + 48 + 12 + 4 = 256 tokens over the four levels: too few for 300 queries
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o', options=['num_queries=300']), '256 tokens',
                       'num_queries=300', 'data_aug_scales')


def test_a_model_constructor_that_refuses_a_config_value(capsys, data_root, tmp_path, cli, monkeypatch):
    def refuse(cfg):
        raise ValueError(f'caff_proj_dim={cfg.caff_proj_dim} does not fit')

    monkeypatch.setattr(main, 'build_model', refuse)
    ends_with_one_line(capsys, cli(data_root, tmp_path / 'o'), 'the model cannot be built from this config',
                       'caff_proj_dim=')


@pytest.mark.slow
def test_eval_images_too_small_for_the_model(capsys, good_run, data_root, tmp_path, cli):
    # 128x96 pairs resized to 64x48: the stride-64 level is 1x1, which GroupNorm(32, hidden_dim=32) refuses
    argv = cli(data_root, tmp_path / 'o', '--eval', '--resume', str(good_run / 'checkpoint.pth'),
               options=['eval_size=48', 'eval_max_size=64'])
    ends_with_one_line(capsys, argv, '48x64 input gives a 1x1 map at the stride-64 level', 'eval_size')


# ---------------------------------------------------------------------------------------------- run integrity

@pytest.mark.slow
def test_weights_that_diverge_after_a_good_epoch_keep_its_checkpoint(capsys, good_run, data_root, cli):
    kept = good_run / 'checkpoint.pth'
    before = kept.read_bytes()
    # a learning rate of 1e30 sends the weights to infinity in one step: the next forward pass is NaN
    argv = cli(data_root, good_run, '--resume', str(kept), options=['epochs=2', 'lr=1e30', 'lr_backbone=1e30',
                                                                     'batch_size=1'])
    ends_with_one_line(capsys, argv, 'not finite at epoch 1, step 1', 'lr 1e+30', f'{kept} (epoch 0)')
    assert kept.read_bytes() == before, 'the last good checkpoint is kept as it was'
    assert load_checkpoint(str(kept))['epoch'] == 0


@pytest.mark.slow
def test_a_bad_run_in_a_fresh_process_prints_one_line_and_no_traceback(data_root, tmp_path, cli):
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), *cli(data_root, tmp_path / 'o',
                                                                       options=['batch_size=0'])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'batch_size' in proc.stderr
