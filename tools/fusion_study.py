"""Fusion study and missing-modality robustness benchmark: train (fusion_type, modality_dropout) rows on the
synthetic RGB/IR data set and evaluate each with both images, with the RGB image missing and with the IR missing.

    python tools/fusion_study.py [--rows caff caff:0.3 concat concat:0.3 add add:0.3 rgb_only ir_only]
                                 [--seeds 42 43 44] [--missing none rgb ir] [--epochs 5]
                                 [--train-pairs 200 --val-pairs 50] [--threads N] [--jobs N]
                                 [--options lr_drop=4 ...]
                                 [--work-dir outputs/robustness] [--out docs/benchmarks/modality_robustness.md]

Not in the reference. A row is ``FUSION_TYPE[:MODALITY_DROPOUT]``: any fusion type of ``models/fusion.py`` and the
training probability of a missing image (``modality_dropout``, default 0). Every row is trained with the same
budget, data and seeds: ``config/DINO/CAFF_tiny.py`` from scratch by ``main.py`` (one subprocess per row and seed,
``--threads`` torch threads, ``--jobs`` of them at a time, every other key the same, ``--options`` added to all),
on the synthetic data set (``datasets/synthetic.py``, generated into the work dir when absent). The checkpoint
after the last epoch is then evaluated once per ``--missing`` condition (``eval_missing_modality``: 'none', 'rgb',
'ir'), in this process, through the same ``build_dataset`` / ``engine.evaluate`` path as ``main.py --eval``;
with both images ('none') it is the evaluation ``main.py`` itself ran after the last epoch (its ``log.txt`` record
and ``detections_bbox.json``), not run a second time.

The page has, per row and condition, COCO AP / AP50 as mean +- sample standard deviation over the seeds; recall at
IoU 0.5 (detections of score >= ``--score-threshold``, matched one-to-one per class in score order) split by the
objects' ``visibility`` in the synthetic annotations (``both``, ``rgb`` only, ``ir`` only), pooled over seeds; the
ceiling of a detector with one image missing (the objects visible only in the missing image cannot be found); and
the issue-11 targets: with dropout, a fused row with one image missing keeps >= 95 % of the AP50 of the
single-modality row that sees the remaining image, and with both images is within 1 AP50 point of the same fusion
without dropout.

Resumable: a run whose ``log.txt`` holds every epoch is reused, an interrupted one resumed from its
``checkpoint.pth``, and each evaluation is cached in the run folder (``eval_<condition>.json``), so a killed study
restarted with the same command keeps every finished run. The page is rewritten after every run. With
``--finished-only`` nothing is trained: the page is written from the runs of the grid already trained in the work
dir (by earlier or concurrent invocations with the same budget) and names the runs left out.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/fusion_study.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from models.fusion import FUSION_TYPES
from tools.bench_page import command_line, load_average, machine_description, write_page
from util.cli import ArgumentParser, run_command
from util.errors import UsageError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = 'config/DINO/CAFF_tiny.py'
DEFAULT_ROWS = ('caff', 'caff:0.3', 'concat', 'concat:0.3', 'add', 'add:0.3', 'rgb_only', 'ir_only')
CONDITIONS = ('none', 'rgb', 'ir')  # values of eval_missing_modality
CONDITION_LABELS = {'none': 'both images', 'rgb': 'RGB missing', 'ir': 'IR missing'}
VISIBILITIES = ('both', 'rgb', 'ir')
# With an image missing, the single-modality row that sees the image left (issue 11's reference for the target).
SEES_THE_REST = {'rgb': 'ir_only', 'ir': 'rgb_only'}
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's params.recThrs


class StudyError(UserError):
    """A run of the study failed (its own log names the reason) or left no result to read."""


@dataclass(frozen=True)
class Row:
    """One row of the study: a fusion type trained with a modality-dropout probability."""
    fusion_type: str
    dropout: float = 0.0

    @property
    def label(self) -> str:
        return f'`{self.fusion_type}`' + (f', dropout {self.dropout:g}' if self.dropout else '')


def parse_row(text: str) -> Row:
    """``'caff'`` -> Row('caff', 0.0); ``'caff:0.3'`` -> Row('caff', 0.3). Unknown types are a UsageError."""
    name, _, dropout = text.partition(':')
    if name not in FUSION_TYPES:
        raise UsageError(f'--rows {text!r}: unknown fusion type {name!r}; models/fusion.py has '
                         f'{", ".join(FUSION_TYPES)}')
    try:
        p = float(dropout) if dropout else 0.0
    except ValueError:
        raise UsageError(f'--rows {text!r}: the modality dropout after ":" must be a number in [0, 1]') from None
    if not 0.0 <= p <= 1.0:
        raise UsageError(f'--rows {text!r}: the modality dropout after ":" must be a number in [0, 1]')
    return Row(name, p)


# ----------------------------------------------------------------------------------------------- data, training

def ensure_synthetic_data(root: Path, train_pairs: int, val_pairs: int, seed: int) -> Path:
    """The synthetic data set in ``root``, generated there unless both annotation files exist."""
    annotations = root / 'coco_annotations'
    if not ((annotations / 'LLVIP_train.json').is_file() and (annotations / 'LLVIP_test.json').is_file()):
        from datasets.synthetic import generate_synthetic_dataset
        print(f'fusion_study: generating {train_pairs} + {val_pairs} synthetic pairs into {root}', file=sys.stderr)
        generate_synthetic_dataset(str(root), num_train=train_pairs, num_val=val_pairs, seed=seed)
    return root.resolve()


def completed_epochs(log_path: Path) -> list[dict]:
    """The per-epoch records (training + evaluation) of a ``main.py`` ``log.txt``; none when it is absent."""
    if not log_path.is_file():
        return []
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [r for r in records if 'epoch' in r and 'test_coco_eval_bbox' in r]


def run_name(row: Row, seed: int, data: Path, args: argparse.Namespace) -> str:
    """Output folder name of one run: everything that changes its result is in it, so reuse is safe."""
    setup = ' '.join([args.config, args.device, f'threads={args.threads}', *args.options])
    return (f'{row.fusion_type}_drop{row.dropout:g}_e{args.epochs}_seed{seed}_{data.name}_'
            f'{hashlib.sha1(setup.encode()).hexdigest()[:8]}')


def train_run(row: Row, seed: int, data: Path, out: Path, args: argparse.Namespace) -> Path:
    """Train one row and seed through ``main.py`` into ``out`` (reused when it holds every epoch); returns ``out``."""
    if len(completed_epochs(out / 'log.txt')) >= args.epochs:
        print(f'fusion_study: {out.name}: {args.epochs} epochs already there, reused', file=sys.stderr)
        return out
    cmd = [sys.executable, str(REPO_ROOT / 'main.py'), '-c', str(REPO_ROOT / args.config), '--dataset_file',
           'synthetic', '--coco_path', str(data), '--output_dir', str(out), '--seed', str(seed), '--device',
           args.device, '--num_workers', '0', '--options', f'fusion_type={row.fusion_type!r}',
           f'modality_dropout={row.dropout!r}', f'epochs={args.epochs}', 'save_checkpoint_interval=0',
           *args.options]
    if (out / 'checkpoint.pth').is_file():
        cmd += ['--resume', str(out / 'checkpoint.pth')]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out.mkdir(parents=True, exist_ok=True)
    print(f'fusion_study: {out.name}: training', file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(out / 'stdout.txt', 'a', encoding='utf-8') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise StudyError(f'training {out.name} failed (exit status {proc.returncode}); see {out / "stdout.txt"}')
    print(f'fusion_study: {out.name}: trained in {(time.perf_counter() - started) / 60:.1f} min', file=sys.stderr,
          flush=True)
    return out


def train_seconds(out: Path) -> float:
    """Seconds of training + per-epoch evaluation of a run, summed from its ``log.txt`` ``epoch_time`` fields."""
    total = 0.0
    for record in completed_epochs(out / 'log.txt'):
        hours, minutes, seconds = (float(part) for part in record['epoch_time'].split(':'))
        total += 3600 * hours + 60 * minutes + seconds
    return total


# --------------------------------------------------------------------------------------------------- evaluation

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


def findable(visibility: str, missing: str) -> bool:
    """Whether an object of ``visibility`` ('both', 'rgb', 'ir') shows in an image left when ``missing`` is gone."""
    return visibility == 'both' or visibility != missing


def ceiling_ap(gt: dict, missing: str) -> float:
    """The COCO AP (= AP50) of a perfect detector of every object still visible when ``missing`` is blanked.

    Per class c with recall r_c = findable / all objects of c and precision 1 up to it, COCO's AP is the share of
    its 101 recall thresholds t with t <= r_c; the AP is the mean over the classes that have objects.
    """
    counts: dict[int, list[int]] = {}
    for ann in gt['annotations']:
        if not ann.get('iscrowd', 0):
            seen, total = counts.setdefault(ann['category_id'], [0, 0])
            counts[ann['category_id']] = [seen + findable(ann.get('visibility', 'both'), missing), total + 1]
    per_class = [float(np.mean(RECALL_THRESHOLDS <= seen / total + 1e-12)) for seen, total in counts.values()]
    return float(np.mean(per_class)) if per_class else float('nan')


def _cache(out: Path, condition: str, result: dict) -> None:
    partial = out / f'eval_{condition}.json.tmp'  # renamed when complete: a kill leaves no torn cache
    partial.write_text(json.dumps(result))
    os.replace(partial, out / f'eval_{condition}.json')


def training_evaluation(out: Path, gt: dict, score_threshold: float) -> dict | None:
    """The 'none' result from ``main.py``'s own evaluation after the last epoch (with both images), or None.

    That evaluation ran on the weights saved in ``checkpoint.pth`` and wrote ``detections_bbox.json``; it is used
    only when its ``log.txt`` record says no modality was missing and the detections are no older than it.
    """
    records, detections = completed_epochs(out / 'log.txt'), out / 'detections_bbox.json'
    if not records or not detections.is_file() or records[-1].get('test_missing_modality', 'none') != 'none':
        return None
    if detections.stat().st_mtime > (out / 'log.txt').stat().st_mtime:  # written by a later --eval run
        return None
    recall = recall_by_visibility(gt, json.loads(detections.read_text()), score_threshold)
    return {'ap': records[-1]['test_coco_eval_bbox'][:3], 'epoch': int(records[-1]['epoch']),
            'recall': {v: list(recall[v]) for v in VISIBILITIES}}


def evaluate_run(out: Path, conditions: list[str], gt: dict, score_threshold: float, device: str) -> dict:
    """``{condition: {'ap': [AP, AP50, AP75], 'recall': {visibility: [found, total]}}}`` of ``out/checkpoint.pth``.

    Conditions already evaluated are read from ``out/eval_<condition>.json``; 'none' is taken from the training
    run's last evaluation (:func:`training_evaluation`) where it can be; the others are computed here with the
    run's own config (from the checkpoint) and ``eval_missing_modality=<condition>``. All are cached.
    """
    results, todo = {}, []
    for condition in conditions:
        cached = out / f'eval_{condition}.json'
        reused = training_evaluation(out, gt, score_threshold) if condition == 'none' and not cached.is_file() \
            else None
        if reused is not None:
            _cache(out, condition, reused)
        if cached.is_file():
            results[condition] = json.loads(cached.read_text())
        else:
            todo.append(condition)
    if not todo:
        return results

    from torch.utils.data import DataLoader, SequentialSampler

    from datasets import build_dataset
    from engine import evaluate
    from models import build_model
    from util.checkpoint import load_checkpoint, strip_module_prefix
    from util.config import config_from_dict
    from util.misc import collate_fn

    checkpoint = load_checkpoint(str(out / 'checkpoint.pth'))
    cfg = config_from_dict(checkpoint['config'], source=str(out / 'checkpoint.pth'))
    model, criterion, postprocessors = build_model(cfg)
    model.load_state_dict(strip_module_prefix(checkpoint['model']))
    model.to(device)
    criterion.to(device)
    for condition in todo:
        cfg.eval_missing_modality = condition
        dataset = build_dataset('val', cfg)
        loader = DataLoader(dataset, batch_size=1, sampler=SequentialSampler(dataset), collate_fn=collate_fn)
        stats, evaluator = evaluate(model, criterion, postprocessors, loader, dataset.coco, torch.device(device),
                                    print_freq=10 ** 9, missing_modality=condition)
        recall = recall_by_visibility(gt, evaluator.results, score_threshold)
        results[condition] = {'ap': stats['coco_eval_bbox'][:3], 'epoch': int(checkpoint['epoch']),
                              'recall': {v: list(recall[v]) for v in VISIBILITIES}}
        _cache(out, condition, results[condition])
    return results


# -------------------------------------------------------------------------------------------------------- page

def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``; the deviation is NaN for fewer than two values."""
    spread = statistics.stdev(values) if len(values) >= 2 else float('nan')
    return statistics.fmean(values), spread


