"""DDP on CPU: ``torchrun --nproc_per_node=2 main.py`` (gloo) trains one epoch, evaluates across both ranks,
and both ranks end with identical weights; ``--eval`` with ``eval_missing_modality`` gives the single-process
result."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasets.synthetic import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_OPTIONS = ['data_aug_scales=[96]', 'data_aug_scales2_resize=[96]', 'data_aug_scales2_crop=[64,96]',
                'data_aug_max_size=128', 'eval_size=96', 'eval_max_size=128', 'enc_layers=1', 'dec_layers=2',
                'num_queries=20', 'num_select=20', 'dn_number=4', 'hidden_dim=32', 'dim_feedforward=64',
                'batch_size=2', 'epochs=1', 'print_freq=100', 'save_checkpoint_interval=0',
                "msda_backend='pytorch'"]

# Runs main.run under torchrun, then compares the ranks' weights (all_gather) and records the result.
DRIVER = textwrap.dedent('''
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    import main
    from util import dist
    model, stats = main.run(main.get_args_parser().parse_args({argv!r}))
    states = dist.all_gather(model.state_dict())
    if dist.is_main_process():
        identical = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
        with open({result!r}, 'w') as f:
            json.dump({{'world_size': dist.get_world_size(), 'identical': identical,
                        'coco_eval_bbox': stats['coco_eval_bbox']}}, f)
    torch.distributed.destroy_process_group()
''')


def test_two_process_gloo_run_trains_one_epoch_with_identical_weights(tmp_path):
    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=4, num_val=3, width=128, height=96)
    out = tmp_path / 'out'
    argv = ['-c', str(REPO / 'config/DINO/CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
            '--device', 'cpu', '--num_workers', '0', '--options', *TINY_OPTIONS]
    result = tmp_path / 'result.json'
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), argv=argv, result=str(result)))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(driver)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome['world_size'] == 2 and outcome['identical']
    (record,) = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert record['epoch'] == 0 and record['test_coco_eval_bbox'] == outcome['coco_eval_bbox']
    assert (out / 'checkpoint.pth').is_file()


@pytest.mark.slow
def test_two_process_eval_with_the_ir_image_missing_equals_one_process(tmp_path):
    import main
    from models import build_model
    from util.checkpoint import save_checkpoint
    from util.config import load_config

    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=4, num_val=4, width=128, height=96)
    cfg = load_config(REPO / 'config/DINO/CAFF_tiny.py', TINY_OPTIONS)
    checkpoint = tmp_path / 'random.pth'
    save_checkpoint({'model': build_model(cfg)[0].state_dict(), 'epoch': 0}, str(checkpoint))

    def argv(out):
        return ['-c', str(REPO / 'config/DINO/CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
                '--device', 'cpu', '--num_workers', '0', '--eval', '--resume', str(checkpoint),
                '--options', *TINY_OPTIONS, "eval_missing_modality='ir'"]

    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'main.py'), *argv(tmp_path / 'ddp')], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main.main(argv(tmp_path / 'single')) == 0
    records = {name: [json.loads(line) for line in (tmp_path / name / 'log.txt').read_text().splitlines()]
               for name in ('ddp', 'single')}
    (ddp,), (single,) = records['ddp'], records['single']
    assert ddp['mode'] == 'eval' and ddp['test_missing_modality'] == single['test_missing_modality'] == 'ir'
    assert ddp['test_coco_eval_bbox'] == single['test_coco_eval_bbox']
    assert 'IR image missing on every pair' in (tmp_path / 'ddp' / 'info.txt').read_text()
    detections = {name: sorted(json.loads((tmp_path / name / 'detections_bbox.json').read_text()),
                               key=lambda d: (d['image_id'], -d['score']))
                  for name in ('ddp', 'single')}
    assert len(detections['ddp']) == len(detections['single']) > 0
    for a, b in zip(detections['ddp'], detections['single']):
        assert a['image_id'] == b['image_id'] and a['category_id'] == b['category_id']
        assert a['score'] == pytest.approx(b['score'], abs=1e-5)
