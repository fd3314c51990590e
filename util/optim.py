"""Optimiser parameter groups and the model EMA used by the training loop.

Follows DINO's ``util/get_param_dicts.py`` ('default' mode) and ``util/utils.py::ModelEma``:
- two AdamW groups: parameters whose name contains ``backbone`` train at ``lr_backbone``, the rest at ``lr``;
- an exponential moving average of the weights, ``ema = decay * ema + (1 - decay) * weights``.

What differs: frozen parameters (``requires_grad=False``, e.g. both backbones with ``freeze_backbones``) are left
out of the optimiser instead of sitting in it without gradients; the update is the same (AdamW skips parameters
without ``.grad``), and an optimiser state dict of a frozen-backbone run therefore lists only trained tensors.
"""
import copy

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict]:
    """AdamW groups ``[{'params': non-backbone, 'lr': lr}, {'params': backbone, 'lr': lr_backbone}]``.

    Only parameters with ``requires_grad`` are listed; an empty backbone group is dropped.
    """
    main, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if 'backbone' in name else main).append(param)
    groups = [{'params': main, 'lr': lr}]
    if backbone:
        groups.append({'params': backbone, 'lr': lr_backbone})
    return groups


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
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