def summarise(rows: list[Row], results: dict[Row, list[dict]], conditions: list[str]) -> dict:
    """``{row: {condition: {'ap': (mean, sd), 'ap50': (mean, sd), 'n': seeds, 'recall': {vis: (found, total)}}}}``.

    AP values are in %; recall counts are pooled over the seeds.
    """
    summary = {}
    for row in rows:
        per_condition = {}
        for condition in conditions:
            runs = [r[condition] for r in results.get(row, []) if condition in r]
            if not runs:
                continue
            recall = {v: (sum(r['recall'][v][0] for r in runs), sum(r['recall'][v][1] for r in runs))
                      for v in VISIBILITIES}
            per_condition[condition] = {'ap': mean_spread([100 * r['ap'][0] for r in runs]),
                                        'ap50': mean_spread([100 * r['ap'][1] for r in runs]),
                                        'n': len(runs), 'recall': recall}
        summary[row] = per_condition
    return summary


def _cell(value: tuple[float, float]) -> str:
    mean, spread = value
    return f'{mean:.1f}' if math.isnan(spread) else f'{mean:.1f} ± {spread:.1f}'


def ap_table(summary: dict, conditions: list[str], seeds: int) -> str:
    head = ' | '.join(f'AP, {CONDITION_LABELS[c]} | AP50, {CONDITION_LABELS[c]}' for c in conditions)
    lines = [f'| row | {head} |', '|---|' + '---:|' * (2 * len(conditions))]
    for row, per_condition in summary.items():
        cells = []
        for condition in conditions:
            entry = per_condition.get(condition)
            if entry is None:
                cells += ['not run', 'not run']
                continue
            partial = f' (n={entry["n"]})' if entry['n'] < seeds else ''
            cells += [_cell(entry['ap']) + partial, _cell(entry['ap50']) + partial]
        lines.append(f'| {row.label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def recall_table(summary: dict, conditions: list[str]) -> str:
    def pct(found_total):
        found, total = found_total
        return f'{100 * found / total:.0f} %' if total else 'n/a'

    head = ' | '.join(f'{CONDITION_LABELS[c]}: {v}' for c in conditions for v in VISIBILITIES)
    lines = [f'| row | {head} |', '|---|' + '---:|' * (len(conditions) * len(VISIBILITIES))]
    for row, per_condition in summary.items():
        cells = [pct(per_condition[c]['recall'][v]) if c in per_condition else 'not run'
                 for c in conditions for v in VISIBILITIES]
        lines.append(f'| {row.label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def target_lines(summary: dict) -> list[str]:
    """The issue-11 targets for every fused row trained with dropout, from the table's means (AP50, %)."""
    by_key = {(row.fusion_type, row.dropout): per_condition for row, per_condition in summary.items()}
    lines = []
    for row, per_condition in summary.items():
        if not row.dropout or row.fusion_type in SEES_THE_REST.values():
            continue
        checks = []
        for missing, single in SEES_THE_REST.items():
            reference = by_key.get((single, 0.0), {}).get('none')
            if missing in per_condition and reference:
                kept, seen = per_condition[missing]['ap50'][0], reference['ap50'][0]
                verdict = ('n/a: the single-modality row scores 0' if not seen else
                           f'{100 * kept / seen:.0f} %, {"met" if kept >= 0.95 * seen else "NOT met"}')
                checks.append(f'{CONDITION_LABELS[missing]}: AP50 {kept:.1f} vs `{single}` {seen:.1f} '
                              f'({verdict}; target >= 95 %)')
        undropped = by_key.get((row.fusion_type, 0.0), {}).get('none')
        if 'none' in per_condition and undropped:
            gap = per_condition['none']['ap50'][0] - undropped['ap50'][0]
            checks.append(f'both images: AP50 {per_condition["none"]["ap50"][0]:.1f} vs {undropped["ap50"][0]:.1f} '
                          f'without dropout ({gap:+.1f}; {"met" if gap >= -1.0 else "NOT met"}, target >= -1.0)')
        if checks:
            lines.append(f'- {row.label}: ' + '; '.join(checks) + '.')
    return lines


def page_body(args: argparse.Namespace, rows: list[Row], summary: dict, gt: dict, data: Path, machine: str,
              started: datetime.datetime, done: int, total: int, seconds: dict[Row, list[float]],
              left_out: list[str] = ()) -> str:
    counts = recall_by_visibility(gt, [], 1.0)
    train_pairs = len(json.loads((data / 'coco_annotations' / 'LLVIP_train.json').read_text())['images'])
    objects = ', '.join(f'{v}: {counts[v][1]}' for v in VISIBILITIES)
    conditions = list(args.missing)
    all_objects = sum(total for _, total in counts.values())
    ceilings = '; '.join(
        f'{CONDITION_LABELS[c]}: AP = AP50 <= {100 * ceiling_ap(gt, c):.1f}, recall <= '
        f'{100 * sum(counts[v][1] for v in VISIBILITIES if findable(v, c)) / max(all_objects, 1):.0f} %'
        for c in conditions)
    minutes = '; '.join(f'{row.label} {statistics.fmean(s) / 60:.1f} min' for row, s in seconds.items() if s)
    extra = f' and `--options {" ".join(args.options)}`' if args.options else ''
    status = ('' if done == total else
              f'**{"Partial" if left_out else "In progress"}: {done} of {total} runs finished'
              + (f' (not trained: {"; ".join(left_out)})' if left_out else '')
              + f'; cells marked (n=k) have k of {len(args.seeds)} seeds.**\n\n')
    parts = [
        f'{status}Started {started:%Y-%m-%d %H:%M} UTC with `{command_line("tools/fusion_study.py", args.argv)}`; '
        f'page written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.', '',
        f'Machine: {machine}; load average when this page was written {load_average()}.', '',
        f'Budget, the same for every row: `{args.config}` from scratch by `main.py` with `fusion_type=<row>`, '
        f'`modality_dropout=<row>`{extra}, {args.epochs} epoch(s) on {args.device} with {args.threads} torch '
        f'thread(s) per run and {args.jobs} run(s) at a time, seeds {", ".join(map(str, args.seeds))}, on the '
        f'synthetic data set `{data.name}` '
        f'({train_pairs} train pairs; {len(gt["images"])} val pairs, val objects by visibility: {objects}). '
        'Evaluated after the last epoch; a missing image is the zero tensor after normalisation (the dataset '
        'mean), on every val pair.', '',
        f'Training + per-epoch evaluation time per run (mean over seeds): {minutes or "none yet"}.', '',
        f'COCO AP / AP50 (%), mean ± sample standard deviation over {len(args.seeds)} seed(s):', '',
        ap_table(summary, conditions, len(args.seeds)), '',
        f'Recall at IoU 0.5 of detections with score >= {args.score_threshold}, one-to-one per class, by where '
        'the object is visible (`both`, `rgb` only, `ir` only), pooled over the seeds:', '',
        recall_table(summary, conditions), '',
        f'Ceiling (a perfect detector of what the remaining image shows; objects visible only in the missing '
        f'image cannot be found): {ceilings}.',
    ]
    targets = target_lines(summary)
    if targets:
        parts += ['', 'Targets (issue 11), from the means above:', '', *targets]
    return '\n'.join(parts)


# ---------------------------------------------------------------------------------------------------- the CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('tools/fusion_study.py', description=__doc__.splitlines()[0])
    parser.add_argument('--rows', nargs='+', default=list(DEFAULT_ROWS), metavar='TYPE[:DROPOUT]',
                        help=f'fusion types of models/fusion.py ({", ".join(FUSION_TYPES)}), each with an optional '
                             f'modality_dropout; default: {" ".join(DEFAULT_ROWS)}')
    parser.add_argument('--seeds', nargs='+', type=int, default=[42, 43, 44],
                        help='training seeds, the same for every row (default 42 43 44)')
    parser.add_argument('--missing', nargs='+', default=list(CONDITIONS), choices=CONDITIONS,
                        help='evaluation conditions (eval_missing_modality); default: none rgb ir')
    parser.add_argument('--epochs', type=int, default=5, help='training epochs per run (default 5)')
    parser.add_argument('--train-pairs', type=int, default=200, help='synthetic train pairs (default 200)')
    parser.add_argument('--val-pairs', type=int, default=50, help='synthetic val pairs (default 50)')
    parser.add_argument('--data-seed', type=int, default=0, help='seed of the synthetic data (default 0)')
    parser.add_argument('--data', help='an existing synthetic data root instead of generating one')
    parser.add_argument('--config', default=STUDY_CONFIG, help=f'model/training config (default {STUDY_CONFIG})')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(),
                        help=f'CPU threads per run (default here: {torch.get_num_threads()})')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs trained at the same time, each with --threads threads (default 1)')
    parser.add_argument('--device', default='cpu', help="device of the runs (default 'cpu')")
    parser.add_argument('--score-threshold', type=float, default=0.3, help='for the recall columns (default 0.3)')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides for every run, e.g. lr_drop=4')
    parser.add_argument('--work-dir', default='outputs/robustness', help='data and runs (default outputs/robustness)')
    parser.add_argument('--out', help='also write the Markdown page here, e.g. docs/benchmarks/modality_robustness.md')
    parser.add_argument('--finished-only', action='store_true',
                        help='train nothing: write the page from the runs already trained in --work-dir')
    parser.add_argument('--title', default='Missing-modality robustness on the synthetic RGB/IR data set',
                        help='title of the page')
    return parser


def run_study(args: argparse.Namespace) -> dict:
    """Train and evaluate every row and seed (reusing finished work); returns the summary."""
    rows = list(dict.fromkeys(parse_row(text) for text in args.rows))
    machine = machine_description(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(args.work_dir)
    data = ensure_synthetic_data(Path(args.data) if args.data else
                                 work / f'synthetic_{args.train_pairs}_{args.val_pairs}_seed{args.data_seed}',
                                 args.train_pairs, args.val_pairs, args.data_seed)
    gt = json.loads((data / 'coco_annotations' / 'LLVIP_test.json').read_text())
    results: dict[Row, list[dict]] = {row: [] for row in rows}
    seconds: dict[Row, list[float]] = {row: [] for row in rows}
    runs = [(seed, row) for seed in args.seeds for row in rows]  # seed-major: a partial table has every row
    total, left_out = len(runs), []
    if args.finished_only:
        trained = [(seed, row) for seed, row in runs
                   if len(completed_epochs(work / run_name(row, seed, data, args) / 'log.txt')) >= args.epochs]
        left_out = [f'{row.label} seed {seed}' for seed, row in runs if (seed, row) not in trained]
        runs = trained
    summary = {}
    pool = ThreadPoolExecutor(max_workers=args.jobs)  # threads only wait for the main.py subprocesses
    try:
        futures = {pool.submit(train_run, row, seed, data, work / run_name(row, seed, data, args), args): row
                   for seed, row in runs}
        for done, future in enumerate(as_completed(futures), start=1):
            row = futures[future]
            out = future.result()
            results[row].append(evaluate_run(out, list(args.missing), gt, args.score_threshold, args.device))
            seconds[row].append(train_seconds(out))
            summary = summarise(rows, results, list(args.missing))
            body = page_body(args, rows, summary, gt, data, machine, started, done, total, seconds, left_out)
            write_page(args.out, args.title, body, echo=done == len(runs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    def run(args):
        args.argv = argv
        torch.set_num_threads(args.threads)
        run_study(args)

    return run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
