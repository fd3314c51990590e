"""util/training_checkpoint.py: the checkpoint dict round trip, resume with a changed config, and checkpoints moving
between this project and the reference (CAFF-DINO main.py) in both directions.

The reference side is written here from its rules, not from our save: its model is built with the backbones
trainable (it freezes them later, in each training epoch, by first name component), its AdamW takes DINO's
'default' groups (``util/get_param_dicts.py``: no-'backbone' parameters, then 'backbone' parameters at
``lr_backbone``, both filtered by ``requires_grad`` at that point), StepLR(``lr_drop``); it saves
``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`` with plain ``torch.save``, and its ``--resume``
loads ``model`` strictly, then ``optimizer`` and ``lr_scheduler`` and sets ``start_epoch = epoch + 1`` when all
three are there.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from datasets.synthetic import generate_synthetic_dataset
from models import build_model
from util.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from util.config import load_config
from util.misc import nested_tensor_from_tensor_list
from util.optim import param_groups
from util.rng import seed_everything
from util.training_checkpoint import (Best, apply_hyperparameters, build_training_checkpoint, resume_training,
                                      saved_config)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_FROZEN = ('backbone_visible', 'backbone', 'backbone_ir')  # first name components the reference freezes


# ------------------------------------------------------------------------------ small model, the dict itself

class Net(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.class_embed = nn.Linear(8, num_classes)


HYPER = {'lr': 1e-3, 'lr_backbone': 1e-4, 'weight_decay': 1e-4, 'lr_drop': 1, 'epochs': 6}


def trained_net(hyper=HYPER):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(param_groups(model, hyper['lr'], hyper['lr_backbone']), lr=hyper['lr'],
                                  weight_decay=hyper['weight_decay'])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hyper['lr_drop'])
    model.class_embed(model.backbone(torch.randn(2, 4))).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def fresh_net(hyper=HYPER):
    model = Net()
    optimizer = torch.optim.AdamW(param_groups(model, hyper['lr'], hyper['lr_backbone']), lr=hyper['lr'],
                                  weight_decay=hyper['weight_decay'])
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, hyper['lr_drop'])


def test_the_dict_round_trips_model_optimizer_scheduler_epoch_and_best(tmp_path):
    model, optimizer, scheduler = trained_net()
    path = str(tmp_path / 'checkpoint.pth')
    best = Best(metric=0.5, epoch=3, ema_metric=0.25, ema_epoch=2)
    save_checkpoint(build_training_checkpoint(model, optimizer, scheduler, 4, dict(HYPER), best, ['rng']), path)
    fresh, fresh_opt, fresh_sched = fresh_net()
    state = resume_training(path, fresh, dict(HYPER), fresh_opt, fresh_sched)
    assert (state.start_epoch, state.best, state.rng_state, state.changes) == (5, best, ['rng'], [])
    assert torch.equal(fresh.backbone.weight, model.backbone.weight)
    assert fresh_sched.last_epoch == 1 and fresh_opt.param_groups[0]['lr'] == optimizer.param_groups[0]['lr']
    assert torch.equal(fresh_opt.state_dict()['state'][0]['exp_avg'], optimizer.state_dict()['state'][0]['exp_avg'])


def test_eval_restores_the_weights_only(tmp_path):
    model, optimizer, scheduler = trained_net()
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint(build_training_checkpoint(model, optimizer, scheduler, 4, dict(HYPER), Best(), None), path)
    fresh = Net()
    state = resume_training(path, fresh, dict(HYPER))
    assert state.start_epoch == 0 and torch.equal(fresh.class_embed.bias, model.class_embed.bias)


def test_resume_into_another_architecture_is_a_checkpoint_error(tmp_path):
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'model': Net(num_classes=5).state_dict(), 'epoch': 0}, path)
    with pytest.raises(CheckpointError, match='--pretrain_model_path'):
        resume_training(path, Net(num_classes=3), dict(HYPER))


def test_a_changed_config_is_applied_over_the_restored_state_and_listed(tmp_path):
    model, optimizer, scheduler = trained_net()  # one epoch done: StepLR(1) has dropped once
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint(build_training_checkpoint(model, optimizer, scheduler, 0, dict(HYPER), Best(), None), path)
    new = {**HYPER, 'lr': 2e-3, 'lr_drop': 3, 'weight_decay': 0.05, 'epochs': 9}
    fresh, fresh_opt, fresh_sched = fresh_net()
    state = resume_training(path, fresh, new, fresh_opt, fresh_sched)
    assert state.changes == ['lr: 0.001 -> 0.002', 'weight_decay: 0.0001 -> 0.05', 'lr_drop: 1 -> 3',
                             'epochs: 6 -> 9']
    # epoch 1 of StepLR(3) has not dropped yet: the new base rates themselves
    assert [g['lr'] for g in fresh_opt.param_groups] == [2e-3, 1e-4]
    assert [g['weight_decay'] for g in fresh_opt.param_groups] == [0.05, 0.05]
    for _ in range(2):
        fresh_sched.step()
    assert fresh_sched.last_epoch == 3 and [g['lr'] for g in fresh_opt.param_groups] == pytest.approx([2e-4, 1e-5])


def test_an_unchanged_config_keeps_the_restored_rates_bit_for_bit():
    model, optimizer, scheduler = trained_net()
    for _ in range(3):
        scheduler.step()  # four drops: the chained rate differs from lr * 0.1 ** 4 in the last bits
    rates = [g['lr'] for g in optimizer.param_groups]
    apply_hyperparameters(optimizer, scheduler, dict(HYPER))
    assert [g['lr'] for g in optimizer.param_groups] == rates


def test_the_saved_config_is_ours_or_the_references_args():
    assert saved_config({'config': {'lr': 1.0}}) == {'lr': 1.0}
    assert saved_config({'args': argparse.Namespace(lr=2.0)}) == {'lr': 2.0}
    assert saved_config({'model': {}}) == {}


# ----------------------------------------------------------------------- the reference's layout, both ways

@pytest.fixture
def frozen_cfg(tiny_run_options):
    """The tiny config with the reference's frozen backbones."""
    return load_config(REPO / 'config/DINO/CAFF_tiny.py', [*tiny_run_options, 'freeze_backbones=True'])


