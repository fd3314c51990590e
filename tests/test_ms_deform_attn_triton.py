"""Tests of models/ops/ms_deform_attn_triton.py: the Triton kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set here before the kernels are imported) against the pytorch path: forward and the three
gradients, fp64 / fp32 and fp16 / bf16 inputs, head sizes 16 and 32 (and 5, not a power of two), 1 to 5 levels,
locations far outside [0, 1], query counts that are not a multiple of the block; the dispatch and the layer on
the triton backend; and (slow) the kernels compile for sm_80 / sm_90 without a GPU. The interpreter is slow: shapes
are tiny, gradcheck is marked slow."""
import json
import os
import subprocess
import sys

os.environ['TRITON_INTERPRET'] = '1'  # read by triton.jit when the kernels are decorated, i.e. at their import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip('triton')

from models.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch, resolve_backend  # noqa: E402
from models.ops import ms_deform_attn_func, ms_deform_attn_triton  # noqa: E402
from models.ops.ms_deform_attn_func import output_and_grads, self_check_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures('fresh_msda_dispatch')

RESULTS = ('output', 'grad_value', 'grad_locations', 'grad_weights')
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def test_kernels_are_interpreted():
    assert ms_deform_attn_triton.INTERPRETED, 'models.ops.ms_deform_attn_triton was imported before this module ' \
                                              'set TRITON_INTERPRET=1'
    assert ms_deform_attn_triton.can_run(torch.device('cpu'))


def triton_output_and_grads(value, shapes, starts, locations, weights, grad_out, block_q=None):
    out = ms_deform_attn_triton.forward(value, shapes, starts, locations, weights, block_q=block_q)
    return (out, *ms_deform_attn_triton.backward(value, shapes, starts, locations, weights, grad_out,
                                                 block_q=block_q))


def assert_matches_pytorch(value, shapes, starts, locations, weights, grad_out, block_q=None):
    got = triton_output_and_grads(value, shapes, starts, locations, weights, grad_out, block_q)
    want = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a), value, locations, weights,
                            grad_out)
    tol = TOLERANCE[value.dtype]
    for name, g, w in zip(RESULTS, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item(), msg=name)


# (dtype, heads, head size, levels, points, queries, block_q): each level count 1..5, head sizes 16 and 32 (and 5,
# not a power of two), query counts that leave a partial last block (7 of 4, 5 of 4, 9 of 8, 3 of the default).
CASES = [(torch.float32, 1, 16, 1, 3, 7, 4), (torch.float64, 1, 32, 2, 2, 5, 4), (torch.float32, 1, 32, 3, 1, 9, 8),
         (torch.float64, 2, 16, 4, 2, 7, 4), (torch.float32, 1, 16, 5, 2, 3, None),
         (torch.float64, 1, 5, 4, 2, 7, None)]


@pytest.mark.parametrize('dtype, heads, head_dim, levels, points, queries, block_q', CASES)
def test_kernels_match_pytorch(dtype, heads, head_dim, levels, points, queries, block_q):
    problem = self_check_problem(torch.device('cpu'), dtype, heads, head_dim, levels, points, queries, seed=levels)
    assert_matches_pytorch(*problem, block_q)


def test_locations_far_outside_and_on_the_border():
    """Points far outside the maps sample zeros with zero gradients; points on the outer edges of the maps (0 and
    1) follow grid_sample. (Exact pixel centres are left out: bilinear sampling has no derivative there, and the
    two paths may round a point to either side of it.)"""
    value, shapes, starts, locations, weights, grad_out = self_check_problem(torch.device('cpu'), torch.float64,
                                                                             1, 16, 3, 2)
    special = torch.tensor([-1e6, -1.71, -0.37, 0.0, 1.0, 1.13, 2.9, 1e6], dtype=torch.float64)
    flat = locations.flatten()
    flat[:special.numel() * 3] = special.repeat(3)
    locations = flat.view_as(locations)
    assert_matches_pytorch(value, shapes, starts, locations, weights, grad_out, block_q=4)
    far = torch.full_like(locations, 1e6)
    out, grad_value, grad_locations, _ = triton_output_and_grads(value, shapes, starts, far, weights, grad_out)
    assert not out.any() and not grad_value.any() and not grad_locations.any()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_run_in_fp32(dtype):
    """fp16 / bf16 inputs through the dispatcher: computed in fp32 (the pytorch path on the fp32 copies of the
    same values), returned and differentiated in the input dtype."""
    value, shapes, starts, locations, weights, grad_out = self_check_problem(torch.device('cpu'), torch.float32,
                                                                             1, 16, 2, 2)
    leaves = [t.to(dtype).requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(*leaves[:1], shapes, starts, *leaves[1:], backend='triton')
    assert out.dtype == dtype
    out.backward(grad_out.to(dtype))
    assert [leaf.grad.dtype for leaf in leaves] == [dtype] * 3
    want = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a),
                            *(leaf.detach().float() for leaf in leaves), grad_out.to(dtype).float())
    for name, g, w in zip(RESULTS, (out, *(leaf.grad for leaf in leaves)), want):
        torch.testing.assert_close(g, w.to(dtype), msg=name)
    assert ms_deform_attn_func._trusted[('triton', 'cpu', torch.float32)] is None


def test_dispatch_self_checks_triton_and_auto_never_picks_it_on_cpu():
    assert resolve_backend('triton', torch.device('cpu'), torch.float64, (2, 32, 4, 4)) == 'triton'
    seconds = ms_deform_attn_func.self_check_seconds[('triton', 'cpu', torch.float64)]
    print(f'self-check of the triton kernels in the interpreter (M=2, D=32, L=4, P=4, fp64): {seconds:.2f} s')
    assert 'triton' not in ms_deform_attn_func.candidates('auto', torch.device('cpu'))[0]


def test_layer_on_triton_matches_pytorch():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=2, backend='triton')
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)
    shapes, starts = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    query, flat, ref = torch.randn(1, 6, 32), torch.randn(1, 16, 32), torch.rand(1, 6, 2, 4)
    results = {}
    for backend in ('triton', 'pytorch'):
        layer.backend = backend
        layer.zero_grad()
        out = layer(query, ref, flat, shapes, starts)
        out.square().sum().backward()
        results[backend] = (out.detach(), {k: p.grad.clone() for k, p in layer.named_parameters()})
    torch.testing.assert_close(results['triton'][0], results['pytorch'][0], rtol=1e-5, atol=1e-6)
    for name, grad in results['pytorch'][1].items():
        torch.testing.assert_close(results['triton'][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_kernels_gradcheck():
    value, shapes, starts, locations, weights, _ = self_check_problem(torch.device('cpu'), torch.float64, 1, 2, 2, 1)
    inputs = tuple(t[:1].clone().requires_grad_() for t in (value, locations.clamp(-0.2, 1.2), weights))

    def fused(v, l, a):
        return ms_deform_attn_func._FusedMSDeformAttn.apply(ms_deform_attn_triton, v, shapes, starts, l, a, 64)
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-7, atol=1e-6)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_without_a_gpu(repo_root):
    """The compiler is stricter than the interpreter: both kernels go down to a cubin for A100 and H100 (no GPU
    needed), in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    script = ('import json; from models.ops import ms_deform_attn_triton as t; '
              'print(json.dumps([t.compile_for_gpu(80), t.compile_for_gpu(90)]))')
    result = subprocess.run([sys.executable, '-c', script], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for sizes in json.loads(result.stdout.strip().splitlines()[-1]):
        assert set(sizes) == {'forward', 'backward'} and min(sizes.values()) > 0
