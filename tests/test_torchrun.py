"""DDP on CPU (gloo, 2 processes): ``torchrun --nproc_per_node=2 main.py`` trains one epoch, evaluates across both
ranks, and both ranks end with identical weights; a user error, whether every rank meets it or only one, ends the
run with one line from rank 0 and exit status 2 on every rank, without a hang;
``--eval`` with ``eval_missing_modality`` gives the single-process result."""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasets.synthetic import generate_synthetic_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # generous: the machine running the tests may be shared; a hang would take gloo's 30 minutes

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

# main.main with the second training pair failing to load on rank 1 only, inside its DataLoader worker.
FAILING_ON_RANK_1 = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {repo!r})
    import main
    from datasets.pairs import BadPairError, PairedCocoDataset
    real_getitem = PairedCocoDataset.__getitem__

    def getitem(self, index):
        if os.environ['RANK'] == '1' and self.skip_bad_pairs is False and len(self) == 4:
            raise BadPairError('/data/visible/train/000003.png: unreadable or corrupt image (truncated)')
        return real_getitem(self, index)

    PairedCocoDataset.__getitem__ = getitem
    sys.exit(main.main({argv!r}))
''')


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('data')
    generate_synthetic_dataset(str(root), num_train=4, num_val=3, width=128, height=96)
    return root


def main_argv(data, out, tiny_run_options, *options) -> list[str]:
    return ['-c', str(REPO / 'config/DINO/CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
            '--device', 'cpu', '--num_workers', '0', '--options', *tiny_run_options, 'epochs=1', *options]


def torchrun(script_or_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           *script_or_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def two_ranks(command: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """The two processes torchrun would start, started by hand, so that each one's exit status and stderr show."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': '2',
               'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith('error: ')]


def test_two_process_gloo_run_trains_one_epoch_with_identical_weights(tmp_path, data, tiny_run_options):
    out = tmp_path / 'out'
    result = tmp_path / 'result.json'
    driver = tmp_path / 'driver.py'
    driver.write_text(DRIVER.format(repo=str(REPO), argv=main_argv(data, out, tiny_run_options), result=str(result)))
    proc = torchrun([str(driver)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome['world_size'] == 2 and outcome['identical']
    (record,) = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert record['epoch'] == 0 and record['test_coco_eval_bbox'] == outcome['coco_eval_bbox']
    assert (out / 'checkpoint.pth').is_file()


def test_an_error_every_rank_meets_is_one_line_from_rank_0(tmp_path, data, tiny_run_options):
    """A bad config value fails before the process group exists; a missing data set after it."""
    for root, options, culprit in ((data, ['batch_size=0'], 'batch_size'), (tmp_path / 'absent', [], 'absent')):
        ranks = two_ranks([sys.executable, str(REPO / 'main.py'), *main_argv(root, tmp_path / 'o', tiny_run_options,
                                                                             *options)], tmp_path)
        assert [r.returncode for r in ranks] == [2, 2]
        assert error_lines(ranks[0].stderr) and culprit in error_lines(ranks[0].stderr)[0]
        assert ranks[0].stderr.strip().splitlines() == error_lines(ranks[0].stderr)[:1], ranks[0].stderr
        assert ranks[1].stderr.strip() == '', ranks[1].stderr


def test_an_error_on_one_rank_in_its_dataloader_worker_stops_both(tmp_path, data, tiny_run_options):
    script = tmp_path / 'failing.py'
    script.write_text(FAILING_ON_RANK_1.format(repo=str(REPO), argv=main_argv(
        data, tmp_path / 'o', tiny_run_options, 'num_workers=1', 'batch_size=1')))
    ranks = two_ranks([sys.executable, str(script)], tmp_path)
    assert [r.returncode for r in ranks] == [2, 2]
    assert ranks[0].stderr.strip().splitlines() == [
        'error: rank 1: /data/visible/train/000003.png: unreadable or corrupt image (truncated). Last good '
        'checkpoint: none (no epoch completed)'], ranks[0].stderr
    assert ranks[1].stderr.strip() == '', ranks[1].stderr


def test_under_torchrun_a_bad_run_prints_one_error_line(tmp_path, data, tiny_run_options):
    proc = torchrun([str(REPO / 'main.py'), *main_argv(data, tmp_path / 'o', tiny_run_options, 'hidden_dim=48')],
                    tmp_path)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and 'hidden_dim' in lines[0]
    # the rest is torchrun's own report (its launcher traceback and a summary), with no frame of our code in it
    # every rank raises the error; torchrun reports the first rank to exit with 2 and may stop the other one first
    assert proc.stderr.count('exitcode  : 2') >= 1, 'a rank exited with the user-error status'
    assert not re.search(rf'File "{re.escape(str(REPO))}/(?!\.venv/)', proc.stderr), proc.stderr


def test_two_process_eval_with_the_ir_image_missing_equals_one_process(tmp_path, tiny_run_options):
    import main
    from models import build_model
    from util.checkpoint import save_checkpoint
    from util.config import load_config

    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=4, num_val=4, width=128, height=96)
    cfg = load_config(REPO / 'config/DINO/CAFF_tiny.py', tiny_run_options)
    checkpoint = tmp_path / 'random.pth'
    save_checkpoint({'model': build_model(cfg)[0].state_dict(), 'epoch': 0}, str(checkpoint))

    def argv(out):
        return ['-c', str(REPO / 'config/DINO/CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
                '--device', 'cpu', '--num_workers', '0', '--eval', '--resume', str(checkpoint),
                '--options', *tiny_run_options, "eval_missing_modality='ir'"]

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