def reference_run(cfg):
    """Model, AdamW and StepLR set up as the reference's main.py does (backbones frozen only afterwards)."""
    model, criterion, _ = build_model(load_config(REPO / 'config/DINO/CAFF_tiny.py',
                                                  {**cfg.to_dict(), 'freeze_backbones': False}))
    named = list(model.named_parameters())
    groups = [{'params': [p for n, p in named if 'backbone' not in n and p.requires_grad]},
              {'params': [p for n, p in named if 'backbone' in n and p.requires_grad], 'lr': cfg.lr_backbone}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    for name, param in model.named_parameters():  # its train_one_epoch, every epoch
        if name.split('.')[0] in REFERENCE_FROZEN:
            param.requires_grad = False
    return model, criterion, optimizer, scheduler


def our_run(cfg):
    model, criterion, _ = build_model(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.lr_backbone, main.reference_backbone_names(cfg)),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, criterion, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)


def train_step(model, criterion, optimizer) -> None:
    """One AdamW step on two random 96 x 128 pairs with one box each."""
    images = [torch.rand(3, 96, 128) for _ in range(2)]
    rgb, ir = nested_tensor_from_tensor_list(images), nested_tensor_from_tensor_list([i.flip(0) for i in images])
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.3, 0.4]])} for _ in range(2)]
    model.train()
    losses = criterion(model(rgb, ir, targets), targets)
    optimizer.zero_grad()
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    optimizer.step()


def moments_by_name(model, optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: s['exp_avg'] for p, s in optimizer.state.items()}


def write_reference_checkpoint(cfg, path: Path):
    """One reference training step and epoch, saved as the reference saves; returns its model and optimizer."""
    seed_everything(0)
    ref_model, criterion, ref_opt, ref_sched = reference_run(cfg)
    train_step(ref_model, criterion, ref_opt)
    ref_sched.step()
    torch.save({'model': ref_model.state_dict(), 'optimizer': ref_opt.state_dict(),
                'lr_scheduler': ref_sched.state_dict(), 'epoch': 0, 'args': argparse.Namespace(**cfg.to_dict())},
               path)
    return ref_model, ref_opt


@pytest.mark.slow
def test_a_reference_training_checkpoint_resumes_here(tmp_path, frozen_cfg):
    path = tmp_path / 'reference_checkpoint.pth'
    ref_model, ref_opt = write_reference_checkpoint(frozen_cfg, path)

    model, criterion, optimizer, scheduler = our_run(frozen_cfg)
    state = resume_training(str(path), model, frozen_cfg.to_dict(), optimizer, scheduler)
    assert state.start_epoch == 1 and state.changes == [] and state.notes == []
    expected = moments_by_name(ref_model, ref_opt)
    got = moments_by_name(model, optimizer)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert not any(k.startswith(('backbone_visible', 'backbone_ir')) for k in got)  # frozen: no state
    train_step(model, criterion, optimizer)  # and training continues


@pytest.mark.slow
def test_the_reference_resumes_a_checkpoint_written_here(tmp_path, frozen_cfg):
    seed_everything(0)
    model, criterion, optimizer, scheduler = our_run(frozen_cfg)
    train_step(model, criterion, optimizer)
    scheduler.step()
    path = tmp_path / 'checkpoint.pth'
    save_checkpoint(build_training_checkpoint(model, optimizer, scheduler, 0, frozen_cfg.to_dict(), Best(), None),
                    str(path))

    checkpoint = torch.load(path, map_location='cpu')  # the reference's own load (weights-only on torch >= 2.6)
    ref_model, criterion, ref_opt, ref_sched = reference_run(frozen_cfg)
    ref_model.load_state_dict(checkpoint['model'])  # strict, as in the reference
    assert all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch'))
    ref_opt.load_state_dict(checkpoint['optimizer'])
    ref_sched.load_state_dict(checkpoint['lr_scheduler'])
    assert checkpoint['epoch'] + 1 == 1
    expected = moments_by_name(model, optimizer)
    got = moments_by_name(ref_model, ref_opt)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    train_step(ref_model, criterion, ref_opt)


@pytest.mark.slow
def test_main_resume_of_a_reference_checkpoint_continues_training(tmp_path, frozen_cfg, tiny_run_options):
    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=4, num_val=2, width=128, height=96)
    path = tmp_path / 'reference_checkpoint.pth'
    write_reference_checkpoint(frozen_cfg, path)
    out = tmp_path / 'out'
    argv = ['-c', str(REPO / 'config/DINO/CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
            '--resume', str(path), '--options', *tiny_run_options, 'freeze_backbones=True', 'epochs=2']
    assert main.main(argv) == 0
    (record,) = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert record['epoch'] == 1
    saved = load_checkpoint(str(out / 'checkpoint.pth'))
    steps = {int(s['step']) for s in saved['optimizer']['state'].values()}
    assert steps == {1 + 2}, 'the restored AdamW state went on counting (1 reference step + 2 steps here)'
