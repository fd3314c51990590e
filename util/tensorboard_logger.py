"""Optional TensorBoard logging of a training run: per-iteration losses and lr, per-epoch COCO metrics and per-class AP.

Not in the reference (it writes ``log.txt`` only; ``log.txt`` stays the record and ``tools/plot_logs.py`` reads it).
The config key ``tensorboard`` turns it on; the events go to ``OUTPUT_DIR/tensorboard/`` (view them with
``tensorboard --logdir OUTPUT_DIR/tensorboard``). Tags:

- ``train_iter/loss`` (the weighted total), ``train_iter/<term>`` for ``loss_ce``, ``loss_bbox``, ``loss_giou`` (the
  last decoder layer's weighted terms) and ``train_iter/lr``, at step ``epoch * iterations_per_epoch + i``;
- ``train/<key>``: the epoch averages of every training term (what ``log.txt`` holds as ``train_*``);
- ``val/<metric>``: the 12 COCO numbers (``val/AP``, ``val/AP50``, ...) and the validation loss terms;
- ``val_per_class/AP/<class>`` and ``val_per_class/AP50/<class>``, and the per-class table as text
  (``val/per_class_AP``), at step ``epoch``.

When the ``tensorboard`` package is not installed the run goes on without it, and says so once.
"""
import logging
import os
from typing import Mapping, Optional, Sequence

logger = logging.getLogger('caff_dino')

SUBDIR = 'tensorboard'
_warned_missing = False


class TensorBoardLogger:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` with the tags of the module docstring."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def log_iteration(self, step: int, losses: Mapping[str, float], lr: float) -> None:
        for name, value in losses.items():
            self.writer.add_scalar(f'train_iter/{name}', float(value), step)
        self.writer.add_scalar('train_iter/lr', float(lr), step)

    def log_epoch(self, epoch: int, train_stats: Mapping[str, float], val_stats: Mapping,
                  metric_names: Sequence[str]) -> None:
        """``train_stats`` of ``train_one_epoch``; ``val_stats`` of ``engine.evaluate`` (``coco_eval_bbox``: the 12
        COCO numbers, named by ``metric_names``; ``coco_eval_per_class``: ``{class: [AP, AP50]}``; the rest:
        averaged losses)."""
        for name, value in train_stats.items():
            self.writer.add_scalar(f'train/{name}', float(value), epoch)
        for name, value in zip(metric_names, val_stats.get('coco_eval_bbox', [])):
            self.writer.add_scalar(f'val/{name}', float(value), epoch)
        for name, value in val_stats.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f'val/{name}', float(value), epoch)
        per_class = val_stats.get('coco_eval_per_class', {})
        for name, (ap, ap50) in per_class.items():
            self.writer.add_scalar(f'val_per_class/AP/{name}', float(ap), epoch)
            self.writer.add_scalar(f'val_per_class/AP50/{name}', float(ap50), epoch)
        if per_class:
            rows = [f'| {name} | {100 * ap:.1f} | {100 * ap50:.1f} |' for name, (ap, ap50) in per_class.items()]
            self.writer.add_text('val/per_class_AP', '\n'.join(['| class | AP | AP50 |', '|---|---:|---:|'] + rows),
                                 epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tensorboard_logger(enabled: bool, output_dir: str) -> Optional[TensorBoardLogger]:
    """A logger writing to ``output_dir/tensorboard`` when ``enabled`` and the package is installed, else None.

    Call it on the main process only. A missing package is logged once per process (a warning), not an error.
    """
    global _warned_missing
    if not enabled:
        return None
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            logger.warning('tensorboard=True but the tensorboard package is not installed; training goes on and '
                           'logs to log.txt only (pip install -r requirements-extra.txt)')
        return None
    log_dir = os.path.join(output_dir, SUBDIR)
    logger.info(f'TensorBoard events: {log_dir} (tensorboard --logdir {log_dir})')
    return TensorBoardLogger(log_dir)
