"""The GPU checks of the MSDeformAttn backends and a short AMP training run, written as one Markdown page.

Run by ``tools/gpu_checks.sh`` on a machine with a CUDA GPU (GPU time is scarce: everything in one call, a few
minutes on an H200). Sections of the page:
    parity     each fused backend against the pytorch path on small random problems (N=2, Lq=7, M=3, D in {5, 32},
               P=2, levels (3, 5), (1, 4), (6, 1), (2, 2): a single row and a single column among them; locations in
               [-0.3, 1.3], so inside, on the border and outside the maps): max |fused - pytorch| / max |pytorch| of
               the output and the three gradients, in fp64 and fp32, against PARITY_TOLERANCE;
    gradcheck  ``torch.autograd.gradcheck`` of each fused backend in fp64 (value, locations, weights);
    speed      ``tools/bench_msda.py``'s DINO-sized cases (encoder: Lq = S = 6800 queries; decoder: Lq = 1100;
               N=2, M=8, D=32, L=4, P=4) with fp32, fp16 and bf16 inputs (every backend computes in fp32 and casts
               the result back, as ``ms_deform_attn`` does; the casts are timed too): median ms of the forward and
               of forward + backward;
    amp        the tiny config (``config/DINO/CAFF_tiny.py``) on a synthetic data set, one warm-up step then a few
               timed training steps per (msda_backend, amp_dtype) through ``engine.train_one_epoch`` (float16 with
               a GradScaler): the loss, ms per step, and the MSDeformAttn warnings (a backend that fell back).
The kernels are called directly, not through the dispatcher, so a backend that cannot run is reported with the
reason instead of being replaced by pytorch. Backends: pytorch always; on CUDA cuda (the nvcc-built extension) and
triton (when ``models/ops/ms_deform_attn_triton.py`` exists); on CPU cpu (the C++ kernel) and triton (only under
TRITON_INTERPRET=1). ``--tiny`` shrinks every problem so that the same code runs on a CPU in seconds (its test).

    python tools/gpu_checks.py --output docs/benchmarks/msda_gpu.md       # on a GPU machine
    python tools/gpu_checks.py --device cpu --tiny --backends pytorch      # the same code, tiny, on CPU
Exit status 1 when a parity, gradcheck or AMP check fails (the page is written first).
"""
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets import build_dataset  # noqa: E402  (needs ROOT on sys.path)
from datasets.synthetic import generate_synthetic_dataset  # noqa: E402
from engine import amp_grad_scaler, train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402
from models.ops import build, ms_deform_attn_pytorch  # noqa: E402
from models.ops.ms_deform_attn_func import _FusedMSDeformAttn  # noqa: E402
from tools.bench_msda import CASES, _timed, make_case  # noqa: E402
from tools.bench_page import command_line, load_average, write_page  # noqa: E402
from util.cli import ArgumentParser, run_command  # noqa: E402
from util.config import load_config  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.misc import collate_fn  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402
from util.rng import seed_everything  # noqa: E402

PARITY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # max |error| / max |pytorch value|
SPEED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AMP_DTYPES = ('float16', 'bfloat16')
TINY_CONFIG = ROOT / 'config' / 'DINO' / 'CAFF_tiny.py'
# --tiny: 96-pixel images, one encoder layer, a narrow model (the CPU test runs every section in seconds)
TINY_OPTIONS = ['data_aug_scales=[96]', 'data_aug_scales2_resize=[96]', 'data_aug_scales2_crop=[64,96]',
                'data_aug_max_size=128', 'enc_layers=1', 'dec_layers=2', 'num_queries=20', 'dn_number=4',
                'hidden_dim=32', 'dim_feedforward=64', 'batch_size=2']
TRITON_MODULE = 'models.ops.ms_deform_attn_triton'
GRAD_NAMES = ('output', 'grad value', 'grad locations', 'grad weights')


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


def load_kernels(name: str, device: torch.device):
    """``(kernels, why_not)``: the module with ``forward`` / ``backward`` of a fused backend ('cpu', 'cuda',
    'triton'), None for 'pytorch'; ``why_not`` is None, or why the backend cannot run ``device`` tensors here."""
    if name == 'pytorch':
        return None, None
    try:
        if name == 'triton':
            if importlib.util.find_spec(TRITON_MODULE) is None:
                return None, f'{TRITON_MODULE} does not exist in this checkout'
            kernels = importlib.import_module(TRITON_MODULE)
            if not kernels.can_run(device):
                return None, f'triton cannot run {device.type} tensors here (CPU: only with TRITON_INTERPRET=1)'
            return kernels, None
        if name != device.type:
            return None, f'{name} kernels cannot run {device.type} tensors'
        return (build.load_cuda_extension() if name == 'cuda' else build.load_cpu_extension()), None
    except Exception as error:  # a failed build or import is a result of this check, reported in the table
        return None, f'{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ""}'


