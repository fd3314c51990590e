"""One training epoch and one COCO evaluation pass of a paired RGB+IR detector.

Follows CAFF-DINO's ``engine.py`` (``train_one_epoch``, ``evaluate``; itself DINO's with two inputs). What differs:
- Backbone freezing is not done here (the reference re-freezes each epoch); the model is built frozen.
- AMP: only the model's forward runs under autocast, in the config's ``amp_dtype`` ('auto': float16 on CUDA,
  bfloat16 elsewhere; ``amp_autocast_dtype``); float16 gets a GradScaler (``amp_grad_scaler``) on any device, CPU
  included. The loss is computed in float32 on float32 copies of the outputs. The MSDeformAttn op keeps itself in
  float32.
- Non-finite numbers stop training with ``NonFiniteLossError`` (a user error: one line, exit 2), instead of
  ``sys.exit(1)``; the caller keeps the last good checkpoint (the current epoch is never saved). The model's
  outputs are checked before the criterion runs, so a NaN never reaches the matcher or the box losses (whose
  ``generalized_box_iou`` would fail on it first); then the loss, averaged over ranks; then, without AMP, the
  gradient norm before the optimiser step. The message names the epoch, the step and the outputs or terms.
- Under DDP every rank stops together: the output check and a user error raised while fetching a batch (a bad
  image read by a DataLoader worker) are agreed between ranks at each step (``util.dist.raise_together``), so
  no rank is left waiting in a collective and rank 0 holds the message.
- ``evaluate`` writes the detections with the data set's own image ids (string ids restored, ``image_id_map``).
- ``evaluate`` runs on CPU (the reference criterion hard-codes ``.to('cuda')``), prints the COCO summary and a
  per-class AP table on the main process, and writes the detections as a COCO results JSON.
- ``evaluate`` also scores a data set's own benchmark metric when it has one (KAIST: MR^-2 all / day / night,
  ``datasets/kaist_eval.py``), and names the number a run should select its best checkpoint by.
"""
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from datasets import build_benchmark_evaluator
from datasets.coco_eval import CocoEvaluator
from util import dist
from util.errors import UserError
from util.metric_logger import MetricLogger, SmoothedValue

logger = logging.getLogger('caff_dino')

