"""CPU benchmarks of whole models: inference latency, its split and memory (``e2e``); training steps (``train-step``).

    python tools/benchmark.py e2e [--models tiny r50 swinl] [--height 512 --width 640] [--warmup 1 --repeats 3]
                                  [--threads N] [--out docs/benchmarks/e2e_cpu.md]
    python tools/benchmark.py train-step --coco_path DATA [--config config/DINO/CAFF_tiny.py] [--checkpoint CKPT]
                                  [--warmup 2 --steps 10] [--threads N] [--out PAGE]

Not in the reference. The table is printed with the machine (CPU, cores, torch threads, load average) and the
command line that produced it (``tools/bench_page.py``); ``--out`` writes the same as a Markdown page. The other
benchmarks have their own tools: ``tools/bench_msda.py`` (MSDeformAttn backends), ``tools/fusion_study.py``
(fusion types and missing-modality robustness, trained on synthetic data), ``tools/profile_fusion.py`` (FLOPs and
time of the fusion per level).

``e2e`` measures, for each model, one inference forward of a batch of one random RGB/IR pair of ``--height`` x
``--width`` (no resize, no post-processing) with random weights, in a fresh subprocess per model (``--single``),
so that peak memory is that model's alone:
- latency: median (and minimum) wall time of ``--repeats`` forwards after ``--warmup`` ones;
- split: ``tools/profile_fusion.PartTimer`` times both backbones (incl. their position encodings), the fusion
  modules (``conv_corr``, ``redim_corr`` at every level, the parts listed by ``tools/profile_fusion.py``) and the
  transformer; what is left of the forward (input projections, extra levels, prediction heads) is counted with the
  transformer;
- memory: resident set size (RSS) after building the model, and the peak RSS during the forwards. On Linux the
  peak is reset after the build (``/proc/self/clear_refs``) and read from ``VmHWM``, so it is the peak of
  inference alone; elsewhere it is ``getrusage`` ``ru_maxrss``, which includes the build.
The deformable attention uses the ``--msda-backend`` path (default ``pytorch``: nothing is compiled).

``train-step`` times what ``engine.train_one_epoch`` does per batch (forward, loss, backward, gradient clipping,
AdamW step) on batches of the config's train split, median (min) of ``--steps`` after ``--warmup``. Each row is
a fresh subprocess: with fresh weights and, given ``--checkpoint``, with its weights and optimizer state; each
with subnormal floats kept and flushed (``util.device.set_flush_denormal``, which must precede the first kernel
of a process). A trained model's gradients hold subnormals, which x86 cores compute on 10-100x slower.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/benchmark.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tools.bench_page import command_line, machine_description, write_page
from tools.profile_fusion import PartTimer, fusion_parts
from util.cli import ArgumentParser, run_command
from util.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    'tiny': 'config/DINO/CAFF_tiny.py',
    'r50': 'config/DINO/DINO_4scale.py',
    'swinl': 'config/DINO/DINO_5scale_swin.py',
}
MODEL_LABELS = {'tiny': 'CAFF tiny (R18, d=64, 2+2 layers)', 'r50': 'CAFF-DINO 4-scale R50',
                'swinl': 'CAFF-DINO 5-scale Swin-L'}
MB = 2 ** 20
# Sub-commands this tool used to have, and where they are now.
MOVED = {'msda': 'python tools/bench_msda.py (same arguments)',
         'fusion-study': 'python tools/fusion_study.py (--rows TYPE[:DROPOUT] and --seeds; see its --help)'}


class BenchmarkError(UserError):
    """A benchmark that cannot run as asked (failed subprocess, unreadable results)."""


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB from ``/proc/self/status`` (None off Linux)."""
    try:
        with open('/proc/self/status', encoding='utf-8') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False when that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w', encoding='utf-8') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource
    scale = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def part_groups(model) -> dict[str, list[torch.nn.Module]]:
    """Both backbones and the fusion modules of a CAFFDINO, from the part list of ``tools/profile_fusion.py``."""
    groups = {'backbones': [], 'fusion': []}
    for name, module in fusion_parts(model).items():
        if name.startswith('backbone'):
            groups['backbones'].append(module)
        elif name.startswith(('conv_corr', 'redim_corr')):
            groups['fusion'].append(module)
    return groups


