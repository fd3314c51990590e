"""Distributed-training helpers that are safe to call in a single plain process.

Follows DETR's util/misc.py distributed helpers, launched with `torchrun` (which sets RANK, WORLD_SIZE and
LOCAL_RANK). What differs: `init_distributed` only reads torchrun's environment (no SLURM branch, no
`args` object), picks the backend from the device, and the collectives return their input unchanged when no
process group is running, so the engine never needs `if distributed:`.
"""
import os

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device) -> bool:
    """Joins the process group described by torchrun's environment; returns whether this run is distributed.

    Without RANK and WORLD_SIZE in the environment (a plain `python main.py`) or with WORLD_SIZE 1 nothing is
    initialised and False is returned. The backend is nccl for a CUDA `device`, gloo otherwise; on CUDA the
    current device becomes cuda:LOCAL_RANK. Rendezvous uses MASTER_ADDR / MASTER_PORT (set by torchrun).
    """
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return False
    world_size = int(os.environ['WORLD_SIZE'])
    if world_size <= 1:
        return False
    if is_dist_avail_and_initialized():
        return True
    rank = int(os.environ['RANK'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = torch.device(device).type == 'cuda'
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method='env://', world_size=world_size,
                            rank=rank)
    barrier()
    return True


def barrier() -> None:
    """Waits for every process; a no-op in a single process."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_gather(obj) -> list:
    """Gathers any picklable object from every process: a list of world_size objects, ordered by rank."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(values: dict, average: bool = True) -> dict:
    """Sums (or averages, with `average`) a dict of scalar tensors over processes; every process gets the result.

    Keys are reduced in sorted order so every process packs the same vector. Returns the input in a single process.
    """
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[name] for name in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


def save_on_master(*args, **kwargs) -> None:
    """torch.save(*args, **kwargs) on rank 0 only."""
    if is_main_process():
        torch.save(*args, **kwargs)
