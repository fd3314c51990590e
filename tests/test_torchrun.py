"""DDP on CPU: ``torchrun --nproc_per_node=2 main.py`` (gloo) trains one epoch, evaluates across both ranks,
and both ranks end with identical weights."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
