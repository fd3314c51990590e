"""Benchmark suite: MSDeformAttn backends, end-to-end CPU inference, and the fusion study on synthetic data.

    python tools/benchmark.py msda [ARGS of tools/bench_msda.py]
    python tools/benchmark.py e2e [--models tiny r50 swinl] [--height 512 --width 640] [--warmup 1 --repeats 3]
                                  [--threads N] [--out docs/benchmarks/e2e_cpu.md]
    python tools/benchmark.py fusion-study [--fusion-types caff concat add rgb_only ir_only] [--epochs 12]
                                  [--train-pairs 200 --val-pairs 50] [--seed 42] [--threads N]
                                  [--work-dir outputs/fusion_study] [--out docs/benchmarks/fusion_study.md]

Not in the reference. Every table is printed with the machine (CPU, cores, torch threads, load average) and the
command line that produced it; ``--out`` writes the same as a Markdown page.

``msda`` runs the backend table of ``tools/bench_msda.py`` (the op's own benchmark; nothing is duplicated here).

``e2e`` measures, for each model, one inference forward of a batch of one random RGB/IR pair of ``--height`` x
``--width`` (no resize, no post-processing) with random weights, in a fresh subprocess per model (``--single``),
so that peak memory is that model's alone:
- latency: median (and minimum) wall time of ``--repeats`` forwards after ``--warmup`` ones;
- split: forward hooks time both backbones (incl. their position encodings), the fusion modules (``conv_corr``,
  ``redim_corr`` at every level, the parts listed by ``tools/profile_fusion.py``) and the transformer; what is
  left of the forward (input projections, extra levels, prediction heads) is counted with the transformer;
- memory: resident set size (RSS) after building the model, and the peak RSS during the forwards. On Linux the
  peak is reset after the build (``/proc/self/clear_refs``) and read from ``VmHWM``, so it is the peak of
  inference alone; elsewhere it is ``getrusage`` ``ru_maxrss``, which includes the build.
The deformable attention uses the ``--msda-backend`` path (default ``pytorch``: nothing is compiled).

``fusion-study`` trains ``config/DINO/CAFF_tiny.py`` once per fusion type through ``main.py`` (a subprocess each,
same data, epochs, seed and every other key) on the synthetic data set (``datasets/synthetic.py``, generated into
the work dir when absent), then reads each run's ``log.txt`` and last detections. Table: AP / AP50 / AP75 after
the last epoch, the best AP and its epoch, and recall at IoU 0.5 (detections of score >= ``--score-threshold``,
matched one-to-one per class in score order) split by the objects' ``visibility`` in the synthetic annotations:
``both`` (visible in both images), ``rgb`` (RGB only), ``ir`` (thermal only). A run already complete in the work
dir is reused; an interrupted one is resumed from its ``checkpoint.pth``.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/benchmark.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    'tiny': 'config/DINO/CAFF_tiny.py',
    'r50': 'config/DINO/DINO_4scale.py',
    'swinl': 'config/DINO/DINO_5scale_swin.py',
}
MODEL_LABELS = {'tiny': 'CAFF tiny (R18, d=64, 2+2 layers)', 'r50': 'CAFF-DINO 4-scale R50',
                'swinl': 'CAFF-DINO 5-scale Swin-L'}
FUSION_TYPES = ('caff', 'concat', 'add', 'rgb_only', 'ir_only')
VISIBILITIES = ('both', 'rgb', 'ir')
STUDY_CONFIG = 'config/DINO/CAFF_tiny.py'
MB = 2 ** 20


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run as asked (missing tool, failed subprocess, unreadable results)."""


# ---------------------------------------------------------------------------------------------------- machine

