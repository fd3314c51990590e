"""The training checkpoint dict: what a run saves after each epoch, and how ``--resume`` reads it back.

Both directions live here, so the layout is defined once. Written by ``build_training_checkpoint``:

=================  =========================================================  ==========================
key                value                                                      reference (CAFF-DINO)
=================  =========================================================  ==========================
``model``          the model's state dict (the EMA weights in ``checkpoint_   same
                   best_ema.pth``)
``optimizer``      AdamW state dict, the reference's two groups               same layout
                   (``util/optim.py``)
``lr_scheduler``   StepLR state dict                                          same
``epoch``          the last completed epoch                                   same
``config``         the resolved config (a plain dict)                         ``args`` (a Namespace)
``best``           ``{'metric', 'epoch', 'ema_metric', 'ema_epoch'}``         not saved
``rng_state``      every rank's generator states (``util/rng.py``)            not saved
``ema_model``      the EMA weights, when ``use_ema``                          same
=================  =========================================================  ==========================

``resume_training`` reads what the reference's ``--resume`` reads (``model`` strictly; ``optimizer``,
``lr_scheduler`` and ``epoch`` when all three are there and not ``--eval``; ``ema_model``), so a reference
training checkpoint continues here, and the reference's ``--resume`` reads the files written here (it ignores the
extra keys). It then applies the hyperparameters of the run's config over the restored ones: the optimizer groups
and the scheduler carry ``lr``, ``lr_backbone``, ``weight_decay`` and ``lr_drop``, which the reference silently
keeps from the checkpoint. Every config key that differs from the checkpoint's (its ``config``, or the
reference's ``args``) is reported ``old -> new``; keys that the loop reads each epoch (``epochs``,
``clip_max_norm``, ``ema_decay``, ...) take the new value by themselves.
"""
import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from util.checkpoint import CheckpointError, load_checkpoint, strip_module_prefix, unwrap_model
from util.optim import OptimizerStateError, load_optimizer_state

# The per-group learning-rate keys, in the order of util/optim.param_groups.
GROUP_LR_KEYS = ('lr', 'lr_backbone')


@dataclass
class Best:
    """The best validation AP so far and its epoch, of the trained weights and of their EMA (-1: none yet)."""
    metric: float = float('-inf')
    epoch: int = -1
    ema_metric: float = float('-inf')
    ema_epoch: int = -1

    def as_dict(self) -> dict:
        return {'metric': self.metric, 'epoch': self.epoch, 'ema_metric': self.ema_metric,
                'ema_epoch': self.ema_epoch}


@dataclass
class ResumeState:
    """What ``--resume`` restored: the next epoch, the best metrics, the saved generator states (a list with one
    entry per rank, or None), and one ``key: old -> new`` line per config key that changed."""
    start_epoch: int = 0
    best: Best = field(default_factory=Best)
    rng_state: Optional[list] = None
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ema_restored: bool = False


def build_training_checkpoint(model: nn.Module, optimizer, lr_scheduler, epoch: int, config: dict, best: Best,
                              rng_state: list, ema_module: Optional[nn.Module] = None,
                              weights: Optional[nn.Module] = None) -> dict:
    """The checkpoint dict of the table above. ``weights``: the module whose state dict goes under ``model``
    (default ``model``; the EMA module for ``checkpoint_best_ema.pth``, which then has no ``ema_model``)."""
    checkpoint = {'model': unwrap_model(weights if weights is not None else model).state_dict(),
                  'optimizer': optimizer.state_dict(), 'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch,
                  'config': config, 'best': best.as_dict(), 'rng_state': rng_state}
    if ema_module is not None and weights is None:
        checkpoint['ema_model'] = ema_module.state_dict()
    return checkpoint


