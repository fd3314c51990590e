"""main.py end to end on a tiny synthetic set: train + eval with the data set's own (string) image ids, --eval
reproduces, resume after kill -9, resume equals an uninterrupted run, resume applies a changed config, EMA weights
evaluated and kept, eval_interval. The bad inputs are tests/test_bad_runs.py."""
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
from util.checkpoint import load_checkpoint, save_checkpoint
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = 'config/DINO/CAFF_tiny.py'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_dataset(root, num_train=4, num_val=3, width=128, height=96)
    return root


@pytest.fixture(scope='module')
def string_id_root(tmp_path_factory, string_image_ids) -> str:
    """A synthetic set whose validation annotation file names its images with strings ('frame-<n>')."""
    root = tmp_path_factory.mktemp('string_ids')
    generate_synthetic_dataset(str(root), num_train=4, num_val=3, width=128, height=96)
    string_image_ids(root, 'frame-{}')
    return str(root)


@pytest.fixture
def cli(tiny_run_options):
    """cli(data_root, output_dir, *flags, options=[...]) -> main.py's argv for a run of seconds."""

    def argv(data_root: str, output_dir, *extra: str, options=()) -> list[str]:
        return ['-c', str(REPO / TINY), '--coco_path', data_root, '--output_dir', str(output_dir),
                '--num_workers', '0', *extra, '--options', *tiny_run_options, *options]

    return argv


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


def test_the_demo_config_is_caff_tiny_scored_with_ema_and_nms_and_yields_to_the_command_line():
    demo = main.load_run_config(main.get_args_parser().parse_args(['--demo']))
    tiny = main.load_run_config(main.get_args_parser().parse_args(['-c', str(REPO / TINY)]))
    differs = {k for k in tiny.to_dict() if tiny.to_dict()[k] != demo.to_dict()[k]}
    assert differs == {'output_dir', 'use_ema', 'ema_decay', 'nms_iou_threshold', 'eval_interval'}
    assert demo.use_ema and 0 < demo.nms_iou_threshold <= 1 and not tiny.use_ema and tiny.nms_iou_threshold <= 0
    assert demo.epochs % demo.eval_interval == 0, 'the demo evaluates its last epoch on schedule'
    overridden = main.load_run_config(main.get_args_parser().parse_args(['--demo', '--options', 'ema_decay=0.9']))
    assert overridden.ema_decay == 0.9 and overridden.use_ema
    chosen = main.load_run_config(main.get_args_parser().parse_args(['--demo', '-c', str(REPO / TINY)]))
    assert not chosen.use_ema, '-c picks the config of a --demo run'


@pytest.mark.slow
def test_train_eval_checkpoints_log_and_eval_reproduces(string_id_root, tmp_path, cli):
    """Two epochs, so that the second evaluation follows an optimiser step after the first one: it must score the
    weights of then, as a fresh --eval of the saved checkpoint does (no inference weights kept from before)."""
    out = tmp_path / 'run'
    assert main.main(cli(string_id_root, out, options=['epochs=2'])) == 0
    for name in ('checkpoint.pth', 'checkpoint_best_regular.pth', 'log.txt', 'info.txt', 'config_cfg.py',
                 'detections_bbox.json'):
        assert (out / name).is_file(), name
    records = read_log(out)
    record = records[-1]
    assert [r['epoch'] for r in records] == [0, 1] and len(record['test_coco_eval_bbox']) == 12
    assert all(k in record for k in ('train_loss', 'train_loss_ce', 'train_lr', 'test_loss', 'best_res'))
    checkpoint = load_checkpoint(str(out / 'checkpoint.pth'))
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'config', 'best', 'rng_state'} <= set(checkpoint)
    assert checkpoint['config']['num_classes'] == 3 and checkpoint['epoch'] == 1
    rows = json.loads((out / 'detections_bbox.json').read_text())
    assert rows and all(set(row) == {'image_id', 'category_id', 'bbox', 'score'} for row in rows)
    assert {row['image_id'] for row in rows} == {'frame-1', 'frame-2', 'frame-3'}, "the file's own ids"

    assert main.main(cli(string_id_root, out, '--eval', '--resume', str(out / 'checkpoint.pth'),
                         options=['epochs=2'])) == 0
    evaluated = read_log(out)[-1]
    assert evaluated['mode'] == 'eval'
    assert evaluated['test_coco_eval_bbox'] == pytest.approx(record['test_coco_eval_bbox'], abs=1e-6)
    assert evaluated['test_loss'] == pytest.approx(record['test_loss'], rel=1e-5)


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_last_complete_epoch(data_root, tmp_path, cli):
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


