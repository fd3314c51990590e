"""How pretrained weights initialise a CAFF-DINO: ``--pretrain_model_coco`` (a mono-spectral DINO) and
``--pretrain_model_path`` (a CAFF-DINO), with ``--finetune_ignore``.

Follows CAFF-DETR ``main.py`` (its two inline blocks). The file is read by ``util.checkpoint.load_checkpoint``
(weights-only), the keys are renamed by ``models/checkpoint_keys.py`` (DINO -> CAFF rule table), and
``util.checkpoint.load_partial_state_dict`` loads what fits and reports the rest. What differs from the reference:
- tensors of another shape are skipped and reported (the reference raises a size mismatch unless
  ``--finetune_ignore`` names them);
- a checkpoint passed to the wrong flag is a one-line error that says which flag fits it: a CAFF-DINO checkpoint
  given to ``--pretrain_model_coco`` (the reference would copy the matching keys and leave both backbones at
  their initialisation), a mono-spectral DINO one given to ``--pretrain_model_path``;
- a file of which no tensor fits the model is an error, not a silent fresh initialisation.
"""
from torch import nn

from util.checkpoint import CheckpointError, LoadReport, load_checkpoint, load_partial_state_dict, strip_module_prefix

from .checkpoint_keys import checkpoint_kind, map_dino_to_caff


def _nothing_loaded(report: LoadReport, flag: str, path: str) -> None:
    if not report.loaded:
        raise CheckpointError(f'{flag} {path!r}: no tensor of it fits this model ({len(report.skipped_shape)} of '
                              f'another shape, {len(report.unexpected)} unknown keys, {len(report.ignored)} left out '
                              'by --finetune_ignore); was it saved for another architecture? Check the file, the '
                              'config and --finetune_ignore')


def load_pretrained_coco(model: nn.Module, path: str, ignore=(), allow_unsafe: bool = False) -> LoadReport:
    """``--pretrain_model_coco``: initialise both branches from a mono-spectral DINO checkpoint.

    The key mapping (``backbone.*`` -> both backbones, ``input_proj.*`` -> both projections, the rest unchanged)
    is ``map_dino_to_caff``; the fusion (``conv_corr``, ``redim_corr``) keeps its fresh initialisation. Raises
    ``CheckpointError`` for a CAFF-DINO checkpoint (use ``--pretrain_model_path``) or one that loads nothing.
    """
    state = strip_module_prefix(load_checkpoint(path, allow_unsafe)['model'])
    if checkpoint_kind(state) == 'caff':
        raise CheckpointError(f'--pretrain_model_coco {path!r} is a CAFF-DINO checkpoint (it has two-stream / fusion '
                              'keys such as backbone_ir.* or conv_corr.*), not a mono-spectral DINO one: pass it with '
                              '--pretrain_model_path to fine-tune from it, or --resume to continue its training')
    report = load_partial_state_dict(model, map_dino_to_caff(state), ignore, source=f'--pretrain_model_coco {path}')
    _nothing_loaded(report, '--pretrain_model_coco', path)
    return report


def load_pretrained_caff(model: nn.Module, path: str, ignore=(), allow_unsafe: bool = False) -> LoadReport:
    """``--pretrain_model_path``: initialise from a CAFF-DINO checkpoint; shape mismatches are skipped.

    Raises ``CheckpointError`` for a mono-spectral DINO checkpoint (use ``--pretrain_model_coco``) or one that
    loads nothing.
    """
    state = load_checkpoint(path, allow_unsafe)['model']
    if checkpoint_kind(state) == 'dino':
        raise CheckpointError(f'--pretrain_model_path {path!r} is a mono-spectral DINO checkpoint (one backbone.*, no '
                              'backbone_visible.* / backbone_ir.*): pass it with --pretrain_model_coco, which copies '
                              'its backbone into both streams')
    report = load_partial_state_dict(model, state, ignore, source=f'--pretrain_model_path {path}')
    _nothing_loaded(report, '--pretrain_model_path', path)
    return report