def saved_config(checkpoint: dict) -> dict:
    """The config a checkpoint was trained with: ours (``config``), the reference's ``args``, or {}."""
    if isinstance(checkpoint.get('config'), dict):
        return checkpoint['config']
    if isinstance(checkpoint.get('args'), argparse.Namespace):
        return vars(checkpoint['args'])
    return {}


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for every key of ``new`` that ``old`` holds with another value."""
    return [(key, old[key], value) for key, value in new.items() if key in old and old[key] != value]


def _load_best(checkpoint: dict) -> Best:
    best = checkpoint.get('best')
    if isinstance(best, dict):
        return Best(float(best.get('metric', float('-inf'))), int(best.get('epoch', -1)),
                    float(best.get('ema_metric', float('-inf'))), int(best.get('ema_epoch', -1)))
    # Files of an earlier layout kept the regular best at the top level.
    return Best(float(checkpoint.get('best_metric', float('-inf'))), int(checkpoint.get('best_epoch', -1)))


def apply_hyperparameters(optimizer, lr_scheduler, config: dict) -> None:
    """Set the restored optimiser groups and StepLR to ``config``'s ``lr`` / ``lr_backbone`` / ``weight_decay`` /
    ``lr_drop``. When a learning rate or ``lr_drop`` changed, the base rates become the new ones and the current
    rates StepLR's closed form ``base * gamma ** (last_epoch // lr_drop)``, so the next drops follow the new
    schedule; unchanged, the restored rates are kept bit for bit."""
    bases = [config[key] for key in GROUP_LR_KEYS]
    if lr_scheduler.step_size != config['lr_drop'] or list(lr_scheduler.base_lrs) != bases:
        lr_scheduler.step_size = config['lr_drop']
        lr_scheduler.base_lrs = bases
        steps = lr_scheduler.last_epoch // lr_scheduler.step_size
        for group, base in zip(optimizer.param_groups, bases):
            group['initial_lr'] = base
            group['lr'] = base * lr_scheduler.gamma ** steps
    for group in optimizer.param_groups:
        group['weight_decay'] = config['weight_decay']


def _mismatch(expected: dict, saved: dict) -> str:
    """How the keys and shapes of ``saved`` differ from ``expected`` ('' when they agree), e.g. ``'2 keys missing
    (conv_corr.0.x, ...), 1 of another shape (label_enc.weight [4, 32] vs [3, 32])'``."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    if not missing and not unexpected and not shapes:
        return ''
    if len(missing) == len(expected):
        return f'it holds none of the model\'s keys (its keys: {", ".join(list(saved)[:3])}, ...)'
    parts = []
    if missing:
        parts.append(f'{len(missing)} keys missing ({", ".join(missing[:2])}, ...)')
    if unexpected:
        parts.append(f'{len(unexpected)} keys the model lacks ({", ".join(unexpected[:2])}, ...)')
    if shapes:
        key = shapes[0]
        parts.append(f'{len(shapes)} of another shape ({key} {list(saved[key].shape)} vs '
                     f'{list(expected[key].shape)})')
    return ', '.join(parts)


@contextlib.contextmanager
def _damaged_entries(path: str, keys: str):
    """A ``CheckpointError`` naming the file and ``keys`` for an entry that is not what a training checkpoint holds
    (a wrong type or value raises inside torch's or our readers)."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f'--resume {path!r}: its {keys} entry is damaged ({type(e).__name__}: {e}); resume '
                              'from another checkpoint of the run, or fine-tune with --pretrain_model_path') from None


def resume_training(path: str, model: nn.Module, config: dict, optimizer=None, lr_scheduler=None, ema=None,
                    allow_unsafe: bool = False) -> ResumeState:
    """``--resume``: restore the model strictly and, when given, optimizer, scheduler and EMA; then apply
    ``config`` (the run's resolved config) over the restored hyperparameters.

    Restoring the generator states (``ResumeState.rng_state``) is the caller's job, right before training
    continues. Raises ``CheckpointError`` when the model's keys or shapes differ from the file's (resuming is not
    fine-tuning: ``--pretrain_model_path`` is), or when the optimiser state does not fit.
    """
    checkpoint = load_checkpoint(path, allow_unsafe)
    saved = strip_module_prefix(checkpoint['model'])
    mismatch = _mismatch(unwrap_model(model).state_dict(), saved)
    if mismatch:
        raise CheckpointError(f'--resume {path!r} does not match the model ({mismatch}); was it saved with another '
                              'config? Resume with that config, or use --pretrain_model_path to fine-tune from it')
    unwrap_model(model).load_state_dict(saved, strict=True)
    with _damaged_entries(path, 'best'):
        state = ResumeState(best=_load_best(checkpoint), rng_state=checkpoint.get('rng_state'))
    state.changes = [f'{key}: {old!r} -> {new!r}' for key, old, new in config_changes(saved_config(checkpoint),
                                                                                        config)]
    if ema is not None and isinstance(checkpoint.get('ema_model'), dict):
        ema.module.load_state_dict(strip_module_prefix(checkpoint['ema_model']))
        state.ema_restored = True
    training = optimizer is not None and lr_scheduler is not None
    if training and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
        try:
            state.notes += load_optimizer_state(optimizer, checkpoint['optimizer'])
        except (OptimizerStateError, KeyError, TypeError) as e:
            raise CheckpointError(f'--resume {path!r}: its optimizer state does not fit this run ({e}); resume '
                                  'with the config it was trained with, or fine-tune with --pretrain_model_path') \
                from None
        with _damaged_entries(path, 'lr_scheduler / epoch'):
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            state.start_epoch = int(checkpoint['epoch']) + 1
        apply_hyperparameters(optimizer, lr_scheduler, config)
    elif training:
        state.notes.append('the file holds no optimizer / lr_scheduler / epoch: training starts at epoch 0 with a '
                           'fresh optimizer')
    return state