@pytest.mark.slow
def test_one_epoch_then_resume_equals_two_epochs_in_one_go(data_root, tmp_path, cli):
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


@pytest.mark.slow
def test_resume_applies_the_new_hyperparameters_and_records_them(data_root, tmp_path, cli):
    out = tmp_path / 'changed'
    assert main.main(cli(data_root, out, options=['epochs=1', 'lr=4e-4', 'lr_drop=8', 'weight_decay=1e-4'])) == 0
    assert main.main(cli(data_root, out, '--resume', str(out / 'checkpoint.pth'),
                         options=['epochs=2', 'lr=1e-4', 'lr_drop=1', 'weight_decay=0.05'])) == 0
    # StepLR with the new values: epoch 1 trains at lr * 0.1 ** (1 // lr_drop)
    expected_lr = 1e-4 * 0.1 ** (1 // 1)
    assert read_log(out)[-1]['epoch'] == 1 and read_log(out)[-1]['train_lr'] == pytest.approx(expected_lr)
    saved = load_checkpoint(str(out / 'checkpoint.pth'))
    groups = saved['optimizer']['param_groups']
    assert [g['initial_lr'] for g in groups] == [1e-4, 4e-4]  # lr_backbone is unchanged (CAFF_tiny: 4e-4)
    assert all(g['weight_decay'] == 0.05 for g in groups) and saved['lr_scheduler']['step_size'] == 1
    assert saved['config']['lr'] == 1e-4
    assert load_config(out / 'config_cfg.py').lr == 1e-4, 'config_cfg.py is the config in effect'
    info = (out / 'info.txt').read_text()
    assert 'lr: 0.0004 -> 0.0001' in info and 'lr_drop: 8 -> 1' in info and 'weight_decay: 0.0001 -> 0.05' in info


@pytest.mark.slow
def test_ema_weights_are_evaluated_logged_and_kept(data_root, tmp_path, cli):
    out = tmp_path / 'ema'
    assert main.main(cli(data_root, out, options=['epochs=1', 'use_ema=True', 'ema_decay=0.5'])) == 0
    (record,) = read_log(out)
    assert len(record['ema_test_coco_eval_bbox']) == 12 and record['ema_best_ep'] == 0
    assert record['ema_best_res'] == record['ema_test_coco_eval_bbox'][0]
    best_ema = load_checkpoint(str(out / 'checkpoint_best_ema.pth'))
    last = load_checkpoint(str(out / 'checkpoint.pth'))
    assert 'ema_model' not in best_ema and best_ema['model'].keys() == last['ema_model'].keys()
    assert all(torch.equal(v, last['ema_model'][k]) for k, v in best_ema['model'].items())
    assert not all(torch.equal(v, last['model'][k]) for k, v in best_ema['model'].items()), 'EMA != weights'
    # evaluating the kept file gives the EMA numbers of the log
    assert main.main(cli(data_root, out, '--eval', '--resume', str(out / 'checkpoint_best_ema.pth'))) == 0
    assert read_log(out)[-1]['test_coco_eval_bbox'] == pytest.approx(record['ema_test_coco_eval_bbox'], abs=1e-6)


@pytest.mark.slow
def test_eval_interval_evaluates_every_kth_epoch_and_the_last(data_root, tmp_path, cli):
    out = tmp_path / 'interval'
    assert main.main(cli(data_root, out, options=['epochs=3', 'eval_interval=2', 'use_ema=True'])) == 0
    records = read_log(out)
    assert [r['epoch'] for r in records] == [0, 1, 2], 'every epoch is trained, checkpointed and logged'
    assert [('test_coco_eval_bbox' in r, 'ema_test_coco_eval_bbox' in r) for r in records] == [
        (False, False), (True, True), (True, True)]
    assert records[-1]['best_ep'] in (1, 2) and records[-1]['ema_best_ep'] in (1, 2)
    assert load_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == 2
    assert 'epoch 0: trained; eval_interval=2, so it is not evaluated' in (out / 'info.txt').read_text()


@pytest.mark.slow
def test_eval_with_a_missing_modality_says_so_in_the_log_and_log_txt(data_root, tmp_path, cli, tiny_run_options):
    model, _, _ = build_model(load_config(REPO / TINY, tiny_run_options))
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
