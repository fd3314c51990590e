"""util/dist.py in one process (identity collectives, launch rank) and in two gloo processes (gather, reduce,
failing together)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from util import dist as dist_utils
from util.errors import DataError


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


def _run_two(body, tmp_path) -> list:
    # fork: the children reuse the imported torch, which keeps these tests well under a second
    mp.start_processes(_in_group, args=(2, _free_port(), str(tmp_path), body), nprocs=2, start_method='fork')
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