def machine_description(threads: int) -> str:
    """One line: CPU model, cores visible to this process, torch threads, load average, torch and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    load = ', '.join(f'{v:.1f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    return (f'{cpu}; {cores} cores available ({os.cpu_count()} in the machine); torch threads {threads}; '
            f'load average at start {load}; torch {torch.__version__}; Python {platform.python_version()}')


def command_line(argv: list[str]) -> str:
    return 'python tools/benchmark.py ' + ' '.join(shlex.quote(a) for a in argv)


def write_page(path: str | None, title: str, body: str) -> None:
    text = f'# {title}\n\n{body}\n'
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding='utf-8')
        print(f'written: {path}', file=sys.stderr)


# ------------------------------------------------------------------------------------------------------- msda

def run_msda(argv: list[str]) -> None:
    """The backend table of ``tools/bench_msda.py`` with ``argv`` passed through."""
    try:
        from tools import bench_msda
    except ModuleNotFoundError as e:
        raise BenchmarkError(f'tools/bench_msda.py cannot be imported ({e}); it holds the MSDeformAttn backend '
                             'benchmark this sub-command runs') from None
    bench_msda.main(argv)


# -------------------------------------------------------------------------------------------------------- e2e

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


class PartTimer:
    """Wall time per forward of groups of sub-modules, measured with forward pre-/post-hooks.

    ``groups``: ``{group: [module, ...]}``. After each forward, ``take()`` returns ``{group: seconds}`` summed
    over the calls of that forward and clears the record.
    """

    def __init__(self, groups: dict[str, list[torch.nn.Module]]):
        self._spent = {group: 0.0 for group in groups}
        self._started = {}
        for group, modules in groups.items():
            for module in modules:
                module.register_forward_pre_hook(self._pre_hook(module))
                module.register_forward_hook(self._post_hook(module, group))

    def _pre_hook(self, module):
        def hook(_module, _args):
            self._started[id(module)] = time.perf_counter()
        return hook

    def _post_hook(self, module, group):
        def hook(_module, _args, _output):
            self._spent[group] += time.perf_counter() - self._started.pop(id(module))
        return hook

    def take(self) -> dict[str, float]:
        spent = dict(self._spent)
        self._spent = dict.fromkeys(self._spent, 0.0)
        return spent


def part_groups(model) -> dict[str, list[torch.nn.Module]]:
    """Both backbones and the fusion modules of a CAFFDINO, from the part list of ``tools/profile_fusion.py``."""
    from tools.profile_fusion import fusion_parts
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


def _e2e_subprocess(name: str, args: argparse.Namespace) -> dict:
    config = MODELS.get(name, name)
    cmd = [sys.executable, str(REPO_ROOT / 'tools' / 'benchmark.py'), 'e2e', '--single', config,
           '--height', str(args.height), '--width', str(args.width), '--warmup', str(args.warmup),
           '--repeats', str(args.repeats), '--threads', str(args.threads), '--msda-backend', args.msda_backend]
    if args.options:
        cmd += ['--options', *args.options]
    print(f'e2e: {name} ({config}) ...', file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ['no output']
        raise BenchmarkError(f'e2e: measuring {name} ({config}) failed with exit status {proc.returncode}: {tail[0]}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
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
        f'Measured {started:%Y-%m-%d %H:%M} UTC with `{command_line(args.argv)}`.', '',
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


# ----------------------------------------------------------------------------------------------- fusion study

def ensure_synthetic_data(root: Path, train_pairs: int, val_pairs: int, seed: int) -> Path:
    """The synthetic data set in ``root``, generated there unless both annotation files exist."""
    annotations = root / 'coco_annotations'
    if not ((annotations / 'LLVIP_train.json').is_file() and (annotations / 'LLVIP_test.json').is_file()):
        from datasets.synthetic import generate_synthetic_dataset
        print(f'fusion-study: generating {train_pairs} + {val_pairs} synthetic pairs into {root}', file=sys.stderr)
        generate_synthetic_dataset(str(root), num_train=train_pairs, num_val=val_pairs, seed=seed)
    return root


def _completed_epochs(log_path: Path) -> list[dict]:
    from tools.plot_logs import read_log
    if not log_path.is_file():
        return []
    return [r for r in read_log(log_path) if 'epoch' in r and 'test_coco_eval_bbox' in r]


def run_name(fusion_type: str, data: Path, args: argparse.Namespace) -> str:
    """Output folder name of one run: everything that changes its result is in it, so reuse is safe."""
    setup = ' '.join([args.config, args.device, *args.options])
    return (f'{fusion_type}_e{args.epochs}_seed{args.seed}_{data.name}_'
            f'{hashlib.sha1(setup.encode()).hexdigest()[:8]}')


def train_fusion_type(fusion_type: str, data: Path, out: Path, args: argparse.Namespace) -> float:
    """Train one fusion type through ``main.py`` into ``out`` (reused or resumed); returns the seconds spent."""
    if len(_completed_epochs(out / 'log.txt')) >= args.epochs:
        print(f'fusion-study: {fusion_type}: {args.epochs} epochs already in {out}, reused', file=sys.stderr)
        return float('nan')
    cmd = [sys.executable, str(REPO_ROOT / 'main.py'), '-c', str(REPO_ROOT / args.config), '--dataset_file',
           'synthetic', '--coco_path', str(data), '--output_dir', str(out), '--seed', str(args.seed),
           '--device', args.device, '--num_workers', '0', '--options', f'fusion_type={fusion_type}',
           f'epochs={args.epochs}', 'save_checkpoint_interval=0', *args.options]
    if (out / 'checkpoint.pth').is_file():
        cmd += ['--resume', str(out / 'checkpoint.pth')]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out.mkdir(parents=True, exist_ok=True)
    print(f'fusion-study: {fusion_type}: training ({" ".join(shlex.quote(c) for c in cmd)})', file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    with open(out / 'stdout.txt', 'a', encoding='utf-8') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchmarkError(f'fusion-study: training {fusion_type} failed (exit status {proc.returncode}); '
                             f'see {out / "stdout.txt"}')
    print(f'fusion-study: {fusion_type}: done in {seconds / 60:.1f} min', file=sys.stderr, flush=True)
    return seconds


def recall_by_visibility(gt: dict, detections: list[dict], score_threshold: float,
                         iou_threshold: float = 0.5) -> dict[str, tuple[int, int]]:
    """``{visibility: (found, total)}`` over the non-crowd ground-truth boxes of ``gt`` (a COCO dict).

    Per image and class, detections of score >= ``score_threshold`` are taken in descending score and each
    matches the unmatched ground-truth box of highest IoU if that IoU >= ``iou_threshold`` (COCO's greedy rule).
    """
    from util.box_ops import box_iou

    def xyxy(boxes):
        t = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        return torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1)

    gt_by_key, det_by_key = {}, {}
    for ann in gt['annotations']:
        if not ann.get('iscrowd', 0):
            gt_by_key.setdefault((ann['image_id'], ann['category_id']), []).append(ann)
    for det in detections:
        if det['score'] >= score_threshold:
            det_by_key.setdefault((det['image_id'], det['category_id']), []).append(det)
    found = dict.fromkeys(VISIBILITIES, 0)
    total = dict.fromkeys(VISIBILITIES, 0)
    for key, anns in gt_by_key.items():
        for ann in anns:
            total[ann.get('visibility', 'both')] += 1
        dets = sorted(det_by_key.get(key, []), key=lambda d: -d['score'])
        if not dets:
            continue
        iou = box_iou(xyxy([d['bbox'] for d in dets]), xyxy([a['bbox'] for a in anns]))[0]
        matched = torch.zeros(len(anns), dtype=torch.bool)
        for row in iou:
            row = row.masked_fill(matched, -1.0)
            best = int(row.argmax())
            if row[best] >= iou_threshold:
                matched[best] = True
                found[anns[best].get('visibility', 'both')] += 1
    return {v: (found[v], total[v]) for v in VISIBILITIES}


def study_row(fusion_type: str, out: Path, gt: dict, score_threshold: float, seconds: float) -> dict:
    records = _completed_epochs(out / 'log.txt')
    if not records:
        raise BenchmarkError(f'fusion-study: {out / "log.txt"} holds no evaluated epoch')
    last = records[-1]
    best = max(records, key=lambda r: r['test_coco_eval_bbox'][0])
    detections_path = out / 'detections_bbox.json'
    detections = json.loads(detections_path.read_text()) if detections_path.is_file() else []
    return {'fusion_type': fusion_type, 'ap': last['test_coco_eval_bbox'][:3],
            'best_ap': best['test_coco_eval_bbox'][0], 'best_epoch': best['epoch'],
            'recall': recall_by_visibility(gt, detections, score_threshold), 'seconds': seconds}


def study_table(rows: list[dict]) -> str:
    def pct(found_total):
        found, total = found_total
        return f'{100 * found / total:.0f} % ({found}/{total})' if total else 'n/a'

    lines = ['| fusion_type | AP | AP50 | AP75 | best AP (epoch) | recall, in both | recall, RGB-only objects '
             '| recall, IR-only objects | train time |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        ap, ap50, ap75 = (100 * v for v in r['ap'])
        minutes = 'reused' if r['seconds'] != r['seconds'] else f'{r["seconds"] / 60:.1f} min'
        lines.append(f'| `{r["fusion_type"]}` | {ap:.1f} | {ap50:.1f} | {ap75:.1f} | {100 * r["best_ap"]:.1f} '
                     f'({r["best_epoch"]}) | {pct(r["recall"]["both"])} | {pct(r["recall"]["rgb"])} '
                     f'| {pct(r["recall"]["ir"])} | {minutes} |')
    return '\n'.join(lines)


def study_verdict(rows: list[dict]) -> str:
    """Whether the best two-stream fusion beats the best single-modality run on AP, from the table's numbers."""
    fused = [r for r in rows if r['fusion_type'] not in ('rgb_only', 'ir_only')]
    single = [r for r in rows if r['fusion_type'] in ('rgb_only', 'ir_only')]
    if not fused or not single:
        return 'Verdict: needs at least one fused and one single-modality run.'
    best_fused = max(fused, key=lambda r: r['ap'][0])
    best_single = max(single, key=lambda r: r['ap'][0])
    gap = 100 * (best_fused['ap'][0] - best_single['ap'][0])
    if gap > 0:
        return (f'Verdict: fusion wins: `{best_fused["fusion_type"]}` AP {100 * best_fused["ap"][0]:.1f} vs the best '
                f'single modality `{best_single["fusion_type"]}` {100 * best_single["ap"][0]:.1f} (+{gap:.1f}).')
    return (f'Verdict: fusion does NOT win at this budget: best fused `{best_fused["fusion_type"]}` AP '
            f'{100 * best_fused["ap"][0]:.1f} vs `{best_single["fusion_type"]}` {100 * best_single["ap"][0]:.1f} '
            f'({gap:.1f}). Check the recall columns: a single-modality run should miss the objects visible only '
            'in the other image; if it does not, the data does not need fusion; if the fused runs miss objects '
            'of both kinds, the model (budget, fusion) is at fault.')


def run_fusion_study(args: argparse.Namespace) -> None:
    machine = machine_description(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(args.work_dir)
    data = ensure_synthetic_data(Path(args.data) if args.data else
                                 work / f'synthetic_{args.train_pairs}_{args.val_pairs}_seed{args.data_seed}',
                                 args.train_pairs, args.val_pairs, args.data_seed)
    gt = json.loads((data / 'coco_annotations' / 'LLVIP_test.json').read_text())
    rows = []
    for fusion_type in args.fusion_types:
        out = work / run_name(fusion_type, data, args)
        seconds = train_fusion_type(fusion_type, data, out, args)
        rows.append(study_row(fusion_type, out, gt, args.score_threshold, seconds))
    counts = recall_by_visibility(gt, [], 1.0)
    objects = ', '.join(f'{v}: {counts[v][1]}' for v in VISIBILITIES)
    extra = f' and `--options {" ".join(args.options)}`' if args.options else ''
    body = '\n'.join([
        f'Measured {started:%Y-%m-%d %H:%M} UTC with `{command_line(args.argv)}`.', '',
        f'Machine: {machine}.', '',
        f'Each row: `{args.config}` trained from scratch by `main.py` with `fusion_type=<row>`{extra}, '
        f'{args.epochs} epoch(s) on {args.device}, seed {args.seed}, on the synthetic data set `{data}` '
        f'({len(gt["images"])} val pairs; val objects by visibility: {objects}). AP / AP50 / AP75 (COCO, %) '
        f'after the last epoch. Recall at IoU 0.5 of detections with score >= {args.score_threshold}, '
        'one-to-one per class.', '',
        study_table(rows), '',
        study_verdict(rows),
    ])
    write_page(args.out, 'Fusion study on the synthetic RGB/IR data set', body)


# ---------------------------------------------------------------------------------------------------- the CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('tools/benchmark.py', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    sub.add_parser('msda', help='MSDeformAttn backend table (tools/bench_msda.py); further arguments go to it',
                   add_help=False)

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

    study = sub.add_parser('fusion-study', help='train every fusion type on synthetic data; AP table')
    study.add_argument('--fusion-types', nargs='+', default=list(FUSION_TYPES), choices=FUSION_TYPES)
    study.add_argument('--epochs', type=int, default=12, help='training epochs per fusion type (default 12)')
    study.add_argument('--train-pairs', type=int, default=200, help='synthetic train pairs (default 200)')
    study.add_argument('--val-pairs', type=int, default=50, help='synthetic val pairs (default 50)')
    study.add_argument('--data-seed', type=int, default=0, help='seed of the synthetic data (default 0)')
    study.add_argument('--data', help='an existing synthetic data root instead of generating one')
    study.add_argument('--seed', type=int, default=42, help='training seed, the same for every run (default 42)')
    study.add_argument('--config', default=STUDY_CONFIG, help=f'model/training config (default {STUDY_CONFIG})')
    study.add_argument('--threads', type=int, default=torch.get_num_threads(),
                       help=f'CPU threads per training run (default here: {torch.get_num_threads()})')
    study.add_argument('--device', default='cpu', help="device of the training runs (default 'cpu')")
    study.add_argument('--score-threshold', type=float, default=0.3, help='for the recall columns (default 0.3)')
    study.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                       help='config overrides for every run, e.g. batch_size=2 lr_drop=8')
    study.add_argument('--work-dir', default='outputs/fusion_study', help='data and runs (default outputs/fusion_study)')
    study.add_argument('--out', help='also write the Markdown page here, e.g. docs/benchmarks/fusion_study.md')
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == 'msda':
        runner = lambda: run_msda(argv[1:])  # noqa: E731  (its arguments belong to tools/bench_msda.py)
    else:
        args = get_args_parser().parse_args(argv)
        args.argv = argv
        runner = {'e2e': lambda: run_e2e(args), 'fusion-study': lambda: run_fusion_study(args)}[args.command]
    try:
        runner()
    except BenchmarkError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