MAIN_TERMS = ('loss_ce', 'loss_bbox', 'loss_giou')


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the loss terms."""


class _StepTogether:
    """``data_loader`` whose batches every rank fetches in step: a ``UserError`` raised while fetching one (e.g.
    in a DataLoader worker) is raised on every rank at that step (``dist.raise_together``). Keeps ``len``."""

    def __init__(self, data_loader: Iterable):
        self.data_loader = data_loader

    def __len__(self) -> int:
        return len(self.data_loader)

    def __iter__(self):
        iterator = iter(self.data_loader)
        while True:
            error, batch = None, None
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except UserError as err:
                error = err
            dist.raise_together(error)
            yield batch


def _floating_tensors(obj, name: str = 'outputs'):
    """``(name, tensor)`` for every floating tensor nested in ``obj`` (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(value, f'{name}[{key!r}]')
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating_tensors(value, f'{name}[{i}]')


def non_finite_outputs(outputs: dict) -> list[str]:
    """Names of the output tensors holding a NaN or an infinity (one device sync when all are finite)."""
    named = list(_floating_tensors(outputs))
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def check_outputs(outputs: dict, epoch: int, step: int, lr: float) -> None:
    """Raise ``NonFiniteLossError`` on every rank when any rank's model outputs hold a NaN or an infinity."""
    bad = non_finite_outputs(outputs)
    error = None
    if bad:
        error = NonFiniteLossError(
            f'the model outputs are not finite at epoch {epoch}, step {step} ({len(bad)} tensors, e.g. '
            f'{", ".join(bad[:3])}); training stopped before the loss. The weights diverged (lr {lr:g}): lower '
            'lr, keep clip_max_norm > 0, or check the data')
    dist.raise_together(error)


def _float32(obj):
    """``obj`` with every floating tensor (nested in dicts / lists / tuples) cast to float32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


AMP_DTYPES = ('auto', 'float16', 'bfloat16')  # the values of config key amp_dtype


def amp_autocast_dtype(device: torch.device, amp_dtype: str = 'auto') -> torch.dtype:
    """The autocast dtype of config key ``amp_dtype`` on ``device``: 'auto' is float16 on CUDA (the reference's
    choice; tensor cores on every CUDA GPU) and bfloat16 elsewhere (CPU autocast's fast type, no loss scaling)."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f'amp_dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}')
    if amp_dtype == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    return getattr(torch, amp_dtype)


def amp_grad_scaler(device: torch.device, amp: bool, amp_dtype: str = 'auto') -> torch.amp.GradScaler | None:
    """A GradScaler for float16 AMP on ``device`` (float16's 5-bit exponent flushes small gradients to 0; scaling
    the loss keeps them, and a step with an inf gradient is skipped); None without AMP or with bfloat16."""
    if amp and amp_autocast_dtype(device, amp_dtype) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def _autocast(device: torch.device, enabled: bool, amp_dtype: str):
    return torch.autocast(device_type=device.type, dtype=amp_autocast_dtype(device, amp_dtype), enabled=enabled)


def _targets_to(targets, device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def weighted_loss(loss_dict: dict, weight_dict: dict) -> torch.Tensor:
    """``sum_k weight_dict[k] * loss_dict[k]`` over the terms that have a weight (the rest are logged only)."""
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    clip_max_norm: float = 0.0, amp: bool = False, scaler: torch.amp.GradScaler | None = None,
                    ema=None, print_freq: int = 10, tb_logger=None, amp_dtype: str = 'auto') -> dict[str, float]:
    """Train for one pass over ``data_loader`` of ``(NestedTensor rgb, NestedTensor ir, targets)`` batches.

    Per step: ``loss = sum_k w_k * L_k`` (``criterion.weight_dict``), backward, gradient clipping to
    ``clip_max_norm`` (0 disables), optimiser step, EMA update. With ``amp`` the forward runs under autocast in
    ``amp_dtype``; ``scaler`` (``amp_grad_scaler``, for float16) then scales the loss and unscales the gradients
    before clipping. Returns the epoch averages of ``loss``, every weighted term (``loss_ce``, ``loss_bbox_0``,
    ...), every unweighted term (``*_unscaled``) and ``lr``.
    ``tb_logger`` (``util.tensorboard_logger.TensorBoardLogger`` or None) gets the loss, main terms and lr per step.
    """
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.2e}'))
    term_sums: dict[str, float] = defaultdict(float)
    steps = 0
    for step, (samples_rgb, samples_ir, targets) in enumerate(
            metric_logger.log_every(_StepTogether(data_loader), print_freq, f'Epoch: [{epoch}]', logger)):
        samples_rgb, samples_ir = samples_rgb.to(device), samples_ir.to(device)
        targets = _targets_to(targets, device)
        with _autocast(device, amp, amp_dtype):
            outputs = model(samples_rgb, samples_ir, targets)
        outputs = _float32(outputs)
        check_outputs(outputs, epoch, step, optimizer.param_groups[0]['lr'])
        loss_dict = criterion(outputs, targets)
        losses = weighted_loss(loss_dict, weight_dict)

        reduced = dist.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        reduced_weighted = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        loss_value = sum(reduced_weighted.values()).item()
        if not math.isfinite(loss_value):
            terms = ', '.join(f'{k}={v.item():.4g}' for k, v in reduced_weighted.items())
            raise NonFiniteLossError(
                f'loss is {loss_value} at epoch {epoch}, step {step}; stopping. Loss terms: {terms}')

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses).backward()
            if clip_max_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            if clip_max_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
                if not math.isfinite(grad_norm.item()):  # the same on every rank: DDP averaged the gradients
                    raise NonFiniteLossError(
                        f'the gradient norm is {grad_norm.item()} at epoch {epoch}, step {step} (loss '
                        f'{loss_value:.4g}); stopping before the optimizer step. Lower lr or check the data')
            optimizer.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, 'module') else model)

        # The progress line shows the total and the last decoder layer's terms; every term goes into the averages.
        metric_logger.update(loss=loss_value, **{k: reduced_weighted[k] for k in MAIN_TERMS if k in reduced_weighted},
                             lr=optimizer.param_groups[0]['lr'])
        if tb_logger is not None:
            main_terms = {k: reduced_weighted[k].item() for k in MAIN_TERMS if k in reduced_weighted}
            tb_logger.log_iteration(epoch * len(data_loader) + step, {'loss': loss_value, **main_terms},
                                    optimizer.param_groups[0]['lr'])
        for k, v in reduced_weighted.items():
            term_sums[k] += v.item()
        for k, v in reduced.items():
            term_sums[f'{k}_unscaled'] += v.item()
        steps += 1
    # Every rank already holds the rank-averaged values, so the plain means are the global ones.
    stats = {k: total / max(steps, 1) for k, total in term_sums.items()}
    stats.update({k: meter.global_avg for k, meter in metric_logger.meters.items()})
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, base_ds,
             device: torch.device, output_dir: str | None = None, amp: bool = False,
             print_freq: int = 10, image_id_map: dict | None = None,
             missing_modality: str = 'none', amp_dtype: str = 'auto') -> tuple[dict, CocoEvaluator]:
    """Run the model over ``data_loader`` and score it with COCO bbox metrics against ``base_ds`` (a ``COCO``).

    Returns ``(stats, evaluator)``; ``stats`` holds the averaged loss and main weighted terms, ``coco_eval_bbox``
    (the 12 COCO numbers, AP first) and ``coco_eval_per_class`` ({class: [AP, AP50]}). With ``output_dir`` the main
    process writes the detections to ``output_dir/detections_bbox.json``, with the annotation file's own image ids
    (``image_id_map``: {original id: int id}, the data set's, None when the ids were ints). Every rank returns the
    same stats. A data set with its own metric (``data_loader.dataset``, see ``build_benchmark_evaluator``) adds it
    under the evaluator's ``stats_key`` (KAIST: ``miss_rate`` = {all, day, night}). ``selection`` = {name, value} is
    the number to keep the best checkpoint by, higher is better: AP, or the benchmark's own (KAIST: 1 - MR^-2 all).
    ``missing_modality`` ('none', 'rgb', 'ir': the data set's ``eval_missing_modality``, which blanks the image)
    is logged and returned as ``stats['missing_modality']``.
    """
    model.eval()
    criterion.eval()
    weight_dict = criterion.weight_dict
    evaluator = CocoEvaluator(base_ds, image_id_map)
    benchmark = build_benchmark_evaluator(getattr(data_loader, 'dataset', None))
    metric_logger = MetricLogger(delimiter='  ')
    if missing_modality != 'none':
        logger.info(f'evaluation with the {missing_modality.upper()} image missing on every pair '
                    f'(eval_missing_modality={missing_modality!r})')
    for samples_rgb, samples_ir, targets in metric_logger.log_every(_StepTogether(data_loader), print_freq, 'Test:',
                                                                    logger):
        samples_rgb, samples_ir = samples_rgb.to(device), samples_ir.to(device)
        targets = _targets_to(targets, device)
        with _autocast(device, amp, amp_dtype):
            outputs = model(samples_rgb, samples_ir)
        outputs = _float32(outputs)
        loss_dict = dist.reduce_dict(criterion(outputs, targets))
        weighted = {k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict}
        metric_logger.update(loss=sum(weighted.values()).item(),
                             **{k: weighted[k] for k in MAIN_TERMS if k in weighted})

        orig_sizes = torch.stack([t['orig_size'] for t in targets], dim=0)
        results = postprocessors['bbox'](outputs, orig_sizes)
        evaluator.update({int(t['image_id']): r for t, r in zip(targets, results)})
        if benchmark is not None:
            benchmark.update({int(t['image_id']): r for t, r in zip(targets, results)})

    metric_logger.synchronize_between_processes()
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    summary = evaluator.summarize()
    if dist.is_main_process():
        logger.info(summary.rstrip('\n'))
        if output_dir:
            evaluator.write_results(os.path.join(output_dir, 'detections_bbox.json'))
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats['coco_eval_bbox'] = evaluator.stats.tolist()
    stats['coco_eval_per_class'] = {name: [ap, ap50] for name, ap, ap50 in evaluator.per_class}
    stats['selection'] = {'name': 'AP', 'value': stats['coco_eval_bbox'][0]}
    if benchmark is not None:
        benchmark.synchronize_between_processes()
        benchmark.accumulate()
        if dist.is_main_process():
            logger.info(benchmark.summarize().rstrip('\n'))
        stats[benchmark.stats_key] = benchmark.stats_dict()
        stats['selection'] = benchmark.selection()
    stats['missing_modality'] = missing_modality
    return stats, evaluator


def log_line(path: str, record: dict) -> None:
    """Append one JSON line to ``path`` (``log.txt``), flushed to disk."""
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())