def measure_model(config: str, height: int, width: int, warmup: int, repeats: int,
                  options: list[str]) -> dict:
    """Latency, its split and memory of one model in this process (see the module docstring).

    Returns ``{'config', 'params', 'rss_built_mb', 'peak_mb', 'peak_method', 'total': [s per repeat],
    'backbones' | 'fusion' | 'transformer': [s per repeat]}``; 'transformer' includes the rest of the forward.
    """
    from models import build_model
    from util.config import load_config
    from util.misc import NestedTensor

    cfg = load_config(REPO_ROOT / config if not os.path.isabs(config) else config, options)
    torch.manual_seed(0)
    model = build_model(cfg)[0].eval()
    params = sum(p.numel() for p in model.parameters())
    timer = PartTimer(part_groups(model))
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    rgb = NestedTensor(torch.randn(1, 3, height, width, generator=generator), mask)
    ir = NestedTensor(torch.randn(1, 3, height, width, generator=generator), mask)
    rss_built = _status_mb('VmRSS')
    peak_reset = _reset_peak_rss() and _status_mb('VmHWM') is not None
    runs = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            model(rgb, ir)
            total = time.perf_counter() - start
            parts = timer.take()
            if index >= warmup:
                # The transformer column takes what no hook saw (input projections, extra levels, heads).
                runs.append({'total': total, **parts,
                             'transformer': total - parts['backbones'] - parts['fusion']})
    peak = _status_mb('VmHWM') if peak_reset else _maxrss_mb()
    result = {'config': config, 'params': params, 'rss_built_mb': rss_built if rss_built is not None else float('nan'),
              'peak_mb': peak, 'peak_method': 'VmHWM after build' if peak_reset else 'ru_maxrss (incl. build)'}
    for key in ('total', 'backbones', 'fusion', 'transformer'):
        result[key] = [run[key] for run in runs]
    return result


