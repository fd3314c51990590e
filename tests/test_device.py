"""util/device.py: the device a run resolves to, and the CPU's subnormal-float mode in every torch thread."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util.device import resolve_device, set_flush_denormal
from util.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

# A fresh process: 2 intra-op threads, each multiply split over both (4M elements >> torch's grain of 32768).
# Prints how many of the products of a subnormal and 1 stayed non-zero.
PROBE = """
import torch
from util.device import set_flush_denormal
torch.set_num_threads(2)
{call}
x = torch.full((1 << 22,), 1e-39)
print(int(((x * 1.0) != 0).sum()))
"""


def count_kept_subnormals(call: str) -> int:
    env = {**os.environ, 'OMP_NUM_THREADS': '2'}
    done = subprocess.run([sys.executable, '-c', PROBE.format(call=call)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


def test_auto_and_cpu_resolve_without_a_gpu():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')


@pytest.mark.parametrize('name, words', [('gpu0', 'is not a device name'), ('cuda:0', 'CUDA is not available')])
def test_a_bad_or_absent_device_is_a_usage_error(name, words):
    if name.startswith('cuda') and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(UsageError, match=words):
        resolve_device(name)


def test_flushing_before_the_first_kernel_reaches_every_thread():
    if not set_flush_denormal(False):
        pytest.skip('this CPU has no flush-to-zero mode')
    assert count_kept_subnormals('set_flush_denormal(False)') == 1 << 22  # the probe sees subnormals when kept
    assert count_kept_subnormals('set_flush_denormal(True)') == 0  # and both threads flush when called first
