"""Tests of models/ops: the pytorch path against a direct loop, the fused CPU kernel against the pytorch path
(forward and the three gradients, fp64 and fp32), gradcheck, backend dispatch, the environment override, the
self-check and its fallback (a deliberately wrong kernel injected), and the MSDeformAttn layer (reference init, key
names, 2-d / 4-d reference points, padding mask, fp16, its own backend). The triton backend has its own file."""
import math
import os
import re
import shutil
import sysconfig
import warnings

import pytest
import torch
import torch.utils.cpp_extension

from models.ops import (MSDeformAttn, backend_from_config, ms_deform_attn, ms_deform_attn_pytorch, resolve_backend,
                        use_backend)
from models.ops import build, ms_deform_attn_func, ms_deform_attn_layer
from models.ops.ms_deform_attn_func import output_and_grads

pytestmark = pytest.mark.usefixtures('fresh_msda_dispatch')


@pytest.fixture(scope='module')
def cpu_extension():
    if build.find_cxx() is None:
        pytest.skip('no C++ compiler: the cpu backend cannot be built here')
    return build.load_cpu_extension()


def naive_ms_deform_attn(value, shapes, locations, weights):
    """Direct loops over the definition: bilinear with pixel centres at (i + 0.5) / H, zeros outside the map."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    out = value.new_zeros(n, lq, m, d)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b, q, head, level, point in torch.cartesian_prod(*(torch.arange(k) for k in (n, lq, m, n_levels,
                                                                                      n_points))).tolist():
        h, w = shapes[level]
        x = locations[b, q, head, level, point, 0].item() * w - 0.5
        y = locations[b, q, head, level, point, 1].item() * h - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                row = starts[level] + yy * w + xx
                out[b, q, head] += weights[b, q, head, level, point] * bilinear * value[b, row, head]
    return out.flatten(2)


class PytorchKernels:
    """Kernels with the interface of a compiled extension, computed by the pytorch path; `corrupt` maps a name
    ('output', 'grad_value', 'grad_locations', 'grad_weights') to a function applied to that result: a
    deliberately wrong kernel."""

    def __init__(self, **corrupt):
        self.corrupt = corrupt
        self.calls = 0

    def _result(self, name, tensor):
        return self.corrupt.get(name, lambda t: t)(tensor)

    def forward(self, value, shapes, starts, locations, weights, im2col_step):
        self.calls += 1
        return self._result('output', ms_deform_attn_pytorch(value, shapes, locations, weights))

    def backward(self, value, shapes, starts, locations, weights, grad_out, im2col_step):
        with torch.enable_grad():  # autograd runs a Function's backward without grad mode
            grads = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, shapes, l, a), value, locations,
                                     weights, grad_out)[1:]
        return [self._result(name, g) for name, g in zip(('grad_value', 'grad_locations', 'grad_weights'), grads)]


def test_pytorch_path_matches_direct_loop(msda_inputs):
    value, spatial_shapes, _, locations, weights = msda_inputs(n=1, m=2, d=3, lq=4, p=2)
    shapes = [tuple(hw) for hw in spatial_shapes.tolist()]
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_pytorch(value, spatial_shapes, locations, weights), expected)
    # The Python list of shapes gives the same result without reading the tensor.
    torch.testing.assert_close(ms_deform_attn_pytorch(value, None, locations, weights, shapes), expected)


def test_pytorch_path_rejects_inconsistent_shapes(msda_inputs):
    value, spatial_shapes, _, locations, weights = msda_inputs()
    with pytest.raises(ValueError, match='level shapes'):
        ms_deform_attn_pytorch(value[:, :-1], spatial_shapes, locations, weights)


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('d, p', [(5, 2), (32, 1), (16, 3)])
def test_cpu_kernel_matches_pytorch(msda_inputs, cpu_extension, dtype, tol, d, p):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(d=d, p=p, dtype=dtype)
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * d, dtype=dtype)
    expected = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, spatial_shapes, l, a), value, locations,
                                weights, grad_out)
    fused = output_and_grads(lambda v, l, a: ms_deform_attn_func._FusedMSDeformAttn.apply(
        cpu_extension, v, spatial_shapes, level_start_index, l, a, 64), value, locations, weights, grad_out)
    for name, got, want in zip(('output', 'grad_value', 'grad_locations', 'grad_weights'), fused, expected):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)


def test_cpu_backward_with_more_threads_than_heads(msda_inputs, cpu_extension):
    """With one (n, m) slice and several threads the queries are split into chunks with private grad buffers."""
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(n=1, m=1, lq=9)
    grad_out = torch.randn(1, 9, 5, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        fused = cpu_extension.backward(value, spatial_shapes, level_start_index, locations, weights, grad_out, 64)
    finally:
        torch.set_num_threads(threads)
    expected = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, spatial_shapes, l, a), value, locations,
                                weights, grad_out)[1:]
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cpu_kernel_gradcheck(msda_inputs, cpu_extension):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(n=1, m=2, d=3, lq=3, p=2)
    # Keep points away from pixel-centre lines, where bilinear sampling is not differentiable.
    locations = locations.clamp(-0.2, 1.2)

    def fused(v, l, a):
        return ms_deform_attn_func._FusedMSDeformAttn.apply(cpu_extension, v, spatial_shapes, level_start_index,
                                                             l, a, 64)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-7, atol=1e-6)


def test_cpu_kernel_rejects_bad_inputs(msda_inputs, cpu_extension):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match='float32 or float64'):
        cpu_extension.forward(value.half(), spatial_shapes, level_start_index, locations.half(), weights.half(), 64)
    with pytest.raises(RuntimeError, match='contiguous'):
        cpu_extension.forward(value.transpose(0, 1).contiguous().transpose(0, 1), spatial_shapes,
                              level_start_index, locations, weights, 64)
    with pytest.raises(RuntimeError, match='does not fit'):
        cpu_extension.forward(value[:, :-1].contiguous(), spatial_shapes, level_start_index, locations, weights, 64)


def test_header_change_changes_build_flags(monkeypatch, tmp_path):
    """Every header the kernels include is hashed into their compile flags: editing one makes torch rebuild."""
    included = {name for source in build.CPU_SOURCES + build.CUDA_SOURCES
                for name in re.findall(r'#include "([^"]+)"', source.read_text())}
    assert included == {header.name for header in build.HEADERS}
    header = tmp_path / 'checks.h'
    header.write_text('// first\n')
    monkeypatch.setattr(build, 'HEADERS', [header])
    monkeypatch.setattr(build, 'find_cxx', lambda: '/usr/bin/c++')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', lambda **kwargs: calls.append(kwargs))
    build.load_cpu_extension()
    header.write_text('// second\n')
    build.load_cpu_extension()
    assert calls[0]['extra_cflags'] != calls[1]['extra_cflags']
    assert calls[0]['sources'] == calls[1]['sources']


def test_build_puts_the_interpreters_ninja_on_path(monkeypatch, tmp_path):
    """A venv's python run without activating the venv: PATH has no ninja, the interpreter's scripts folder has."""
    scripts = tmp_path / 'venv' / 'bin'
    scripts.mkdir(parents=True)
    ninja = scripts / 'ninja'
    ninja.write_text('#!/bin/sh\necho 1.11.1\n')
    ninja.chmod(0o755)
    bare_path = str(tmp_path / 'no-ninja-here')
    monkeypatch.setenv('PATH', bare_path)
    get_path = sysconfig.get_path
    monkeypatch.setattr(sysconfig, 'get_path', lambda name, *args: str(scripts) if name == 'scripts'
                        else get_path(name, *args))
    monkeypatch.setattr(build, 'find_cxx', lambda: '/usr/bin/c++')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    assert not torch.utils.cpp_extension.is_ninja_available()
    seen = []
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', lambda **kwargs: seen.append(
        (torch.utils.cpp_extension.is_ninja_available(), shutil.which('ninja'))))
    build.load_cpu_extension()
    assert seen == [(True, str(ninja))]
    assert os.environ['PATH'] == bare_path


def test_auto_picks_cpu_kernel_and_matches_pytorch(msda_inputs, cpu_extension):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs()
    assert resolve_backend('auto', value.device, value.dtype) == 'cpu'
    assert resolve_backend('pytorch', value.device, value.dtype) == 'pytorch'
    fused = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend='auto')
    reference = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend='pytorch')
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)


def test_fake_tensors_take_the_pytorch_formula_whatever_the_backend(msda_inputs, cpu_extension):
    """Non-strict torch.export runs on fake tensors with no tracer flag set; the compiled op has no fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    inputs = msda_inputs(dtype=torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, warnings.catch_warnings():
        warnings.simplefilter('error')  # no self-check on fake tensors, no fallback warning
        value, *rest = (mode.from_tensor(t) for t in inputs)
        out = ms_deform_attn(value, *rest, spatial_shapes_list=[(3, 5), (1, 4), (6, 1), (2, 2)], backend='cpu')
    assert isinstance(out, FakeTensor) and out.shape == (2, 7, 15)


def test_environment_variable_overrides_the_config_and_is_logged_once(monkeypatch):
    logged = []
    monkeypatch.setattr(ms_deform_attn_func.logger, 'warning', lambda *args: logged.append(args))
    assert backend_from_config('cpu') == 'cpu' and not logged
    monkeypatch.setenv(ms_deform_attn_func.ENV_VAR, ' Pytorch ')
    assert backend_from_config('cpu') == 'pytorch'
    assert backend_from_config('cpu') == 'pytorch'
    assert len(logged) == 1 and 'overrides msda_backend' in logged[0][0]
    monkeypatch.setenv(ms_deform_attn_func.ENV_VAR, 'fast')
    with pytest.raises(ValueError, match="environment variable CAFF_MSDA_BACKEND: unknown MSDeformAttn backend 'fast'"):
        backend_from_config('cpu')


def test_unknown_backend_name_is_an_error(msda_inputs):
    with pytest.raises(ValueError, match="msda_backend: unknown MSDeformAttn backend 'gpu'"):
        backend_from_config('gpu')
    with pytest.raises(ValueError, match="unknown MSDeformAttn backend 'gpu'"):
        ms_deform_attn(*msda_inputs(), backend='gpu')


def test_failed_build_warns_once_and_falls_back(msda_inputs, monkeypatch):
    def broken_build():
        raise RuntimeError('Error building extension\nc++: fatal error: no input files')

    monkeypatch.setattr(ms_deform_attn_func, '_modules', {})
    monkeypatch.setattr(build, 'load_cpu_extension', broken_build)
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs()
    with pytest.warns(RuntimeWarning, match="using the 'pytorch' backend for cpu float64 tensors \\('cpu' could not "
                                            "be built \\(c\\+\\+: fatal error: no input files"):
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend='cpu')
    torch.testing.assert_close(out, ms_deform_attn_pytorch(value, spatial_shapes, locations, weights))


