"""util/dist.py in one process (identity collectives, launch rank) and in two gloo processes (gather, reduce,
failing together), and DDP training with a rank whose batches hold no box (negatives only, as LLVIP/FLIR frames
without objects): no hang, no crash, the same weights on both ranks, and an evaluation loss equal to one
process's."""
import functools
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from datasets import build_dataset
from datasets.synthetic import generate_synthetic_dataset
from engine import evaluate, train_one_epoch
from models import build_model
from util import dist as dist_utils
from util.config import load_config
from util.errors import DataError
from util.misc import collate_fn
from util.optim import param_groups
from util.rng import seed_everything

REPO = Path(__file__).resolve().parents[1]


def test_single_process_defaults(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    assert not dist_utils.is_dist_avail_and_initialized()
    assert dist_utils.get_world_size() == 1 and dist_utils.get_rank() == 0 and dist_utils.is_main_process()
    assert dist_utils.init_distributed('cpu') is False
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert dist_utils.init_distributed('cpu') is False and not dist.is_initialized()


def test_collectives_are_identity_in_one_process():
    losses = {'loss_ce': torch.tensor(1.5), 'loss_bbox': torch.tensor(0.5)}
    assert dist_utils.reduce_dict(losses) is losses
    assert dist_utils.all_gather({'a': 1}) == [{'a': 1}]
    dist_utils.barrier()
    dist_utils.raise_together(None)
    with pytest.raises(DataError, match='bad pair'):
        dist_utils.raise_together(DataError('bad pair'))
    ran = []
    dist_utils.run_on_main(lambda: ran.append(1))
    assert ran == [1]


def test_launch_rank_reads_torchrun_before_the_group_exists(monkeypatch):
    monkeypatch.setenv('RANK', '3')
    assert dist_utils.launch_rank() == 3 and dist_utils.get_rank() == 0
    monkeypatch.delenv('RANK')
    assert dist_utils.launch_rank() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _in_group(rank: int, world_size: int, port: int, out_dir: str, body) -> None:
    """Join a gloo group of `world_size` processes as `rank`, save `body(rank)` to out_dir/rank<rank>.pth, leave."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    try:
        assert dist_utils.init_distributed('cpu') is True
        torch.save(body(rank), os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_two(body, tmp_path, timeout: float = 60.0) -> list:
    """``body(rank)`` of each of 2 gloo processes; a process still running after ``timeout`` s (a hang in a
    collective: gloo itself would wait 30 minutes) is killed and the test fails."""
    # fork: the children reuse the imported torch, which keeps these tests well under a second
    context = mp.start_processes(_in_group, args=(2, _free_port(), str(tmp_path), body), nprocs=2,
                                 start_method='fork', join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f'the 2 processes were still running after {timeout:g} s: a rank hangs in a collective')
    return [torch.load(tmp_path / f'rank{rank}.pth') for rank in range(2)]


def _collectives(rank: int):
    gathered = dist_utils.all_gather({'rank': rank, 'ids': list(range(rank + 1))})
    summed = dist_utils.reduce_dict({'b': torch.tensor(float(rank)), 'a': torch.tensor(2.0 * rank)}, average=False)
    averaged = dist_utils.reduce_dict({'a': torch.tensor(float(rank))})
    return (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process(), gathered,
            {k: v.item() for k, v in summed.items()}, averaged['a'].item())


def test_two_gloo_processes(tmp_path):
    results = _run_two(_collectives, tmp_path)
    expected_gather = [{'rank': 0, 'ids': [0]}, {'rank': 1, 'ids': [0, 1]}]
    assert results[0] == (0, 2, True, expected_gather, {'a': 2.0, 'b': 1.0}, 0.5)
    assert results[1] == (1, 2, False, expected_gather, {'a': 2.0, 'b': 1.0}, 0.5)


def _fail_together(rank: int) -> list:
    outcome = []
    dist_utils.raise_together(None)  # nobody failed: returns on both
    outcome.append('passed')
    try:  # only rank 1 fails; rank 0 must not wait for it
        dist_utils.raise_together(DataError('/data/x.png: unreadable') if rank == 1 else None)
    except DataError as err:
        outcome.append(('own', str(err)))
    except dist_utils.PeerError as err:
        outcome.append(('peer', str(err)))
    try:  # main-process work that fails reaches every rank
        dist_utils.run_on_main(lambda: (_ for _ in ()).throw(DataError('disk full')))
    except (DataError, dist_utils.PeerError) as err:
        outcome.append((type(err).__name__, str(err)))
    return outcome


def test_raise_together_stops_every_rank_with_the_failing_ranks_message(tmp_path):
    rank0, rank1 = _run_two(_fail_together, tmp_path)
    assert rank0 == ['passed', ('peer', 'rank 1: /data/x.png: unreadable'), ('DataError', 'disk full')]
    assert rank1 == ['passed', ('own', '/data/x.png: unreadable'), ('PeerError', 'rank 0: disk full')]


@pytest.fixture(scope='module')
def tiny_cfg_with_data(tmp_path_factory, tiny_run_options):
    """The tiny config on a synthetic data set: 4 training images (2 steps of 2), 2 validation images with 2 and
    1 boxes (so a loss normalised over both ranks differs from one normalised per image)."""
    root = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_dataset(root, num_train=4, num_val=2, width=128, height=96)
    return load_config(REPO / 'config/DINO/CAFF_tiny.py', [*tiny_run_options, f'coco_path={root!r}'])


def _without_boxes(target: dict) -> dict:
    """The target of the same image with every object removed (a negative-only frame)."""
    per_object = ('boxes', 'labels', 'area', 'iscrowd')
    return {k: v[:0] if k in per_object else v for k, v in target.items()}


def _build(cfg):
    seed_everything(0)
    return build_model(cfg)


def _train_and_evaluate_with_an_empty_rank(cfg, rank: int) -> dict:
    """Two DDP training steps, rank 1 seeing only images without boxes; then a DDP evaluation pass, one
    validation image per rank."""
    torch.set_num_threads(1)  # two processes share the machine's cores
    model, criterion, postprocessors = _build(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.lr_backbone), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    batches = list(DataLoader(build_dataset('train', cfg), batch_size=2, shuffle=False, collate_fn=collate_fn))
    if rank == 1:
        batches = [(rgb, ir, [_without_boxes(t) for t in targets]) for rgb, ir, targets in batches]
    train_stats = train_one_epoch(ddp, criterion, batches, optimizer, torch.device('cpu'), epoch=0,
                                  clip_max_norm=cfg.clip_max_norm, print_freq=100)
    val_set = build_dataset('val', cfg)
    val_loader = DataLoader(val_set, batch_size=1, sampler=DistributedSampler(val_set, shuffle=False),
                            collate_fn=collate_fn)
    eval_stats, _ = evaluate(ddp, criterion, postprocessors, val_loader, val_set.coco, torch.device('cpu'),
                             print_freq=100)
    state = model.state_dict()
    return {'boxes_seen': sum(len(t['labels']) for _, _, targets in batches for t in targets),
            'train_loss': train_stats['loss'], 'test_loss': eval_stats['loss'], 'state': state,
            'changed': [k for k, v in state.items() if not torch.equal(v, start[k])]}


@pytest.mark.slow
def test_a_rank_without_boxes_neither_hangs_nor_crashes(tiny_cfg_with_data, tmp_path):
    cfg = tiny_cfg_with_data
    body = functools.partial(_train_and_evaluate_with_an_empty_rank, cfg)
    rank0, rank1 = _run_two(body, tmp_path, timeout=600)  # generous: the machine may be shared
    assert rank0['boxes_seen'] > 0 and rank1['boxes_seen'] == 0
    assert rank0['train_loss'] == rank1['train_loss'] and torch.isfinite(torch.tensor(rank0['train_loss']))
    assert any(k.startswith('transformer') for k in rank0['changed']), 'no optimizer step was taken'
    assert all(torch.equal(v, rank1['state'][k]) for k, v in rank0['state'].items()), 'the ranks diverged'

    # evaluate's loss (test_loss) of the trained weights, in one process over both validation images
    model, criterion, postprocessors = _build(cfg)
    model.load_state_dict(rank0['state'])
    val_set = build_dataset('val', cfg)
    alone, _ = evaluate(model, criterion, postprocessors, DataLoader(val_set, batch_size=1, collate_fn=collate_fn),
                        val_set.coco, torch.device('cpu'), print_freq=100)
    assert rank0['test_loss'] == rank1['test_loss'] == pytest.approx(alone['loss'], rel=1e-5)
