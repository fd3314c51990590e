"""Benchmark of the MSDeformAttn backends: forward and forward+backward time, ratio to `pytorch`, peak memory, and
the one-time self-check of each compiled backend (models/ops/ms_deform_attn_func.py).

Cases (DINO 4-scale on a 640x512 LLVIP image; levels at strides 8, 16, 32, 64 -> S = 6800 positions; batch 2,
M = 8 heads, D = 32 channels per head, P = 4 points):
    encoder   Lq = 6800 queries, one per position; sampling around each query's own pixel (init-like offsets)
    decoder   Lq = 1100 queries (900 + 200 denoising); 4-d reference boxes spread over the image
The op runs on the same inputs for every backend; times are medians over --repeats runs after one warm-up.
--dtypes casts value, locations and weights (float16 / bfloat16 inputs are computed in fp32 by every backend).
Peak memory on CPU is the growth of the process's resident-set high-water mark while the case runs (each
(backend, case) runs in a fresh process); on CUDA it is torch's peak allocated memory above the inputs. The
self-check column is the one-time cost of the first call of a compiled backend for a (device, dtype), measured
after a warm-up call of the pytorch path (so that torch's own first-call set-up is not counted); for triton on
CUDA it includes the JIT compile of the kernels.

    python tools/bench_msda.py            # cpu: pytorch vs cpu, 2 threads, writes docs/benchmarks/msda_cpu.md
    python tools/bench_msda.py --device cuda --dtypes float32 float16 bfloat16 --output outputs/msda_cuda.md
                                          # cuda: pytorch, cuda and triton
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.ops import ms_deform_attn, ms_deform_attn_func, ms_deform_attn_pytorch, resolve_backend  # noqa: E402

IMAGE_HW = (512, 640)
STRIDES = (8, 16, 32, 64)
CASES = {'encoder': None, 'decoder': 1100}  # number of queries; None = one per value position
DEFAULT_BACKENDS = {'cpu': ['pytorch', 'cpu'], 'cuda': ['pytorch', 'cuda', 'triton']}
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
DEFAULT_OUTPUT = ROOT / 'docs' / 'benchmarks' / 'msda_cpu.md'


def make_case(case: str, device: torch.device, batch: int = 2, heads: int = 8, channels: int = 32,
              points: int = 4, seed: int = 0):
    """Inputs of the op for one case: value, spatial_shapes, level_start_index, locations, weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(IMAGE_HW[0] // s, IMAGE_HW[1] // s) for s in STRIDES]
    levels = len(shapes)
    spatial_shapes = torch.tensor(shapes)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    num_value = int(spatial_shapes.prod(1).sum())
    value = torch.randn(batch, num_value, heads, channels, generator=gen)
    wh = spatial_shapes.flip(-1).float().view(1, 1, 1, levels, 1, 2)
    if CASES[case] is None:
        # Encoder: each query sits at the centre of its own pixel; offsets of a few pixels around it.
        centres = [torch.stack(torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                              indexing='ij')[::-1], dim=-1).view(-1, 2) for h, w in shapes]
        reference = torch.cat(centres).view(1, num_value, 1, 1, 1, 2)
        offsets = torch.randn(batch, num_value, heads, levels, points, 2, generator=gen) * 2.0
        locations = reference + offsets / wh
    else:
        # Decoder: boxes anywhere in the image; offsets within about half a box.
        queries = CASES[case]
        centres = torch.rand(batch, queries, 1, 1, 1, 2, generator=gen)
        sizes = torch.rand(batch, queries, 1, 1, 1, 2, generator=gen) * 0.3 + 0.02
        offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=gen)
        locations = centres + offsets / points * sizes * 0.5
    logits = torch.randn(*locations.shape[:3], levels * points, generator=gen)
    weights = logits.softmax(-1).view(*locations.shape[:5])
    return tuple(t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights))


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_call(backend: str, device: torch.device, problem: tuple[int, int, int, int]) -> tuple[str, float]:
    """Resolve `backend` for fp32 (every DTYPES input is computed in fp32) as the first call of a run does:
    build / import it and run its self-check. Returns the backend that will run and the self-check's one-time
    cost in ms (nan when none ran: pytorch, or a backend that could not be loaded)."""
    warm = ms_deform_attn_func.self_check_problem(device, torch.float32, *problem)  # torch's first-call set-up
    ms_deform_attn_func.output_and_grads(lambda v, l, a: ms_deform_attn_pytorch(v, warm[1], l, a), warm[0],
                                         *warm[3:])
    ran = resolve_backend(backend, device, torch.float32, problem)
    seconds = ms_deform_attn_func.self_check_seconds.get((backend, str(device), torch.float32))
    return ran, float('nan') if seconds is None else 1e3 * seconds