def test_cuda_backend_on_cpu_tensors_warns_and_runs(cpu_extension):
    with pytest.warns(RuntimeWarning, match="using the 'cpu' backend .*'cuda' cannot run cpu tensors"):
        assert resolve_backend('cuda', torch.device('cpu')) == 'cpu'


def test_triton_on_cpu_tensors_without_the_interpreter_falls_back(monkeypatch):
    """Without TRITON_INTERPRET=1 at import, the triton kernels cannot run CPU tensors: one warning, pytorch."""
    fake = type('CompiledTritonKernels', (), {'can_run': staticmethod(lambda device: device.type == 'cuda')})
    monkeypatch.setitem(ms_deform_attn_func._modules, 'triton', fake)
    with pytest.warns(RuntimeWarning, match="'triton' runs cpu tensors only under TRITON_INTERPRET=1"):
        assert resolve_backend('triton', torch.device('cpu')) == 'pytorch'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_backend('triton', torch.device('cpu')) == 'pytorch'


@pytest.mark.parametrize('wrong, dtype', [('output', torch.float32), ('grad_value', torch.float64),
                                          ('grad_locations', torch.float32), ('grad_weights', torch.float64)])
def test_self_check_rejects_a_wrong_kernel(msda_inputs, monkeypatch, wrong, dtype):
    """A kernel off by 1 % in one of its four results is caught before it runs: one warning naming the result
    and the error size, then the pytorch path, for this dtype only."""
    bad = PytorchKernels(**{wrong: lambda t: t * 1.01})
    monkeypatch.setitem(ms_deform_attn_func._modules, 'cpu', bad)
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    with pytest.warns(RuntimeWarning, match=f"'cpu' disagrees with 'pytorch' on the self-check problem: {wrong} "
                                            r"off by 1\.00e-02 of its largest value"):
        out = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend='cpu')
    calls = bad.calls
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend='cpu')
    assert bad.calls == calls  # the wrong kernel is not run again
    expected = output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, spatial_shapes, l, a), value, locations,
                                weights, torch.ones_like(out))
    got = (out.detach(), *torch.autograd.grad(again.sum(), leaves))
    for name, g, w in zip(('output', 'grad_value', 'grad_locations', 'grad_weights'), got, expected):
        torch.testing.assert_close(g, w, msg=name)
    assert set(ms_deform_attn_func._trusted) == {('cpu', 'cpu', dtype)}  # the verdict is per (device, dtype)