def _single_run(cmd: list[str], what: str) -> dict:
    """Run one ``--single`` measurement in a fresh process; its last stdout line is the JSON result. A failure is
    a ``BenchmarkError`` naming ``what`` with the child's one-line error."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines()[-1:] or ['no output'])[0].removeprefix('error: ')
        raise BenchmarkError(f'{what} failed with exit status {proc.returncode}: {tail}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _e2e_subprocess(name: str, args: argparse.Namespace) -> dict:
    config = MODELS.get(name, name)
    cmd = [sys.executable, str(REPO_ROOT / 'tools' / 'benchmark.py'), 'e2e', '--single', config,
           '--height', str(args.height), '--width', str(args.width), '--warmup', str(args.warmup),
           '--repeats', str(args.repeats), '--threads', str(args.threads), '--msda-backend', args.msda_backend]
    if args.options:
        cmd += ['--options', *args.options]
    print(f'e2e: {name} ({config}) ...', file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = _single_run(cmd, f'e2e: measuring {name} ({config})')
    print(f'e2e: {name} done in {time.perf_counter() - started:.0f} s', file=sys.stderr, flush=True)
    return result


def e2e_table(results: dict[str, dict]) -> str:
    def ms(values):
        return f'{1000 * statistics.median(values):,.0f}'

    lines = ['| model | params | latency ms, median (min) | backbones ms | fusion ms | transformer + heads ms '
             '| fusion share | RSS after build MiB | peak RSS in inference MiB | inference increase MiB |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for name, r in results.items():
        share = statistics.median(r['fusion']) / statistics.median(r['total'])
        lines.append(f'| {MODEL_LABELS.get(name, name)} (`{r["config"]}`) | {r["params"] / 1e6:.1f} M '
                     f'| {ms(r["total"])} ({1000 * min(r["total"]):,.0f}) | {ms(r["backbones"])} '
                     f'| {ms(r["fusion"])} | {ms(r["transformer"])} | {100 * share:.1f} % '
                     f'| {r["rss_built_mb"]:,.0f} | {r["peak_mb"]:,.0f} '
                     f'| {r["peak_mb"] - r["rss_built_mb"]:,.0f} |')
    return '\n'.join(lines)


def run_e2e(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    options = [f'msda_backend={args.msda_backend}', *args.options]
    if args.single:
        result = measure_model(args.single, args.height, args.width, args.warmup, args.repeats, options)
        print(json.dumps(result))
        return
    machine = machine_description(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {name: _e2e_subprocess(name, args) for name in args.models}
    methods = sorted({r['peak_method'] for r in results.values()})
    body = '\n'.join([
        f'Measured {started:%Y-%m-%d %H:%M} UTC with `{command_line("tools/benchmark.py", args.argv)}`.', '',
        f'Machine: {machine}.', '',
        f'Input: one random RGB/IR pair of {args.width} x {args.height} (W x H), batch 1, no resize, random '
        f'weights, inference forward (`torch.inference_mode`), post-processing not included. '
        f'{args.warmup} warm-up + {args.repeats} timed forwards per model, each model in its own process. '
        f'MSDeformAttn backend: `{args.msda_backend}`.'
        + (f' Config overrides for every model: `{" ".join(args.options)}`.' if args.options else ''), '',
        e2e_table(results), '',
        'Backbones: both backbones with their position encodings. Fusion: `conv_corr` + `redim_corr` at every '
        'level. Transformer + heads: the rest of the forward (input projections, extra levels, encoder, decoder, '
        f'heads). Peak memory method: {", ".join(methods)}.',
    ])
    write_page(args.out, 'End-to-end CPU inference', body)


# ------------------------------------------------------------------------------------------------ train-step

def measure_train_steps(config: str, coco_path: str, checkpoint: str | None, flush: bool, warmup: int, steps: int,
                        options: list[str]) -> dict:
    """Seconds per training step in this process (see the module docstring): ``{'steps': [s, ...], 'flushed'}``.

    The subnormal mode is set first, before any kernel starts torch's threads (they inherit it).
    """
    from util.device import set_flush_denormal
    flushed = set_flush_denormal(flush) and flush
    from torch.utils.data import DataLoader

    from datasets import build_dataset
    from engine import weighted_loss
    from models import build_model
    from util.checkpoint import load_checkpoint
    from util.config import load_config
    from util.misc import collate_fn
    from util.optim import build_adamw, param_groups

    cfg = load_config(REPO_ROOT / config if not os.path.isabs(config) else config,
                      [f'coco_path={coco_path!r}', *options])
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    optimizer = build_adamw(param_groups(model, cfg.lr, cfg.lr_backbone, set()), cfg.lr, cfg.weight_decay)
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state['model'])
        if 'optimizer' in state:
            optimizer.load_state_dict(state['optimizer'])
    loader = DataLoader(build_dataset('train', cfg), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))
    if len(loader) == 0:
        raise BenchmarkError(f'the train split of {coco_path} has fewer pairs than one batch '
                             f'(batch_size={cfg.batch_size}); lower it with --options batch_size=N')
    model.train()
    criterion.train()
    times: list[float] = []
    batches = iter(())
    while len(times) < warmup + steps:
        try:
            rgb, ir, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        start = time.perf_counter()
        loss = weighted_loss(criterion(model(rgb, ir, targets), targets), criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {'steps': times[warmup:], 'flushed': flushed}


def _train_step_subprocess(args: argparse.Namespace, weights: str | None, flush: bool) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / 'tools' / 'benchmark.py'), 'train-step', '--single',
           '--config', args.config, '--coco_path', args.coco_path, '--flush', str(int(flush)),
           '--warmup', str(args.warmup), '--steps', str(args.steps), '--threads', str(args.threads)]
    if weights:
        cmd += ['--checkpoint', weights]
    if args.options:
        cmd += ['--options', *args.options]
    label = f'{"fresh weights" if weights is None else weights}, subnormals {"flushed" if flush else "kept"}'
    print(f'train-step: {label} ...', file=sys.stderr, flush=True)
    return _single_run(cmd, f'train-step: measuring {label}')


def train_step_table(rows: dict[str, dict[bool, dict]]) -> str:
    """``rows[weights][flush]`` -> Markdown: median (min) seconds per step, kept and flushed, and their ratio."""
    def cell(result):
        return f'{statistics.median(result["steps"]):.3f} ({min(result["steps"]):.3f})'

    lines = ['| weights | subnormals kept, s/step median (min) | flushed, s/step median (min) | kept / flushed |',
             '|---|---:|---:|---:|']
    for weights, by_flush in rows.items():
        kept, flushed = by_flush[False], by_flush[True]
        ratio = statistics.median(kept['steps']) / statistics.median(flushed['steps'])
        note = '' if flushed['flushed'] else ' (this CPU cannot flush)'
        lines.append(f'| {weights} | {cell(kept)} | {cell(flushed)}{note} | {ratio:.2f}x |')
    return '\n'.join(lines)


def run_train_step(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(measure_train_steps(args.config, args.coco_path, args.checkpoint, bool(args.flush),
                                             args.warmup, args.steps, args.options)))
        return
    machine = machine_description(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = {}
    for weights in [None] + ([args.checkpoint] if args.checkpoint else []):
        label = 'fresh (seed 0)' if weights is None else f'`{weights}` (weights and AdamW state)'
        rows[label] = {flush: _train_step_subprocess(args, weights, flush) for flush in (False, True)}
    body = '\n'.join([
        f'Measured {started:%Y-%m-%d %H:%M} UTC with `{command_line("tools/benchmark.py", args.argv)}`.', '',
        f'Machine: {machine}.', '',
        f'One training step of `{args.config}` (forward, loss, backward, gradient clipping, AdamW) on batches of '
        f'the train split of `{args.coco_path}`: {args.warmup} warm-up + {args.steps} timed steps per row, each '
        'in its own process.' + (f' Config overrides: `{" ".join(args.options)}`.' if args.options else ''), '',
        train_step_table(rows),
    ])
    write_page(args.out, 'CPU training step: subnormal floats kept and flushed', body)


# ---------------------------------------------------------------------------------------------------- the CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('tools/benchmark.py', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    e2e = sub.add_parser('e2e', help='end-to-end CPU inference latency, its split, and memory per model')
    e2e.add_argument('--models', nargs='+', default=list(MODELS),
                     help=f'names ({", ".join(MODELS)}) or config files; default: all three')
    e2e.add_argument('--height', type=int, default=512)
    e2e.add_argument('--width', type=int, default=640)
    e2e.add_argument('--warmup', type=int, default=1, help='untimed forwards first (default 1)')
    e2e.add_argument('--repeats', type=int, default=3, help='timed forwards (default 3)')
    e2e.add_argument('--threads', type=int, default=torch.get_num_threads(),
                     help=f'torch CPU threads (default here: {torch.get_num_threads()})')
    e2e.add_argument('--msda-backend', default='pytorch', help="'pytorch' (default), 'cpu' (compiled) or 'auto'")
    e2e.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE', help='config overrides for every model')
    e2e.add_argument('--out', help='also write the Markdown page here, e.g. docs/benchmarks/e2e_cpu.md')
    e2e.add_argument('--single', metavar='CONFIG', help='measure this config in this process; print one JSON line')
    step = sub.add_parser('train-step', help='CPU training-step time, fresh and trained weights, subnormals kept '
                                             'and flushed')
    step.add_argument('--config', default=MODELS['tiny'], help=f'config file (default {MODELS["tiny"]})')
    step.add_argument('--coco_path', required=True, help='data set root whose train split supplies the batches')
    step.add_argument('--checkpoint', help='also time from this checkpoint (e.g. a finished run\'s checkpoint.pth)')
    step.add_argument('--warmup', type=int, default=2, help='untimed steps first (default 2)')
    step.add_argument('--steps', type=int, default=10, help='timed steps (default 10)')
    step.add_argument('--threads', type=int, default=torch.get_num_threads(),
                      help=f'torch CPU threads (default here: {torch.get_num_threads()})')
    step.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE', help='config overrides')
    step.add_argument('--out', help='also write the Markdown page here')
    step.add_argument('--single', action='store_true', help='one row in this process; print one JSON line')
    step.add_argument('--flush', type=int, choices=(0, 1), default=1, help='with --single: flush subnormals (1)')

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:
        print(f'error: `tools/benchmark.py {argv[0]}` is now `{MOVED[argv[0]]}`', file=sys.stderr)
        return 2
    def run(args):
        args.argv = argv
        (run_e2e if args.command == 'e2e' else run_train_step)(args)

    return run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
