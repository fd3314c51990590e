"""Benchmark of the MSDeformAttn backends: forward and forward+backward time, ratio to `pytorch`, peak memory, and
the one-time self-check of each compiled backend (models/ops/ms_deform_attn_func.py).

Cases (DINO 4-scale on a 640x512 LLVIP image; levels at strides 8, 16, 32, 64 -> S = 6800 positions; batch 2,
M = 8 heads, D = 32 channels per head, P = 4 points):
    encoder   Lq = 6800 queries, one per position; sampling around each query's own pixel (init-like offsets)
    decoder   Lq = 1100 queries (900 + 200 denoising); 4-d reference boxes spread over the image
The op runs on the same inputs for every backend; times are the best (minimum) and the median of --repeats runs
after one warm-up. --image-size shrinks the image (and so S and the encoder's Lq), e.g. for a quick check.
Accuracy: the largest absolute difference of the forward output from the pytorch path computed in float64 on the
same inputs (the cast inputs, so it measures the backend's arithmetic, not the input rounding).
Bandwidth: each query, head, level and point reads 4 bilinear taps of D values plus its location and weight, and
each query and head writes D values; that traffic divided by the best forward time is the op's effective
bandwidth, printed next to two copies timed in the same process: a tensor far larger than the caches (the memory
limit) and one of the size of `value`, copied again and again (what the caches give when the map stays in them).
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
from tools.bench_page import command_line, machine_description, write_page  # noqa: E402
from util.cli import ArgumentParser, run_command  # noqa: E402
from util.errors import UsageError  # noqa: E402

IMAGE_HW = (512, 640)
STRIDES = (8, 16, 32, 64)
CASES = {'encoder': None, 'decoder': 1100}  # number of queries; None = one per value position
DEFAULT_BACKENDS = {'cpu': ['pytorch', 'cpu'], 'cuda': ['pytorch', 'cuda', 'triton']}
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
DEFAULT_OUTPUT = ROOT / 'docs' / 'benchmarks' / 'msda_cpu.md'


def make_case(case: str, device: torch.device, batch: int = 2, heads: int = 8, channels: int = 32,
              points: int = 4, seed: int = 0, image_hw: tuple[int, int] = IMAGE_HW):
    """Inputs of the op for one case: value, spatial_shapes, level_start_index, locations, weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(max(1, image_hw[0] // s), max(1, image_hw[1] // s)) for s in STRIDES]
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
        queries = min(CASES[case], num_value)
        centres = torch.rand(batch, queries, 1, 1, 1, 2, generator=gen)
        sizes = torch.rand(batch, queries, 1, 1, 1, 2, generator=gen) * 0.3 + 0.02
        offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=gen)
        locations = centres + offsets / points * sizes * 0.5
    logits = torch.randn(*locations.shape[:3], levels * points, generator=gen)
    weights = logits.softmax(-1).view(*locations.shape[:5])
    return tuple(t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights))


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(best, median) wall time of fn() in ms over ``repeats`` calls, after one warm-up call."""
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
    return min(times), statistics.median(times)


def traffic_bytes(value: torch.Tensor, locations: torch.Tensor) -> int:
    """Bytes the forward moves: per (query, head, level, point) 4 taps of D values, 2 coordinates and 1 weight;
    per (query, head) D outputs (see the module docstring)."""
    batch, queries, heads, levels, points, _ = locations.shape
    channels, item = value.shape[-1], value.element_size()
    samples = batch * queries * heads * levels * points
    return samples * (4 * channels + 3) * item + batch * queries * heads * channels * item


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` for tensors of ``nbytes`` (read + write counted), best of ``repeats``."""
    src = torch.ones(max(1, nbytes // 4), device=device)
    dst = torch.empty_like(src)
    copies = max(1, (256 * 2**20) // nbytes)  # small tensors: copy again and again, about 256 MiB in all

    def run():
        for _ in range(copies):
            dst.copy_(src)

    best, _ = _timed(run, device, repeats)
    return 2 * src.numel() * 4 * copies / (best * 1e-3) / 1e9


def float64_error(backend: str, case_inputs: tuple, shapes_list: list) -> float:
    """Largest |forward(backend, inputs) - pytorch(inputs in float64)| on the same (cast) inputs."""
    value, shapes, starts, locations, weights = case_inputs
    with torch.no_grad():
        out = ms_deform_attn(value, shapes, starts, locations, weights, spatial_shapes_list=shapes_list,
                             backend=backend)
        exact = ms_deform_attn_pytorch(value.double(), shapes, locations.double(), weights.double())
    return (out.double() - exact).abs().max().item()


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


def measure(backend: str, case: str, device: torch.device, repeats: int, dtype_name: str = 'float32',
            image_hw: tuple[int, int] = IMAGE_HW) -> dict:
    """Forward and forward+backward best and median ms, peak extra memory (MiB), self-check ms, the error against
    float64 and the forward's effective bandwidth of one backend on one case, with inputs of dtype `dtype_name`."""
    dtype = DTYPES[dtype_name]
    value, shapes, starts, locations, weights = (t.to(dtype) if t.is_floating_point() else t
                                                 for t in make_case(case, device, image_hw=image_hw))
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
    fwd_best, fwd = _timed(forward, device, repeats)
    fwd_bwd_best, fwd_bwd = _timed(forward_backward, device, repeats)
    if device.type == 'cuda':
        peak_mib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    label = backend if ran == backend else f'{backend} (ran {ran})'
    error = float64_error(backend, (value, shapes, starts, locations, weights), shapes_list)
    return {'backend': label, 'case': case, 'dtype': dtype_name, 'fwd_ms': fwd, 'fwd_bwd_ms': fwd_bwd,
            'fwd_best_ms': fwd_best, 'fwd_bwd_best_ms': fwd_bwd_best, 'peak_mib': peak_mib,
            'queries': int(locations.shape[1]), 'self_check_ms': check_ms, 'float64_error': error,
            'gb_per_s': traffic_bytes(value, locations) / (fwd_best * 1e-3) / 1e9,
            'value_bytes': value.numel() * value.element_size()}


def _measure_in_fresh_process(backend: str, case: str, dtype_name: str, threads: int, repeats: int,
                              image_size: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), '--worker', backend, case, dtype_name, '--threads',
               str(threads), '--repeats', str(repeats), '--image-size', image_size]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench_msda: measuring backend '{backend}' on case '{case}' failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], threads: int | None, device: torch.device, image_hw: tuple[int, int],
          bandwidth: dict[str, float]) -> str:
    """The Markdown table of ``rows`` (``measure`` results), ratios against the pytorch row of the same case."""
    reference = {(r['case'], r['dtype']): r for r in rows if r['backend'] == 'pytorch'}
    where = f'{threads} CPU threads' if device.type == 'cpu' else torch.cuda.get_device_name(device)
    num_value = sum(max(1, image_hw[0] // s) * max(1, image_hw[1] // s) for s in STRIDES)
    lines = [f'MSDeformAttn backends on {device.type} ({where}); image {image_hw[0]}x{image_hw[1]}: N=2, M=8, D=32, '
             f'L=4, P=4, S={num_value}; best and median of the timed calls; ratios of the best times',
             '',
             '| backend | case | dtype | Lq | fwd ms best / median | fwd+bwd ms best / median | fwd ratio | '
             'fwd+bwd ratio | max error vs float64 | fwd GB/s | peak extra memory MiB | self-check ms |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        ref = reference.get((r['case'], r['dtype']))
        fwd_ratio = f"{ref['fwd_best_ms'] / r['fwd_best_ms']:.1f}x" if ref else '-'
        bwd_ratio = f"{ref['fwd_bwd_best_ms'] / r['fwd_bwd_best_ms']:.1f}x" if ref else '-'
        check = '-' if r['self_check_ms'] != r['self_check_ms'] else f"{r['self_check_ms']:.1f}"
        lines.append(f"| {r['backend']} | {r['case']} | {r['dtype']} | {r['queries']} | "
                     f"{r['fwd_best_ms']:.1f} / {r['fwd_ms']:.1f} | "
                     f"{r['fwd_bwd_best_ms']:.1f} / {r['fwd_bwd_ms']:.1f} | "
                     f"{fwd_ratio} | {bwd_ratio} | {r['float64_error']:.1e} | {r['gb_per_s']:.1f} | "
                     f"{r['peak_mib']:.0f} | {check} |")
    lines += ['', 'Copy bandwidth in the same run (`dst.copy_(src)`, read + write, best of 5): '
              + '; '.join(f'{name} {gbs:.1f} GB/s' for name, gbs in bandwidth.items())
              + '. The forward GB/s counts 4 taps of D values per sample (see `traffic_bytes`); where it exceeds the '
              'memory copy, the taps come from the caches.']
    return '\n'.join(lines)


def parse_image_size(text: str) -> tuple[int, int]:
    """'512x640' -> (512, 640), height first."""
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected HEIGHTxWIDTH such as 512x640, got {text!r}') from None
    if height < 8 or width < 8:
        raise argparse.ArgumentTypeError(f'{text!r}: the image needs at least 8x8 px (stride 8)')
    return height, width


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('tools/bench_msda.py', description='Time the MSDeformAttn backends against the '
                                                                'pytorch path.')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--backends', nargs='+', default=None,
                        help='default: pytorch and cpu on cpu; pytorch, cuda and triton on cuda')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--dtypes', nargs='+', default=['float32'], choices=list(DTYPES),
                        help='input dtypes (float16 / bfloat16 inputs are computed in fp32)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (CPU device)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--image-size', type=parse_image_size, default=IMAGE_HW, metavar='HxW',
                        help='image whose feature maps are the values (default 512x640)')
    parser.add_argument('--output', type=Path, default=None,
                        help=f'markdown file for the table (default for cpu: {DEFAULT_OUTPUT.relative_to(ROOT)}); '
                             "'-' to print only")
    parser.add_argument('--worker', nargs=3, metavar=('BACKEND', 'CASE', 'DTYPE'), help=argparse.SUPPRESS)
    return parser


def run(args, argv: list[str]) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = f'{args.image_size[0]}x{args.image_size[1]}'
    if args.worker:
        backend, case, dtype_name = args.worker
        print(json.dumps(measure(backend, case, device, args.repeats, dtype_name, args.image_size)))
        return
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError('tools/bench_msda.py --device cuda: no CUDA device is visible; run it on a GPU machine')
    backends = args.backends or DEFAULT_BACKENDS[device.type]
    rows = []
    for dtype_name in args.dtypes:
        for case in args.cases:
            for backend in backends:
                if device.type == 'cpu':
                    row = _measure_in_fresh_process(backend, case, dtype_name, args.threads, args.repeats, size)
                else:
                    row = measure(backend, case, device, args.repeats, dtype_name, args.image_size)
                rows.append(row)
                print(f"{backend:8s} {case:8s} {dtype_name:8s} fwd {row['fwd_best_ms']:9.1f} ms   "
                      f"fwd+bwd {row['fwd_bwd_best_ms']:9.1f} ms (best)   self-check {row['self_check_ms']:.1f} ms",
                      flush=True)
    value_bytes = max(r['value_bytes'] for r in rows)
    bandwidth = {'memory (512 MiB tensor)': copy_bandwidth(device, 512 * 2**20),
                 f'cache-sized ({value_bytes / 2**20:.1f} MiB, the size of value)': copy_bandwidth(device, value_bytes)}
    text = table(rows, args.threads if device.type == 'cpu' else None, device, args.image_size, bandwidth)
    output = args.output if args.output is not None else (DEFAULT_OUTPUT if device.type == 'cpu' else None)
    body = (f'Written by `{command_line("tools/bench_msda.py", argv)}` on '
            f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.\n\nMachine: '
            f'{machine_description(args.threads if device.type == "cpu" else torch.get_num_threads())}; '
            f'1-minute load average at the end {os.getloadavg()[0]:.1f} (above the core count, other work shared the '
            'cores: absolute times are then inflated; the ratios compare backends on the same inputs).\n\n' + text)
    write_page(None if output is None or str(output) == '-' else str(output), f'MSDeformAttn benchmark ({device.type})',
               body)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(get_args_parser(), lambda args: run(args, argv), argv)


if __name__ == '__main__':
    sys.exit(main())