def test_self_check_catches_a_kernel_that_raises(msda_inputs, monkeypatch):
    class Raising(PytorchKernels):
        def backward(self, *args):
            raise RuntimeError('illegal memory access')

    monkeypatch.setitem(ms_deform_attn_func._modules, 'cpu', Raising())
    with pytest.warns(RuntimeWarning, match=r"'cpu' failed on the self-check problem \(RuntimeError: illegal memory"):
        assert resolve_backend('cpu', torch.device('cpu')) == 'pytorch'


def test_self_check_trusts_the_cpu_kernel_in_well_under_a_second(msda_inputs, cpu_extension):
    """The one-time cost of the self-check of the real cpu kernel (printed: pytest -s shows it), with a DINO-sized
    head (M=8, D=32, L=4, P=4); run inside inference mode, it leaves the global RNG untouched."""
    rng = torch.random.get_rng_state()
    with torch.inference_mode():
        assert resolve_backend('auto', torch.device('cpu'), torch.float32, (8, 32, 4, 4)) == 'cpu'
    seconds = ms_deform_attn_func.self_check_seconds[('cpu', 'cpu', torch.float32)]
    print(f'self-check of the cpu kernel (M=8, D=32, L=4, P=4, fp32): {1e3 * seconds:.1f} ms')
    assert seconds < 1.0
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert ms_deform_attn_func._trusted[('cpu', 'cpu', torch.float32)] is None


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('backend', ['pytorch', 'cpu'])
def test_reduced_precision_runs_in_fp32(msda_inputs, cpu_extension, dtype, backend):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs(dtype=torch.float32)
    value, weights = value.to(dtype), weights.to(dtype)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)
    assert out.dtype == dtype
    expected = ms_deform_attn_pytorch(value.float(), spatial_shapes, locations, weights.float())
    torch.testing.assert_close(out, expected.to(dtype))


