"""Optimiser parameter groups in the reference's layout, the AdamW over them, loading a saved optimiser state into
them, and the EMA.

Follows DINO's ``util/get_param_dicts.py`` ('default' mode, which CAFF-DINO uses) and ``util/utils.py::ModelEma``:
- two AdamW groups, built before any freezing: group 0 holds every trainable parameter whose name lacks
  ``backbone`` (at ``lr``), group 1 every trainable parameter whose name contains it (at ``lr_backbone``). The
  reference freezes both backbones later, inside each training epoch, so group 1 still lists them: they never
  get a gradient, and AdamW skips them (no update, no weight decay, no state). Here ``freeze_backbones`` freezes
  at build, so the caller names the backbone parameters the reference's group 1 would hold
  (``backbone_names``, the parameters a build without ``freeze_backbones`` leaves trainable). With the same
  model the two optimisers list the same parameters in the same order, so a state dict saved by one loads into
  the other (``--resume`` both ways);
- an exponential moving average of the weights, ``ema = decay * ema + (1 - decay) * weights``.

What differs:
- AdamW runs PyTorch's fused kernel where the parameters allow it: the same update rule in one pass over all
  parameters instead of a loop of per-tensor ops, 4x faster on CPU (a CAFF_tiny.py training step went from about
  1.5 s to 1.1 s with 1 thread); the last bit of a weight may round differently;
- group 1 is kept when it is empty (the reference does too; the previous layout here dropped it and left frozen
  parameters out, which the reference cannot load: ``load_optimizer_state`` still reads such files);
- the EMA averages parameters once each (shared heads are aliased) and copies buffers, where the reference
  averages every state-dict entry, buffers included.
"""
import copy
from typing import Iterable, Optional

import torch
from torch import nn


class OptimizerStateError(ValueError):
    """A saved optimiser state that does not fit the optimiser's groups; the message says how."""


def param_groups(model: nn.Module, lr: float, lr_backbone: float,
                 backbone_names: Optional[Iterable[str]] = None) -> list[dict]:
    """AdamW groups ``[{'params': non-backbone, 'lr': lr}, {'params': backbone, 'lr': lr_backbone}]``.

    Group 0: parameters with ``requires_grad`` whose name lacks ``backbone``. Group 1: parameters whose name
    contains ``backbone`` and that have ``requires_grad`` or are named in ``backbone_names`` (frozen by
    ``freeze_backbones`` but listed by the reference). Both in ``model.named_parameters()`` order.
    """
    listed = set(backbone_names or ())
    main, backbone = [], []
    for name, param in model.named_parameters():
        if 'backbone' not in name:
            if param.requires_grad:
                main.append(param)
        elif param.requires_grad or name in listed:
            backbone.append(param)
    return [{'params': main, 'lr': lr}, {'params': backbone, 'lr': lr_backbone}]


def build_adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``groups`` (``param_groups``), fused when every parameter is a floating-point tensor on CPU or
    CUDA (the devices whose fused kernel PyTorch ships), else the reference's per-tensor loop.

    The fused kernel updates the parameters without bumping their in-place version counters, which caches of
    tensors derived from the weights rely on (``models.utils.DerivedTensors``: the folded / fused inference
    weights an evaluation between epochs uses). A hook after every step bumps them, as the per-tensor loop's
    in-place ops do.
    """
    params = [p for group in groups for p in group['params']]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ('cpu', 'cuda') for p in params)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if fused:
        optimizer.register_step_post_hook(_mark_parameters_changed)
    return optimizer


def _mark_parameters_changed(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group['params']])


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> list[str]:
    """Load ``saved`` (an optimiser ``state_dict()``) into ``optimizer``, mapping between group layouts.

    Groups are matched in order and must hold as many parameters as the optimiser's. Where the layouts differ in
    the number of groups: a group the file lacks starts fresh, a surplus group of the file is dropped if it holds
    no state (frozen parameters never get any). Every state tensor must have its parameter's shape. Returns notes
    on what was mapped (empty when the layouts are equal); raises ``OptimizerStateError`` when it cannot fit.
    """
    own = optimizer.state_dict()
    groups, notes = [], []
    state = dict(saved.get('state', {}))
    next_id = 1 + max([i for g in saved['param_groups'] for i in g['params']], default=-1)
    for index, group in enumerate(saved['param_groups']):
        if index >= len(own['param_groups']):
            if any(i in state for i in group['params']):
                raise OptimizerStateError(f'the saved optimizer has {len(saved["param_groups"])} parameter groups, '
                                          f'this run {len(own["param_groups"])}, and its group {index} holds state')
            notes.append(f'saved group {index} ({len(group["params"])} parameters without state) dropped')
            continue
        size = len(own['param_groups'][index]['params'])
        if len(group['params']) != size:
            raise OptimizerStateError(f'saved parameter group {index} holds {len(group["params"])} parameters, this '
                                      f'run\'s {size}: the trainable parameters differ (another model, or another '
                                      'freeze_backbones / fusion_type)')
        groups.append(group)
    for index in range(len(groups), len(own['param_groups'])):
        fresh = dict(own['param_groups'][index])
        fresh['params'] = list(range(next_id, next_id + len(fresh['params'])))
        next_id += len(fresh['params'])
        groups.append(fresh)
        notes.append(f'group {index} ({len(fresh["params"])} parameters) is not in the file and starts fresh')
    params = [p for group in optimizer.param_groups for p in group['params']]
    ids = [i for group in groups for i in group['params']]
    for param, saved_id in zip(params, ids):
        for name, value in state.get(saved_id, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise OptimizerStateError(f'the saved optimizer state {name!r} of parameter {saved_id} has shape '
                                          f'{list(value.shape)}, the parameter {list(param.shape)}: the parameter '
                                          'order differs from this model')
    kept = set(ids)
    optimizer.load_state_dict({'state': {i: v for i, v in state.items() if i in kept}, 'param_groups': groups})
    return notes


class ModelEma:
    """A frozen copy of the model whose weights follow ``ema = decay * ema + (1 - decay) * model``.

    Buffers (e.g. BatchNorm statistics) are copied as they are. ``self.module`` is used for evaluation. Pass the
    unwrapped model (not the DDP wrapper).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f'ema_decay must be in (0, 1), got {decay}')
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # parameters()/buffers() visit a shared tensor once (the heads are aliased under two names in the state
        # dict), so each weight is averaged exactly once; deepcopy kept the same order and sharing.
        # The foreach ops are the per-tensor mul_ / add_ / copy_ in one call each: the same numbers, fewer calls.
        averaged = list(self.module.parameters())
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, [p.detach() for p in model.parameters()], alpha=1.0 - self.decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