def measure(backend: str, case: str, device: torch.device, repeats: int, dtype_name: str = 'float32') -> dict:
    """Forward and forward+backward median ms, peak extra memory (MiB) and self-check ms of one backend on one
    case, with inputs of dtype `dtype_name`."""
    dtype = DTYPES[dtype_name]
    value, shapes, starts, locations, weights = (t.to(dtype) if t.is_floating_point() else t
                                                 for t in make_case(case, device))
    shapes_list = [tuple(hw) for hw in shapes.tolist()]
    grad_out = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], device=device,
                           dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def forward():
        with torch.no_grad():
            return ms_deform_attn(value, shapes, starts, locations, weights, spatial_shapes_list=shapes_list,
                                  backend=backend)

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], spatial_shapes_list=shapes_list,
                             backend=backend)
        out.backward(grad_out)
        for leaf in leaves:
            leaf.grad = None

    problem = (value.shape[2], value.shape[3], *locations.shape[3:5])
    ran, check_ms = first_call(backend, device, problem)  # before the baseline: the kernels are not op memory
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fwd = _timed(forward, device, repeats)
    fwd_bwd = _timed(forward_backward, device, repeats)
    if device.type == 'cuda':
        peak_mib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    label = backend if ran == backend else f'{backend} (ran {ran})'
    return {'backend': label, 'case': case, 'dtype': dtype_name, 'fwd_ms': fwd, 'fwd_bwd_ms': fwd_bwd,
            'peak_mib': peak_mib, 'queries': int(locations.shape[1]), 'self_check_ms': check_ms}


def _measure_in_fresh_process(backend: str, case: str, dtype_name: str, threads: int, repeats: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), '--worker', backend, case, dtype_name, '--threads',
               str(threads), '--repeats', str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench_msda: measuring backend '{backend}' on case '{case}' failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], threads: int | None, device: torch.device) -> str:
    reference = {(r['case'], r['dtype']): r for r in rows if r['backend'] == 'pytorch'}
    where = f'{threads} CPU threads' if device.type == 'cpu' else torch.cuda.get_device_name(device)
    lines = [f'MSDeformAttn backends on {device.type} ({where}); N=2, M=8, D=32, L=4, P=4, S=6800; median ms',
             '',
             '| backend | case | dtype | Lq | fwd ms | fwd+bwd ms | fwd ratio vs pytorch | fwd+bwd ratio vs pytorch | '
             'peak extra memory MiB | self-check ms |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ref = reference.get((r['case'], r['dtype']))
        fwd_ratio = f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x" if ref else '-'
        bwd_ratio = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if ref else '-'
        check = '-' if r['self_check_ms'] != r['self_check_ms'] else f"{r['self_check_ms']:.1f}"
        lines.append(f"| {r['backend']} | {r['case']} | {r['dtype']} | {r['queries']} | {r['fwd_ms']:.1f} | "
                     f"{r['fwd_bwd_ms']:.1f} | {fwd_ratio} | {bwd_ratio} | {r['peak_mib']:.0f} | {check} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description='Time the MSDeformAttn backends against the pytorch path.')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--backends', nargs='+', default=None,
                        help='default: pytorch and cpu on cpu; pytorch, cuda and triton on cuda')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--dtypes', nargs='+', default=['float32'], choices=list(DTYPES),
                        help='input dtypes (float16 / bfloat16 inputs are computed in fp32)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (CPU device)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--output', type=Path, default=None,
                        help=f'markdown file for the table (default for cpu: {DEFAULT_OUTPUT.relative_to(ROOT)}); '
                             "'-' to print only")
    parser.add_argument('--worker', nargs=3, metavar=('BACKEND', 'CASE', 'DTYPE'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        backend, case, dtype_name = args.worker
        print(json.dumps(measure(backend, case, device, args.repeats, dtype_name)))
        return
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible')
    backends = args.backends or DEFAULT_BACKENDS[device.type]
    rows = []
    for dtype_name in args.dtypes:
        for case in args.cases:
            for backend in backends:
                if device.type == 'cpu':
                    row = _measure_in_fresh_process(backend, case, dtype_name, args.threads, args.repeats)
                else:
                    row = measure(backend, case, device, args.repeats, dtype_name)
                rows.append(row)
                print(f"{backend:8s} {case:8s} {dtype_name:8s} fwd {row['fwd_ms']:9.1f} ms   "
                      f"fwd+bwd {row['fwd_bwd_ms']:9.1f} ms   self-check {row['self_check_ms']:.1f} ms", flush=True)
    text = table(rows, args.threads if device.type == 'cpu' else None, device)
    print()
    print(text)
    output = args.output if args.output is not None else (DEFAULT_OUTPUT if device.type == 'cpu' else None)
    if output is not None and str(output) != '-':
        output.parent.mkdir(parents=True, exist_ok=True)
        command = ' '.join(['python tools/bench_msda.py', *(argv if argv is not None else sys.argv[1:])])
        header = (f'# MSDeformAttn benchmark ({device.type})\n\nWritten by `{command}` on '
                  f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, torch {torch.__version__}, '
                  f'{cpu_name()}, {os.cpu_count()} cores, 1-minute load average at the end: '
                  f'{os.getloadavg()[0]:.1f} (a load above the core count means other work shared the cores: '
                  'absolute times are then inflated; the ratios compare backends on the same inputs).\n\n')
        output.write_text(header + text + '\n')
        print(f'\nwritten to {output}')


if __name__ == '__main__':
    main()