def test_op_rejects_mismatched_weights(msda_inputs):
    value, spatial_shapes, level_start_index, locations, weights = msda_inputs()
    with pytest.raises(ValueError, match=r'attention_weights must be \(N, Lq, M, L, P\)'):
        ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights[..., :1])


def test_module_init_follows_reference():
    layer = MSDeformAttn(d_model=64, n_levels=2, n_heads=8, n_points=3)
    bias = layer.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 0 points along +x, head 2 along +y, head 1 along the diagonal (scaled so max |component| = 1).
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    assert not layer.sampling_offsets.weight.any() and not layer.attention_weights.weight.any()
    assert not layer.attention_weights.bias.any() and not layer.value_proj.bias.any()
    with pytest.raises(ValueError, match=r'd_model \(60\) must be divisible by n_heads \(8\)'):
        MSDeformAttn(d_model=60, n_heads=8)


def test_module_keys_match_reference_manifest():
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    ours = {k: list(v.shape) for k, v in layer.state_dict().items()}
    # transformer.encoder.layers.0.self_attn.* of the DINO-4scale-R50 reference state dict.
    reference = {'sampling_offsets.weight': [256, 256], 'sampling_offsets.bias': [256],
                 'attention_weights.weight': [128, 256], 'attention_weights.bias': [128],
                 'value_proj.weight': [256, 256], 'value_proj.bias': [256],
                 'output_proj.weight': [256, 256], 'output_proj.bias': [256]}
    assert ours == reference


