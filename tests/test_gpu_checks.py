"""tools/gpu_checks.py and tools/gpu_checks.sh on CPU: the parity and gradcheck sections catch a wrong kernel, the
whole page is written from tiny problems, and the shell script refuses to run without a GPU."""
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from models.ops import ms_deform_attn_pytorch
from tools import gpu_checks

REPO = Path(__file__).resolve().parents[1]


class _Kernels:
    """forward / backward of the pytorch path, as a fused backend exposes them; ``scale`` != 1 makes the forward
    wrong, ``grad_scale`` != 1 the value gradient."""

    def __init__(self, scale: float = 1.0, grad_scale: float = 1.0):
        self.scale, self.grad_scale = scale, grad_scale

    def forward(self, value, shapes, starts, locations, weights, im2col_step):
        return ms_deform_attn_pytorch(value, shapes, locations, weights) * self.scale

    def backward(self, value, shapes, starts, locations, weights, grad_output, im2col_step):
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        with torch.enable_grad():
            out = ms_deform_attn_pytorch(leaves[0], shapes, leaves[1], leaves[2]) * self.scale
            grads = torch.autograd.grad(out, leaves, grad_output)
        return [grads[0] * self.grad_scale, grads[1], grads[2]]


def test_parity_passes_a_right_kernel_and_fails_a_wrong_one():
    cpu = torch.device('cpu')
    right = gpu_checks.parity('fake', _Kernels(), cpu)
    assert len(right) == 4 and all(r['ok'] for r in right)  # fp64 and fp32, head sizes 5 and 32
    assert all(max(r['errors']) <= gpu_checks.PARITY_TOLERANCE[getattr(torch, r['dtype'])] for r in right)
    wrong = gpu_checks.parity('fake', _Kernels(grad_scale=1.001), cpu)
    assert not any(r['ok'] for r in wrong)
    assert all(r['errors'][1] == pytest.approx(1e-3, rel=1e-2) and r['errors'][0] == 0 for r in wrong)


def test_gradcheck_passes_a_right_backward_and_fails_a_wrong_one():
    cpu = torch.device('cpu')
    assert gpu_checks.gradcheck(_Kernels(), cpu) == 'passed'
    assert gpu_checks.gradcheck(_Kernels(grad_scale=1.1), cpu).startswith('FAILED: ')


def test_a_backend_that_cannot_run_is_reported_not_replaced():
    kernels, why = gpu_checks.load_kernels('cuda', torch.device('cpu'))
    assert kernels is None and 'cannot run cpu tensors' in why
    assert gpu_checks.load_kernels('pytorch', torch.device('cpu')) == (None, None)


@pytest.mark.slow
def test_tiny_run_writes_every_section(tmp_path):
    page = tmp_path / 'msda_gpu.md'
    argv = ['--device', 'cpu', '--tiny', '--backends', 'pytorch', '--repeats', '1', '--amp-steps', '1',
            '--output', str(page)]
    assert gpu_checks.main(argv) == 0
    text = page.read_text()
    assert text.startswith('# MSDeformAttn on cpu') and '--tiny' in text and 'load average' in text
    speed = [line for line in text.splitlines() if line.startswith('| pytorch | ')]
    assert len(speed) == len(gpu_checks.CASES) * len(gpu_checks.SPEED_DTYPES) + len(gpu_checks.AMP_DTYPES)
    amp = [line.split(' | ') for line in speed if '| float16 |' in line or '| bfloat16 |' in line]
    amp = [cells for cells in amp if cells[2].endswith('x 2')]
    assert [cells[1] for cells in amp] == list(gpu_checks.AMP_DTYPES)
    assert all(math.isfinite(float(cells[3])) and cells[-1] == 'ok |' for cells in amp)


@pytest.mark.slow
def test_shell_script_without_a_gpu_says_so_and_exits_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU: the script would run')
    env = {**os.environ, 'PYTHON': os.environ.get('PYTHON', str(Path(os.sys.executable)))}
    result = subprocess.run(['bash', str(REPO / 'tools' / 'gpu_checks.sh'), str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert 'torch sees no CUDA device' in result.stderr and '--dry-run' in result.stderr
