"""Running training statistics and the periodic progress line (ETA, iteration and data-loading time, memory).

Follows DETR's `SmoothedValue` / `MetricLogger` (util/misc.py there). What differs: the progress line goes to a
`logging.Logger` when one is given (print otherwise), an iterable without `len()` is accepted (no ETA then),
and cross-process reduction goes through util/dist.py.
"""
import datetime
import time
from collections import defaultdict, deque
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from util.dist import is_dist_avail_and_initialized


class SmoothedValue:
    """A scalar series: statistics over the last `window_size` values and over the whole series.

    `median`, `avg`, `max` and `value` (the latest) use the window; `global_avg` = total / count uses every update.
    `fmt` is a str.format pattern over those names, e.g. '{median:.4f} ({global_avg:.4f})'.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        """Adds `value`, counted `n` times in the global average (e.g. n = batch size for a per-sample mean)."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sums count and total over processes so `global_avg` covers all of them; the window stays local."""
        if not is_dist_avail_and_initialized():
            return
        device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
        packed = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(packed)
        self.count = int(packed[0].item())
        self.total = packed[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        if not self.deque:
            return 'n/a'
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """A named set of SmoothedValue meters and a progress printer for a loop over a data loader."""

    def __init__(self, delimiter: str = '  '):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values) -> None:
        """Appends each value (float, int or 0-dim tensor) to the meter of that name; None values are skipped."""
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise TypeError(f'MetricLogger.update: {name}={value!r} is a {type(value).__name__}; '
                                'pass a number or a one-element tensor')
            self.meters[name].update(value)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get('meters', {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"MetricLogger has no meter or attribute '{name}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '', logger=None):
        """Yields the items of `iterable`; every `print_freq` items and at the last one writes a progress line.

        The line holds the position, the ETA (from the mean iteration time, when `iterable` has a length), every
        meter, the iteration time and data-loading time, and the peak CUDA memory in MB where CUDA is available.
        At the end it writes the total time. Lines go to `logger.info` if a logger is given, else to print.
        """
        write = logger.info if logger is not None else print
        total = len(iterable) if hasattr(iterable, '__len__') else None
        width = len(str(total)) if total is not None else 0
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        with_memory = torch.cuda.is_available()
        start = end = time.time()
        i = 0
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or (total is not None and i == total - 1):
                parts = [header]
                if total is not None:
                    eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - 1 - i)))
                    parts += [f'[{i:>{width}}/{total}]', f'eta: {eta}']
                else:
                    parts.append(f'[{i}]')
                parts += [str(self), f'time: {iter_time}', f'data: {data_time}']
                if with_memory:
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB')
                write(self.delimiter.join(part for part in parts if part))
            end = time.time()
        elapsed = time.time() - start
        count = i + 1 if iter_time.count else 0
        per_iter = elapsed / count if count else 0.0
        write(f'{header} Total time: {datetime.timedelta(seconds=int(elapsed))} ({per_iter:.4f} s / it)'.strip())