def module_inputs(n=2, lq=5, c=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor([[4, 6], [2, 3]])
    level_start_index = torch.tensor([0, 24])
    query = torch.randn(n, lq, c, generator=gen)
    flat = torch.randn(n, 30, c, generator=gen)
    return query, flat, spatial_shapes, level_start_index, gen


def test_module_sampling_locations_for_2d_and_4d_references(monkeypatch):
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(layer.sampling_offsets.weight)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    seen = {}

    def spy(value, shapes, starts, locations, weights, im2col_step, shapes_list, backend):
        seen['locations'], seen['weights'], seen['backend'] = locations, weights, backend
        return ms_deform_attn_pytorch(value, shapes, locations, weights, shapes_list)

    monkeypatch.setattr(ms_deform_attn_layer, 'ms_deform_attn', spy)
    offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, 2, 2)
    ref2 = torch.rand(2, 5, 2, 2, generator=gen)
    layer(query, ref2, flat, spatial_shapes, level_start_index)
    per_pixel = offsets / torch.tensor([[6.0, 4.0], [3.0, 2.0]]).view(1, 1, 1, 2, 1, 2)
    torch.testing.assert_close(seen['locations'], ref2[:, :, None, :, None] + per_pixel)
    torch.testing.assert_close(seen['weights'].sum((-1, -2)), torch.ones(2, 5, 2))
    ref4 = torch.rand(2, 5, 2, 4, generator=gen)
    out = layer(query, ref4, flat, spatial_shapes, level_start_index)
    box_scaled = offsets / 2 * ref4[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(seen['locations'], ref4[:, :, None, :, None, :2] + box_scaled)
    assert out.shape == (2, 5, 16) and seen['backend'] == 'auto'
    with pytest.raises(ValueError, match='must end in 2'):
        layer(query, ref4[..., :3], flat, spatial_shapes, level_start_index)


@pytest.mark.parametrize('n_points', [2, 3])
def test_module_sampling_locations_are_the_reference_expressions_bit_for_bit(monkeypatch, n_points):
    """The fused location updates round like the reference's: exactly for 2-d points (addcdiv, compact or
    expanded), up to a fused multiply-add's last bit for 4-d boxes (addcmul)."""
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=n_points)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=3.0)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    seen = []
    monkeypatch.setattr(ms_deform_attn_layer, 'ms_deform_attn',
                        lambda value, shapes, starts, locations, weights, *rest: seen.append(locations) or
                        ms_deform_attn_pytorch(value, shapes, locations, weights, rest[1]))
    offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, n_points, 2)
    ref2, ref4 = torch.rand(2, 5, 2, 2, generator=gen), torch.rand(2, 5, 2, 4, generator=gen)
    normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
    compact = layer(query, ref2, flat, spatial_shapes, level_start_index)
    expanded = layer(query, layer.expand_reference_points(ref2), flat, spatial_shapes, level_start_index)
    layer(query, ref4, flat, spatial_shapes, level_start_index)
    want2 = ref2[:, :, None, :, None, :] + offsets / normalizer
    want4 = ref4[:, :, None, :, None, :2] + offsets / n_points * ref4[:, :, None, :, None, 2:] * 0.5
    assert torch.equal(seen[0], want2) and torch.equal(seen[1], want2)
    torch.testing.assert_close(seen[2], want4, rtol=2e-7, atol=1e-7)
    assert torch.equal(compact, expanded)
    with pytest.raises(ValueError, match='expanded reference_points must be'):
        layer(query, layer.expand_reference_points(ref2)[:, :, :1], flat, spatial_shapes, level_start_index)


