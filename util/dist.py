"""Distributed-training helpers that are safe to call in a single plain process.

Follows DETR's util/misc.py distributed helpers, launched with `torchrun` (which sets RANK, WORLD_SIZE and
LOCAL_RANK). What differs: `init_distributed` only reads torchrun's environment (no SLURM branch, no
`args` object), picks the backend from the device, and the collectives return their input unchanged when no
process group is running, so the engine never needs `if distributed:`.

Failing together: a user error (`util.errors.UserError`) that only some processes hit would leave the others
waiting in their next collective. `raise_together(error)` is a collective every process calls at the same point:
if any process passes an error, every process raises, the lowest failing rank's message on all of them, so rank
0 can report it as the one line of the run and every process exits with the user-error status.
`run_on_main(fn)` runs main-process-only work (checkpoint saves, log files) that way.
"""
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from util.errors import UserError, user_message


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launch_rank() -> int:
    """This process's rank: the process group's, or torchrun's RANK before the group is joined (0 without either).

    Entry points use it to report a user error from rank 0 only, also for errors raised before
    `init_distributed` (a bad config or command line fails identically on every rank).
    """
    if is_dist_avail_and_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get('RANK', 0))
    except ValueError:
        return 0


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


class PeerError(UserError):
    """A user error raised on another process, re-raised here by `raise_together` (its message names the rank)."""


def _flag_device() -> torch.device:
    """Where a collective's tensor must live: the current CUDA device for nccl, the CPU otherwise."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def raise_together(error: Optional[BaseException]) -> None:
    """Collective: raise on every process when any process passes an error (None = this process is fine).

    Every process must call it at the same point. In a single process, `error` is raised when given. Otherwise one
    int is all-reduced (cheap when nothing failed); if some process failed, the messages are gathered, and each
    process raises: a failing process its own error, the others a `PeerError` with the message of the lowest
    failing rank ("rank N: <message>"). Rank 0 thus always holds the message to report.
    """
    if get_world_size() < 2:
        if error is not None:
            raise error
        return
    failed = torch.tensor([0 if error is None else 1], device=_flag_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    messages = all_gather(None if error is None else user_message(error))
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise PeerError(f'rank {rank}: {message}')


def run_on_main(fn: Callable[[], None]) -> None:
    """Run `fn()` on the main process only; a `UserError` it raises is raised on every process
    (`raise_together`), which also makes every process wait for the main one, like a barrier."""
    error = None
    if is_main_process():
        try:
            fn()
        except UserError as err:
            error = err
    raise_together(error)
