import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from util import dist as dist_utils


def test_single_process_defaults(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    assert not dist_utils.is_dist_avail_and_initialized()
    assert dist_utils.get_world_size() == 1 and dist_utils.get_rank() == 0 and dist_utils.is_main_process()
    assert dist_utils.init_distributed('cpu') is False
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert dist_utils.init_distributed('cpu') is False and not dist.is_initialized()


def test_collectives_are_identity_in_one_process(tmp_path):
    losses = {'loss_ce': torch.tensor(1.5), 'loss_bbox': torch.tensor(0.5)}
    assert dist_utils.reduce_dict(losses) is losses
    assert dist_utils.all_gather({'a': 1}) == [{'a': 1}]
    dist_utils.barrier()
    dist_utils.save_on_master({'x': torch.ones(2)}, tmp_path / 'ckpt.pth')
    assert torch.equal(torch.load(tmp_path / 'ckpt.pth')['x'], torch.ones(2))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    try:
        assert dist_utils.init_distributed('cpu') is True
        gathered = dist_utils.all_gather({'rank': rank, 'ids': list(range(rank + 1))})
        summed = dist_utils.reduce_dict({'b': torch.tensor(float(rank)), 'a': torch.tensor(2.0 * rank)},
                                        average=False)
        averaged = dist_utils.reduce_dict({'a': torch.tensor(float(rank))})
        result = (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process(), gathered,
                  {k: v.item() for k, v in summed.items()}, averaged['a'].item())
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes(tmp_path):
    # fork: the children reuse the imported torch, which keeps this test well under a second
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method='fork')
    results = [torch.load(tmp_path / f'rank{rank}.pth') for rank in range(2)]
    expected_gather = [{'rank': 0, 'ids': [0]}, {'rank': 1, 'ids': [0, 1]}]
    assert results[0] == (0, 2, True, expected_gather, {'a': 2.0, 'b': 1.0}, 0.5)
    assert results[1] == (1, 2, False, expected_gather, {'a': 2.0, 'b': 1.0}, 0.5)