def test_module_sampling_locations_under_autocast_round_like_the_reference(monkeypatch):
    """Mixed precision (bfloat16 offsets, float32 points) and a bfloat16 model: the reference's two roundings."""
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=3.0)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    seen = []
    monkeypatch.setattr(ms_deform_attn_layer, 'ms_deform_attn',
                        lambda value, shapes, starts, locations, weights, *rest: seen.append(locations) or
                        ms_deform_attn_pytorch(value.float(), shapes, locations.float(), weights.float(), rest[1]
                                               ).to(value.dtype))
    ref2, ref4 = torch.rand(2, 5, 2, 2, generator=gen), torch.rand(2, 5, 2, 4, generator=gen)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, 2, 2)
        layer(query, ref2, flat, spatial_shapes, level_start_index)
        layer(query, ref4, flat, spatial_shapes, level_start_index)
    assert offsets.dtype == torch.bfloat16
    normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
    assert torch.equal(seen[0], ref2[:, :, None, :, None, :] + offsets / normalizer)
    assert torch.equal(seen[1], ref4[:, :, None, :, None, :2] + offsets / 2 * ref4[:, :, None, :, None, 2:] * 0.5)
    half = layer.bfloat16()  # a half-precision model: the one-pass kernels would round once, in float
    query, ref2, ref4 = query.bfloat16(), ref2.bfloat16(), ref4.bfloat16()
    offsets = half.sampling_offsets(query).view(2, 5, 2, 2, 2, 2)
    half(query, ref2, flat.bfloat16(), spatial_shapes, level_start_index)
    half(query, ref4, flat.bfloat16(), spatial_shapes, level_start_index)
    assert torch.equal(seen[2], ref2[:, :, None, :, None, :] + offsets / normalizer)
    assert torch.equal(seen[3], ref4[:, :, None, :, None, :2] + offsets / 2 * ref4[:, :, None, :, None, 2:] * 0.5)


@pytest.mark.parametrize('grad', [False, True])
def test_module_identity_is_added_by_the_output_projection(grad):
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    torch.nn.init.normal_(layer.output_proj.bias)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    ref = torch.rand(2, 5, 2, 2, generator=gen)
    identity = torch.randn(2, 5, 16, generator=gen)
    with torch.set_grad_enabled(grad):
        plain = layer(query, ref, flat, spatial_shapes, level_start_index)
        added = layer(query, ref, flat, spatial_shapes, level_start_index, identity=identity)
    assert added.requires_grad == grad
    torch.testing.assert_close(added, plain + identity, rtol=1e-6, atol=1e-6)


def test_module_padding_mask_ignores_padded_values():
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    ref = torch.rand(2, 5, 2, 2, generator=gen)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, 20:] = True
    changed = flat.clone()
    changed[:, 20:] += 100.0
    out = layer(query, ref, flat, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(layer(query, ref, changed, spatial_shapes, level_start_index, mask), out)
    assert not torch.allclose(layer(query, ref, changed, spatial_shapes, level_start_index), out)


def test_module_backends_agree_and_fp16_keeps_dtype(cpu_extension):
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend='cpu')
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)
    query, flat, spatial_shapes, level_start_index, gen = module_inputs()
    ref = torch.rand(2, 5, 2, 4, generator=gen)
    outputs, param_grads = {}, {}
    for backend in ('cpu', 'pytorch'):
        with use_backend(layer, backend):
            layer.zero_grad()
            outputs[backend] = layer(query, ref, flat, spatial_shapes, level_start_index,
                                     spatial_shapes_list=[(4, 6), (2, 3)])
            outputs[backend].square().sum().backward()
            param_grads[backend] = {k: p.grad.clone() for k, p in layer.named_parameters()}
    assert layer.backend == 'cpu'  # restored after the block
    assert ms_deform_attn_func.self_check_seconds.keys() == {('cpu', 'cpu', torch.float32)}
    reference = outputs['pytorch']
    torch.testing.assert_close(outputs['cpu'], reference, rtol=1e-5, atol=1e-6)
    for name, grad in param_grads['pytorch'].items():
        torch.testing.assert_close(param_grads['cpu'][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    reference = reference.detach()
    half = layer.half()
    out = half(query.half(), ref.half(), flat.half(), spatial_shapes, level_start_index)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_module_holds_its_backend():
    layers = torch.nn.Sequential(MSDeformAttn(16, 2, 2, 2, backend='pytorch'), MSDeformAttn(16, 2, 2, 2))
    assert [layer.backend for layer in layers] == ['pytorch', 'auto']
    assert "backend='pytorch'" in repr(layers[0])
    assert 'backend' not in ''.join(layers.state_dict())
    with use_backend(layers, 'triton'):
        assert [layer.backend for layer in layers] == ['triton', 'triton']
    assert [layer.backend for layer in layers] == ['pytorch', 'auto']
    with pytest.raises(ValueError, match="MSDeformAttn: unknown MSDeformAttn backend 'gpu'"):
        MSDeformAttn(16, 2, 2, 2, backend='gpu')
