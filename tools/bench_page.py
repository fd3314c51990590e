"""How a benchmark tool reports: the machine line, the command line, and the Markdown page.

Not in the reference. ``tools/benchmark.py`` (end-to-end inference) and ``tools/fusion_study.py`` (fusion and
missing-modality study) print every table with the machine (CPU, cores, torch threads, load average) and the
command that produced it, and ``--out`` writes the same text as a Markdown page.
"""
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``'0.6, 1.1, 1.5'`` (``'n/a'`` where the OS has none)."""
    return ', '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'


def machine_description(threads: int) -> str:
    """One line: CPU model, cores visible to this process, torch threads, load average, torch and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return (f'{cpu}; {cores} cores available ({os.cpu_count()} in the machine); torch threads {threads}; '
            f'load average at start {load_average()}; torch {torch.__version__}; Python {platform.python_version()}')


def command_line(script: str, argv: list[str]) -> str:
    """``python SCRIPT ARGS`` with each argument shell-quoted, as a reader would type it."""
    return f'python {script} ' + ' '.join(shlex.quote(a) for a in argv)


def write_page(path: str | None, title: str, body: str, echo: bool = True) -> None:
    """Print ``# title`` and ``body`` (unless ``echo`` is False) and, with ``path``, write them there as Markdown."""
    text = f'# {title}\n\n{body}\n'
    if echo:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding='utf-8')
        print(f'written: {path}', file=sys.stderr)