def make_op(kernels, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor):
    """``op(value, locations, weights) -> (N, Lq, M * D)`` on one backend (kernels None: the pytorch path), computed
    in fp64 for fp64 inputs and in fp32 otherwise, returned in the dtype of ``value``."""
    shapes_list = [tuple(hw) for hw in spatial_shapes.tolist()]

    def op(value, locations, weights):
        out_dtype = value.dtype
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        value, locations, weights = (t.to(dtype).contiguous() for t in (value, locations, weights))
        if kernels is None:
            out = ms_deform_attn_pytorch(value, spatial_shapes, locations, weights, shapes_list)
        else:
            out = _FusedMSDeformAttn.apply(kernels, value, spatial_shapes, level_start_index, locations, weights, 64)
        return out.to(out_dtype)

    return op


def small_problem(device: torch.device, dtype: torch.dtype, n=2, lq=7, heads=3, head_dim=5, points=2, seed=0):
    """value, spatial_shapes, level_start_index, locations, weights of a small random problem (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor([(3, 5), (1, 4), (6, 1), (2, 2)], dtype=torch.long)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    levels, size = len(spatial_shapes), int(spatial_shapes.prod(1).sum())
    value = torch.randn(n, size, heads, head_dim, generator=gen, dtype=torch.float64)
    locations = torch.rand(n, lq, heads, levels, points, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(n, lq, heads, levels, points, generator=gen, dtype=torch.float64)
    shapes = (spatial_shapes.to(device), level_start_index.to(device))
    return (value.to(device, dtype), *shapes, locations.to(device, dtype), weights.to(device, dtype))


def _output_and_grads(op, value, locations, weights, grad_output) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = op(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_output)]


def parity(name: str, kernels, device: torch.device) -> list[dict]:
    """Rows of the parity table: per dtype and head size, the relative error of the output and each gradient."""
    rows = []
    for dtype in PARITY_TOLERANCE:
        for head_dim in (5, 32):
            value, shapes, starts, locations, weights = small_problem(device, dtype, head_dim=head_dim)
            grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * head_dim,
                                      generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
            want = _output_and_grads(make_op(None, shapes, starts), value, locations, weights, grad_output)
            got = _output_and_grads(make_op(kernels, shapes, starts), value, locations, weights, grad_output)
            errors = [((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want)]
            rows.append({'backend': name, 'dtype': _dtype_name(dtype), 'head_dim': head_dim, 'errors': errors,
                         'ok': max(errors) <= PARITY_TOLERANCE[dtype]})
    return rows


def gradcheck(kernels, device: torch.device) -> str:
    """'passed', or what failed, for torch.autograd.gradcheck of one fused backend in fp64."""
    value, shapes, starts, locations, weights = small_problem(device, torch.float64, n=1, lq=3, heads=2, head_dim=3)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations.clamp(-0.2, 1.2), weights))
    try:
        torch.autograd.gradcheck(make_op(kernels, shapes, starts), inputs, eps=1e-7, atol=1e-6)
    except Exception as error:  # GradcheckError names the input and the mismatch: the table reports it
        return f'FAILED: {str(error).strip().splitlines()[0]}'
    return 'passed'


def speed(name: str, kernels, device: torch.device, repeats: int, tiny: bool) -> list[dict]:
    """Rows of the speed table: per case and input dtype, median forward and forward+backward ms."""
    sizes = {'batch': 1, 'heads': 2, 'channels': 4} if tiny else {}
    rows = []
    for case in CASES:
        base = make_case(case, device, **sizes)
        value, shapes, starts, locations, weights = base
        op = make_op(kernels, shapes, starts)
        for dtype in SPEED_DTYPES:
            inputs = [t.to(dtype) for t in (value, locations, weights)]
            grad_output = torch.ones(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3],
                                     device=device, dtype=dtype)
            leaves = [t.clone().requires_grad_() for t in inputs]

            def forward():
                with torch.no_grad():
                    op(*inputs)

            def forward_backward():
                torch.autograd.grad(op(*leaves), leaves, grad_output)

            _, fwd_ms = _timed(forward, device, repeats)  # (best, median): the page shows medians
            _, fwd_bwd_ms = _timed(forward_backward, device, repeats)
            rows.append({'backend': name, 'case': case, 'queries': int(locations.shape[1]), 'dtype': _dtype_name(dtype),
                         'fwd_ms': fwd_ms, 'fwd_bwd_ms': fwd_bwd_ms})
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def amp_training(backend: str, amp_dtype: str, device: torch.device, data_root: str, steps: int,
                 tiny: bool) -> dict:
    """One warm-up and ``steps`` timed AMP training steps of the tiny config with ``msda_backend = backend``."""
    options = [*(TINY_OPTIONS if tiny else []), f'coco_path={data_root!r}', f'msda_backend={backend!r}',
               f'device={device.type!r}', 'amp=True', f'amp_dtype={amp_dtype!r}', 'print_freq=1000']
    cfg = load_config(TINY_CONFIG, options)
    seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model, criterion, _ = build_model(cfg)
        model, criterion = model.to(device), criterion.to(device)
        optimizer = build_adamw(param_groups(model, cfg.lr, cfg.lr_backbone), cfg.lr, cfg.weight_decay)
        loader = torch.utils.data.DataLoader(build_dataset('train', cfg), batch_size=cfg.batch_size, shuffle=False,
                                             drop_last=True, collate_fn=collate_fn)
        batches = list(loader)[:steps + 1]
        scaler = amp_grad_scaler(device, cfg.amp, cfg.amp_dtype)

        def epoch(part):
            return train_one_epoch(model, criterion, part, optimizer, device, 0, cfg.clip_max_norm, True, scaler,
                                   print_freq=cfg.print_freq, amp_dtype=cfg.amp_dtype)

        epoch(batches[:1])
        _synchronize(device)
        start = time.perf_counter()
        stats = epoch(batches[1:])
        _synchronize(device)
        seconds = time.perf_counter() - start
    notes = sorted({str(w.message).splitlines()[0] for w in caught if 'MSDeformAttn' in str(w.message)})
    return {'backend': backend, 'amp_dtype': amp_dtype, 'steps': len(batches) - 1, 'batch': cfg.batch_size,
            'loss': stats['loss'], 'ms_per_step': 1e3 * seconds / max(len(batches) - 1, 1),
            'scale': scaler.get_scale() if scaler is not None else None, 'notes': '; '.join(notes) or '-',
            'ok': stats['loss'] == stats['loss'] and abs(stats['loss']) != float('inf')}


def _machine(device: torch.device) -> str:
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        where = f'{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), CUDA ' \
                f'{torch.version.cuda}'
    else:
        where = f'CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}'
    try:
        triton_version = importlib.import_module('triton').__version__
    except ImportError:
        triton_version = 'not installed'
    return (f'{where}; torch {torch.__version__}; triton {triton_version}; 1/5/15-minute load average at start '
            f'{load_average()}')


def _parity_table(rows: list[dict]) -> list[str]:
    lines = ['| backend | dtype | D | ' + ' | '.join(GRAD_NAMES) + ' | tolerance | result |',
             '|---|---|---|' + '---|' * len(GRAD_NAMES) + '---|---|']
    for r in rows:
        tol = PARITY_TOLERANCE[getattr(torch, r['dtype'])]
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['head_dim']} | "
                     + ' | '.join(f'{e:.1e}' for e in r['errors']) + f" | {tol:.0e} | {'ok' if r['ok'] else 'FAIL'} |")
    return lines


def _speed_table(rows: list[dict]) -> list[str]:
    reference = {(r['case'], r['dtype']): r for r in rows if r['backend'] == 'pytorch'}
    lines = ['| backend | case | Lq | input dtype | fwd ms | fwd+bwd ms | fwd speed-up vs pytorch | '
             'fwd+bwd speed-up vs pytorch |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        ref = reference.get((r['case'], r['dtype']))
        ratios = [f"{ref[k] / r[k]:.1f}x" if ref else '-' for k in ('fwd_ms', 'fwd_bwd_ms')]
        lines.append(f"| {r['backend']} | {r['case']} | {r['queries']} | {r['dtype']} | {r['fwd_ms']:.2f} | "
                     f"{r['fwd_bwd_ms']:.2f} | {ratios[0]} | {ratios[1]} |")
    return lines


def _amp_table(rows: list[dict]) -> list[str]:
    lines = ['| msda_backend | amp_dtype | steps x batch | loss | ms / step | GradScaler scale | MSDeformAttn '
             'warnings | result |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        scale = '-' if r['scale'] is None else f"{r['scale']:g}"
        lines.append(f"| {r['backend']} | {r['amp_dtype']} | {r['steps']} x {r['batch']} | {r['loss']:.4g} | "
                     f"{r['ms_per_step']:.1f} | {scale} | {r['notes']} | {'ok' if r['ok'] else 'FAIL'} |")
    return lines


def page(argv: list[str], device: torch.device, tiny: bool, unavailable: dict, parity_rows, gradchecks, speed_rows,
         amp_rows) -> str:
    lines = [f"Written by `{command_line('tools/gpu_checks.py', argv)}` (`tools/gpu_checks.sh` runs it) on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", '', f'Machine: {_machine(device)}.', '']
    for name, why in unavailable.items():
        lines.append(f'- `{name}` not measured: {why}')
    lines += ['', '## Parity with the pytorch path', '',
              'max |backend - pytorch| / max |pytorch| on small random problems (N=2, Lq=7, M=3, P=2, 4 levels '
              'with a single row and column, locations in [-0.3, 1.3]).', '', *_parity_table(parity_rows), '',
              '## gradcheck (fp64)', '', '| backend | gradcheck |', '|---|---|',
              *[f'| {name} | {result} |' for name, result in gradchecks.items()], '',
              '## Speed', '',
              f"tools/bench_msda.py's cases ({'--tiny: N=1, M=2, D=4' if tiny else 'N=2, M=8, D=32'}, L=4, P=4, "
              'S=6800); every backend computes in fp32 '
              '(fp16/bf16 inputs are cast, the casts timed too); median over the repeats after one warm-up.', '',
              *_speed_table(speed_rows), '',
              '## AMP training, tiny config', '',
              'config/DINO/CAFF_tiny.py on a synthetic data set, through engine.train_one_epoch (float16 with a '
              'GradScaler); ms per step after one warm-up step.', '', *_amp_table(amp_rows)]
    return '\n'.join(lines)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('tools/gpu_checks.py', description='GPU checks of the MSDeformAttn backends, as one '
                                                               'Markdown page.')
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--backends', nargs='+', default=None,
                        help='default: pytorch, cuda and triton on CUDA; pytorch, cpu and triton on CPU')
    parser.add_argument('--repeats', type=int, default=20, help='timed runs per speed measurement')
    parser.add_argument('--amp-steps', type=int, default=5, help='timed AMP training steps per run')
    parser.add_argument('--tiny', action='store_true', help='tiny problems: the CPU test of this script')
    parser.add_argument('--output', default=None, help='Markdown page to write (default: print only)')
    return parser


def run_checks(args, argv: list[str]) -> int:
    """Every check, the page, and the exit status: 1 if a parity, gradcheck or AMP check failed."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('tools/gpu_checks.py --device cuda: torch sees no CUDA device; run this on a GPU machine '
                         '(or --device cpu --tiny)')
    device = torch.device(args.device)
    names = args.backends or ['pytorch', device.type, 'triton']
    kernels, unavailable = {}, {}
    for name in names:
        loaded, why = load_kernels(name, device)
        if why is None:
            kernels[name] = loaded
        else:
            unavailable[name] = why
            print(f'gpu_checks: {name} skipped: {why}', file=sys.stderr)
    fused = {name: k for name, k in kernels.items() if k is not None}
    parity_rows = [row for name, k in fused.items() for row in parity(name, k, device)]
    gradchecks = {name: gradcheck(k, device) for name, k in fused.items()}
    speed_rows = [row for name, k in kernels.items() for row in speed(name, k, device, args.repeats, args.tiny)]
    with tempfile.TemporaryDirectory() as data_root:
        batch = 2 if args.tiny else load_config(TINY_CONFIG).batch_size
        generate_synthetic_dataset(data_root, num_train=batch * (args.amp_steps + 1), num_val=1,
                                   **({'width': 128, 'height': 96} if args.tiny else {}))
        amp_rows = [amp_training(name, amp_dtype, device, data_root, args.amp_steps, args.tiny)
                    for name in kernels for amp_dtype in AMP_DTYPES]
    write_page(args.output, f'MSDeformAttn on {device.type}: parity, gradcheck, speed, AMP training',
               page(argv, device, args.tiny, unavailable, parity_rows, gradchecks, speed_rows, amp_rows))
    failed = ([f"parity {r['backend']} {r['dtype']} D={r['head_dim']}" for r in parity_rows if not r['ok']]
              + [f'gradcheck {name}' for name, result in gradchecks.items() if result != 'passed']
              + [f"amp {r['backend']} {r['amp_dtype']}" for r in amp_rows if not r['ok']])
    if failed:
        print(f"gpu_checks: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(get_args_parser(), lambda args: run_checks(args, argv), argv)


if __name__ == '__main__':
    sys.exit(main())
