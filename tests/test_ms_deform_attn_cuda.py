"""CUDA tests of models/ops: the CUDA sources compile with nvcc for sm_80 and sm_90 (no GPU needed; skipped only
when no nvcc is found), and, on a machine with a GPU, the CUDA kernels and the compiled Triton kernels match the
pytorch path (forward and the three gradients), pass gradcheck in fp64, and 'auto' picks cuda (else triton). Run
everything GPU-side with tools/gpu_checks.sh; run this file on its own (tests/test_ms_deform_attn_triton.py sets
TRITON_INTERPRET=1 for the whole pytest process, which would interpret the Triton kernels here too).
"""
import pytest
import torch

from models.ops import ms_deform_attn, ms_deform_attn_pytorch, resolve_backend
from models.ops import build, ms_deform_attn_func
from models.ops.ms_deform_attn_func import output_and_grads

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
pytestmark = pytest.mark.usefixtures('fresh_msda_dispatch')


@pytest.fixture(scope='module')
def cuda_extension():
    return build.load_cuda_extension()


@pytest.fixture(scope='module')
def triton_kernels():
    kernels = pytest.importorskip('models.ops.ms_deform_attn_triton')
    if kernels.INTERPRETED:
        pytest.skip('TRITON_INTERPRET=1 in this process: run this file on its own to test the compiled kernels')
    return kernels


@pytest.mark.slow  # an nvcc build: minutes on a 2-core machine
@pytest.mark.skipif(build.find_nvcc() is None, reason='no nvcc: the CUDA sources cannot be compiled here')
def test_cuda_sources_compile_for_sm80_and_sm90():
    extension = build.load_cuda_extension(archs=['8.0', '9.0'])
    assert callable(extension.forward) and callable(extension.backward)
    assert 'CUDA' in extension.forward.__doc__


def test_find_cuda_home_follows_wrapper_scripts(tmp_path):
    toolkit = tmp_path / 'cuda-99.0'
    (toolkit / 'bin').mkdir(parents=True)
    (toolkit / 'include').mkdir()
    (toolkit / 'bin' / 'nvcc').write_text('')
    (toolkit / 'include' / 'cuda_runtime.h').write_text('')
    wrapper = tmp_path / 'wrapper' / 'nvcc'
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert build.find_cuda_home(str(wrapper)) == toolkit
    assert build.find_cuda_home(str(toolkit / 'bin' / 'nvcc')) == toolkit
    assert build.find_cuda_home(str(tmp_path / 'wrapper' / 'missing')) is None


@pytest.fixture(params=['cuda', 'triton'])
def gpu_kernels(request):
    """The kernels of the cuda extension, then of the compiled Triton backend."""
    return request.getfixturevalue('cuda_extension' if request.param == 'cuda' else 'triton_kernels')


@needs_gpu
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('d, p, lq', [(5, 2, 7), (32, 1, 70), (16, 3, 33)])
def test_gpu_kernels_match_pytorch(msda_inputs, gpu_kernels, dtype, tol, d, p, lq):
    value, shapes, starts, locations, weights = msda_inputs(d=d, p=p, lq=lq, dtype=dtype, device='cuda')
    grad_out = torch.randn(value.shape[0], lq, value.shape[2] * d, dtype=dtype, device='cuda')
    expected = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a), value, locations, weights,
                                grad_out)
    fused = output_and_grads(lambda v, l, a: ms_deform_attn_func._FusedMSDeformAttn.apply(
        gpu_kernels, v, shapes, starts, l, a, 64), value, locations, weights, grad_out)
    for name, got, want in zip(('output', 'grad_value', 'grad_locations', 'grad_weights'), fused, expected):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)


@needs_gpu
def test_gpu_kernels_gradcheck(msda_inputs, gpu_kernels):
    value, shapes, starts, locations, weights = msda_inputs(d=3, n=1, m=2, lq=3, device='cuda')

    def fused(v, l, a):
        return ms_deform_attn_func._FusedMSDeformAttn.apply(gpu_kernels, v, shapes, starts, l, a, 64)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations.clamp(-0.2, 1.2), weights))
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-7, atol=1e-6)


@needs_gpu
def test_triton_self_check_passes_on_gpu(triton_kernels):
    for dtype in (torch.float32, torch.float64):
        assert resolve_backend('triton', torch.device('cuda'), dtype, (8, 32, 4, 4)) == 'triton'
    print('self-check seconds:', {str(k): round(v, 4) for k, v in ms_deform_attn_func.self_check_seconds.items()})


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_auto_picks_cuda_and_reduced_precision_runs_in_fp32(msda_inputs, cuda_extension, dtype):
    value, shapes, starts, locations, weights = msda_inputs(dtype=torch.float32, device='cuda')
    assert resolve_backend('auto', value.device) == 'cuda'
    out = ms_deform_attn(value.to(dtype), shapes, starts, locations, weights.to(dtype), backend='auto')
    assert out.dtype == dtype
    expected = ms_deform_attn_pytorch(value.to(dtype).float(), shapes, locations, weights.to(dtype).float())
    torch.testing.assert_close(out, expected.to(dtype))


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_triton_reduced_precision_runs_in_fp32(msda_inputs, triton_kernels, dtype):
    value, shapes, starts, locations, weights = msda_inputs(dtype=torch.float32, device='cuda')
    out = ms_deform_attn(value.to(dtype), shapes, starts, locations, weights.to(dtype), backend='triton')
    assert out.dtype == dtype
    expected = ms_deform_attn_pytorch(value.to(dtype).float(), shapes, locations, weights.to(dtype).float())
    torch.testing.assert_close(out, expected.to(dtype))
