"""main.py end to end on a tiny synthetic set: train + eval, --eval reproduces, resume after kill -9, pretrain
loading, occupied output dirs, and the one-line errors for bad input."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from datasets.synthetic import generate_synthetic_dataset
from models import build_model
from util.checkpoint import load_checkpoint, load_pretrained_caff, load_pretrained_coco, save_checkpoint
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = 'config/DINO/CAFF_tiny.py'
# 96 px images, one encoder / decoder layer: seconds per epoch on a CPU.
TINY_OPTIONS = ['data_aug_scales=[96]', 'data_aug_scales2_resize=[96]', 'data_aug_scales2_crop=[64,96]',
                'data_aug_max_size=128', 'eval_size=96', 'eval_max_size=128', 'enc_layers=1', 'dec_layers=2',
                'num_queries=20', 'num_select=20', 'dn_number=4', 'hidden_dim=32', 'dim_feedforward=64',
                'batch_size=2', 'print_freq=100', 'save_checkpoint_interval=0', "msda_backend='pytorch'"]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_dataset(root, num_train=4, num_val=3, width=128, height=96)
    return root


def cli(data_root: str, output_dir, *extra: str, options=()) -> list[str]:
    return ['-c', str(REPO / TINY), '--coco_path', data_root, '--output_dir', str(output_dir),
            '--num_workers', '0', *extra, '--options', *TINY_OPTIONS, *options]


def tiny_config(**overrides):
    options = [*TINY_OPTIONS, *(f'{k}={v!r}' for k, v in overrides.items())]
    return load_config(REPO / TINY, options)


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / 'log.txt').read_text().splitlines()]


def test_reference_readme_commands_parse_verbatim():
    parser = main.get_args_parser()
    first = parser.parse_args(
        '-c config/DINO/DINO_5scale_swin.py --dataset_file=flir_fusion --coco_path=./FLIR_aligned_coco '
        '--pretrain_model_coco=./coco_pretrained_weights/checkpoint0027_5scale_swin.pth'.split())
    assert first.config_file == 'config/DINO/DINO_5scale_swin.py' and first.dataset_file == 'flir_fusion'
    assert first.pretrain_model_coco == './coco_pretrained_weights/checkpoint0027_5scale_swin.pth'
    second = parser.parse_args(
        '-c config/DINO/DINO_5scale_swin.py --dataset_file=flir_fusion --coco_path=./FLIR-style_dataset '
        '--pretrain_model_path=./flir_training_output/checkpoint_best_regular.pth'.split())
    assert second.coco_path == './FLIR-style_dataset'
    assert second.pretrain_model_path == './flir_training_output/checkpoint_best_regular.pth'
    cfg = main.load_run_config(parser.parse_args(
        ['-c', str(REPO / 'config/DINO/DINO_5scale_swin.py'), '--dataset_file=flir_fusion', '--seed', '7',
         '--amp', '--options', 'epochs=3']))
    assert (cfg.dataset_file, cfg.seed, cfg.amp, cfg.epochs) == ('flir_fusion', 7, True, 3)
    assert cfg.output_dir, 'the default output_dir must not be empty (the reference crashes on it)'


def test_demo_defaults_to_the_tiny_config_and_the_synthetic_data(tmp_path, monkeypatch):
    args = main.get_args_parser().parse_args(['--demo'])
    cfg = main.load_run_config(args)
    assert args.config_file == main.DEMO_CONFIG and cfg.coco_path == main.DEMO_DATA
    assert cfg.dataset_file == 'synthetic' and cfg.device == 'cpu'
    written = []
    monkeypatch.setattr('datasets.synthetic.generate_synthetic_dataset', lambda root: written.append(root))
    main.prepare_demo_data(str(tmp_path / 'fresh'))
    (tmp_path / 'present').mkdir()
    (tmp_path / 'present' / 'visible').mkdir()
    main.prepare_demo_data(str(tmp_path / 'present'))
    assert written == [str(tmp_path / 'fresh')], 'the data set is generated only when absent'
    with pytest.raises(main.UsageError, match='config file is required'):
        main.load_run_config(main.get_args_parser().parse_args([]))
    with pytest.raises(main.UsageError, match='not a device name'):
        main.resolve_device('gpu0')


def test_train_eval_checkpoints_log_and_eval_reproduces(data_root, tmp_path):
    out = tmp_path / 'run'
    assert main.main(cli(data_root, out, options=['epochs=1'])) == 0
    for name in ('checkpoint.pth', 'checkpoint_best_regular.pth', 'log.txt', 'info.txt', 'config_cfg.py',
                 'detections_bbox.json'):
        assert (out / name).is_file(), name
    (record,) = read_log(out)
    assert record['epoch'] == 0 and len(record['test_coco_eval_bbox']) == 12
    assert all(k in record for k in ('train_loss', 'train_loss_ce', 'train_lr', 'test_loss', 'best_res'))
    checkpoint = load_checkpoint(str(out / 'checkpoint.pth'))
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'config', 'best_metric'} <= set(checkpoint)
    assert checkpoint['config']['num_classes'] == 3

    assert main.main(cli(data_root, out, '--eval', '--resume', str(out / 'checkpoint_best_regular.pth'),
                         options=['epochs=1'])) == 0
    evaluated = read_log(out)[-1]
    assert evaluated['mode'] == 'eval'
    assert evaluated['test_coco_eval_bbox'] == pytest.approx(record['test_coco_eval_bbox'], abs=1e-6)

    assert main.main(cli(data_root, out, options=['epochs=1'])) == 2, 'an occupied output dir needs --resume'


def test_kill_9_then_resume_continues_from_last_complete_epoch(data_root, tmp_path):
    out = tmp_path / 'killed'
    command = [sys.executable, str(REPO / 'main.py'), *cli(data_root, out, options=['epochs=50'])]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / 'log.txt'
    deadline = time.time() + 900  # generous: the machine running the tests may be shared
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the next epoch (or its checkpoint save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_log(out)
    assert done, 'the run was killed before completing one epoch'
    last_epoch = done[-1]['epoch']
    checkpoint = load_checkpoint(str(out / 'checkpoint.pth'))
    assert checkpoint['epoch'] in (last_epoch, last_epoch + 1)

    resumed_from = checkpoint['epoch']
    assert main.main(cli(data_root, out, '--resume', str(out / 'checkpoint.pth'),
                         options=[f'epochs={resumed_from + 2}'])) == 0
    epochs = [r['epoch'] for r in read_log(out)]
    assert epochs[-1] == resumed_from + 1 and epochs.count(resumed_from + 1) == 1


def test_one_epoch_then_resume_equals_two_epochs_in_one_go(data_root, tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    assert main.main(cli(data_root, whole, options=['epochs=2'])) == 0
    assert main.main(cli(data_root, split, options=['epochs=1'])) == 0
    torch.manual_seed(12345)  # the resumed run must not depend on what ran before it in this process
    assert main.main(cli(data_root, split, '--resume', str(split / 'checkpoint.pth'), options=['epochs=2'])) == 0
    expected = load_checkpoint(str(whole / 'checkpoint.pth'))
    resumed = load_checkpoint(str(split / 'checkpoint.pth'))
    assert resumed['epoch'] == expected['epoch'] == 1
    assert expected['model'].keys() == resumed['model'].keys()
    differing = [k for k, v in expected['model'].items() if not torch.equal(v, resumed['model'][k])]
    assert not differing, f'{len(differing)} tensors differ after resuming, e.g. {differing[:3]}'
    assert read_log(whole)[-1]['train_loss'] == read_log(split)[-1]['train_loss']


def test_pretrain_model_coco_fills_both_branches_equally(tmp_path):
    cfg = tiny_config()
    model, _, _ = build_model(cfg)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_()
    # A mono-spectral DINO checkpoint: one backbone, one input projection, the rest (with its aliased heads) as
    # in CAFF-DINO; random values so that every copied tensor is recognisable.
    dino_state = {}
    for key, value in model.state_dict().items():
        if key.startswith('backbone_visible.'):
            dino_state['backbone.' + key[len('backbone_visible.'):]] = value
        elif not key.startswith(('backbone_ir.', 'input_proj_ir.', 'conv_corr.', 'redim_corr.')):
            dino_state[key] = value
    path = str(tmp_path / 'dino_coco.pth')
    save_checkpoint({'model': dino_state}, path)

    fresh, _, _ = build_model(cfg)
    report = load_pretrained_coco(fresh, path)
    state = fresh.state_dict()
    for key, value in dino_state.items():
        if key.startswith('backbone.'):
            rest = key[len('backbone.'):]
            assert torch.equal(state['backbone_visible.' + rest], value)
            assert torch.equal(state['backbone_ir.' + rest], value)
        elif key.startswith('input_proj.'):
            assert torch.equal(state[key], value) and torch.equal(state['input_proj_ir.' + key[11:]], value)
        else:
            assert torch.equal(state[key], value), key
    assert {k.split('.')[0] for k in report.new} == {'conv_corr', 'redim_corr'}
    assert not report.skipped_shape and not report.unexpected
    assert 'newly initialised' in report.summary()


def test_pretrain_model_path_with_other_num_classes_skips_the_heads(tmp_path):
    source, _, _ = build_model(tiny_config(num_classes=5, dn_labelbook_size=5))
    path = str(tmp_path / 'caff5.pth')
    save_checkpoint({'model': source.state_dict(), 'epoch': 3}, path)
    target, _, _ = build_model(tiny_config())
    report = load_pretrained_caff(target, path)
    skipped = {k for k, _, _ in report.skipped_shape}
    assert 'label_enc.weight' in skipped and any('class_embed' in k for k in skipped)
    assert all('class_embed' in k or k == 'label_enc.weight' for k in skipped)
    assert torch.equal(target.state_dict()['transformer.level_embed'], source.state_dict()['transformer.level_embed'])
    assert 'skipped, shape mismatch' in report.summary()


def test_resume_with_pretrain_flag_is_refused(data_root, tmp_path, capsys):
    rc = main.main(cli(data_root, tmp_path / 'x', '--resume', 'a.pth', '--pretrain_model_path', 'b.pth'))
    assert rc == 2 and 'cannot be combined' in capsys.readouterr().err


@pytest.mark.parametrize('case', ['missing_coco_path', 'wrong_dataset_file', 'unreadable_checkpoint',
                                  'config_typo'])
def test_bad_input_exits_with_one_line(data_root, tmp_path, capsys, case):
    bad_ckpt = tmp_path / 'broken.pth'
    bad_ckpt.write_bytes(b'\x00' * 64)
    args, expected = {
        'missing_coco_path': (cli(str(tmp_path / 'no_such_dir'), tmp_path / 'o1'), 'no_such_dir'),
        'wrong_dataset_file': (cli(data_root, tmp_path / 'o2', '--dataset_file', 'kitti'), 'kitti'),
        'unreadable_checkpoint': (cli(data_root, tmp_path / 'o3', '--pretrain_model_path', str(bad_ckpt)),
                                  'broken.pth'),
        'config_typo': (cli(data_root, tmp_path / 'o4', options=['hiden_dim=32']), 'hiden_dim'),
    }[case]
    assert main.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines


def test_bad_input_in_a_fresh_process_prints_no_traceback(data_root, tmp_path):
    args = cli(data_root, tmp_path / 'o', options=['hiden_dim=32'])
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and 'Traceback' not in proc.stderr
    assert 'hiden_dim' in proc.stderr and 'hidden_dim' in proc.stderr, 'the error names the key and a suggestion'


def test_eval_with_a_missing_modality_says_so_in_the_log_and_log_txt(data_root, tmp_path):
    model, _, _ = build_model(tiny_config())
    checkpoint = str(tmp_path / 'random.pth')
    save_checkpoint({'model': model.state_dict(), 'epoch': 0}, checkpoint)
    out = tmp_path / 'eval'
    detections = {}
    for missing in ('none', 'ir'):
        assert main.main(cli(data_root, out, '--eval', '--resume', checkpoint,
                             options=[f'eval_missing_modality={missing!r}'])) == 0
        detections[missing] = json.loads((out / 'detections_bbox.json').read_text())
    assert [r['test_missing_modality'] for r in read_log(out)] == ['none', 'ir']
    info = (out / 'info.txt').read_text()
    assert info.count('IR image missing on every pair') == 1 and 'RGB image missing' not in info
    assert detections['none'] != detections['ir'], 'the model saw another IR input'
