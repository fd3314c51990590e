"""util/optim.py: AdamW groups in the reference's layout (checked against the reference's rule and its parameter
count), loading a saved optimizer state across layouts, and the EMA."""
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from models import build_model
from util.config import load_config
from util.optim import ModelEma, OptimizerStateError, build_adamw, load_optimizer_state, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / 'config' / 'DINO'


def reference_groups(model: nn.Module) -> list[list[str]]:
    """The reference's 'default' groups (DINO util/get_param_dicts.py), by name, of a model as the reference builds
    it: the backbones are only frozen later, inside its training epochs."""
    named = list(model.named_parameters())
    return [[n for n, p in named if 'backbone' not in n and p.requires_grad],
            [n for n, p in named if 'backbone' in n and p.requires_grad]]


def group_names(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group['params']] for group in groups]


@pytest.mark.parametrize('config,manifest', [('DINO_4scale.py', 'caff_dino_4scale_r50_llvip'),
                                             ('DINO_5scale_swin.py', 'caff_dino_5scale_swinL_llvip')])
@pytest.mark.slow
def test_groups_of_a_frozen_backbone_run_are_the_references(config, manifest, reference_manifest):
    cfg = load_config(CONFIGS / config)
    assert cfg.freeze_backbones
    with torch.device('meta'):
        frozen, _, _ = build_model(cfg)
        as_reference_builds, _, _ = build_model(load_config(CONFIGS / config, {'freeze_backbones': False}))
    groups = param_groups(frozen, cfg.lr, cfg.lr_backbone, main.reference_backbone_names(cfg))
    assert group_names(frozen, groups) == reference_groups(as_reference_builds)  # same parameters, same order
    assert [g['lr'] for g in groups] == [cfg.lr, cfg.lr_backbone]
    # the reference's optimizer holds exactly its build-time trainable parameters (counted by instantiating it)
    total = sum(p.numel() for g in groups for p in g['params'])
    assert total == reference_manifest(f'{manifest}.info.json')['n_parameters_trainable_at_build']


def test_without_freezing_the_groups_are_the_trainable_parameters(tiny_cfg):
    model, _, _ = build_model(tiny_cfg)
    groups = param_groups(model, 1e-3, 1e-4)
    assert group_names(model, groups) == reference_groups(model)
    assert main.reference_backbone_names(tiny_cfg) == set()  # CAFF_tiny trains its backbones


def test_the_backbone_group_is_kept_when_empty():
    model = nn.Sequential(nn.Linear(2, 2))
    groups = param_groups(model, 1e-3, 1e-4)
    assert len(groups) == 2 and groups[1]['params'] == [] and groups[1]['lr'] == 1e-4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.backbone = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def stepped(groups_of) -> tuple[Net, torch.optim.AdamW]:
    """A Net and an AdamW over ``groups_of(net)`` after one step (so the state holds moments)."""
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.AdamW(groups_of(net), lr=1e-3)
    net(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    return net, optimizer


def test_a_one_group_state_of_the_earlier_layout_loads_into_two_groups():
    net, old = stepped(lambda n: [{'params': list(n.head.parameters())}])  # frozen backbone left out
    fresh = Net()
    optimizer = torch.optim.AdamW(param_groups(fresh, 1e-3, 1e-4), lr=1e-3)
    notes = load_optimizer_state(optimizer, old.state_dict())
    assert notes == ['group 1 (2 parameters) is not in the file and starts fresh']
    assert torch.equal(optimizer.state[fresh.head.weight]['exp_avg'], old.state[net.head.weight]['exp_avg'])
    assert fresh.backbone.weight not in optimizer.state and optimizer.param_groups[1]['lr'] == 1e-4


def test_a_surplus_group_without_state_is_dropped_one_with_state_is_an_error():
    net, three = stepped(lambda n: [{'params': list(n.head.parameters())}, {'params': list(n.backbone.parameters())},
                                    {'params': [nn.Parameter(torch.zeros(1))]}])
    optimizer = torch.optim.AdamW(param_groups(Net(), 1e-3, 1e-4), lr=1e-3)
    assert load_optimizer_state(optimizer, three.state_dict()) == [
        'saved group 2 (1 parameters without state) dropped']
    saved = three.state_dict()
    saved['state'][4] = {'step': torch.tensor(1.0), 'exp_avg': torch.zeros(1), 'exp_avg_sq': torch.zeros(1)}
    with pytest.raises(OptimizerStateError, match='holds state'):
        load_optimizer_state(torch.optim.AdamW(param_groups(Net(), 1e-3, 1e-4), lr=1e-3), saved)


def test_group_sizes_and_state_shapes_must_fit():
    _, reordered = stepped(lambda n: [{'params': [n.head.bias, n.head.weight]},
                                      {'params': list(n.backbone.parameters())}])
    with pytest.raises(OptimizerStateError, match='parameter order differs'):
        load_optimizer_state(torch.optim.AdamW(param_groups(Net(), 1e-3, 1e-4), lr=1e-3), reordered.state_dict())
    _, one = stepped(lambda n: [{'params': list(n.parameters())}])
    with pytest.raises(OptimizerStateError, match='holds 4 parameters'):
        load_optimizer_state(torch.optim.AdamW(param_groups(Net(), 1e-3, 1e-4), lr=1e-3), one.state_dict())


def test_ema_averages_each_shared_weight_once():
    layer = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({'head': layer, 'alias': torch.nn.ModuleList([layer])})
    ema = ModelEma(model, decay=0.75)
    old = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.module['head'].weight, old + 1.0)  # 0.75 * w + 0.25 * (w + 4)
    assert ema.module['alias'][0].weight is ema.module['head'].weight
    assert not ema.module['head'].weight.requires_grad


def test_ema_update_is_the_per_tensor_formula_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2))
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(2, 3, 4, 4))  # training mode: the BatchNorm running stats and its step count change
    expected = [e.clone().mul_(0.9).add_(p, alpha=1 - 0.9) for e, p in zip(ema.module.parameters(), model.parameters())]
    ema.update(model)
    assert all(torch.equal(e, x) for e, x in zip(ema.module.parameters(), expected))
    assert all(torch.equal(e, b) for e, b in zip(ema.module.buffers(), model.buffers()))
    assert ema.module[1].num_batches_tracked.item() == 1


def test_adamw_is_fused_on_cpu_and_steps_as_the_per_tensor_loop():
    def trained(make):
        torch.manual_seed(0)
        net = Net()
        optimizer = make(param_groups(net, 1e-2, 1e-3))
        for _ in range(3):
            optimizer.zero_grad()
            net(torch.randn(4, 2)).square().sum().backward()
            optimizer.step()
        return net, optimizer

    fused_net, fused = trained(lambda groups: build_adamw(groups, 1e-2, 1e-4))
    loop_net, loop = trained(lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-4))
    assert fused.defaults['fused'] and [g['lr'] for g in fused.param_groups] == [1e-2, 1e-3]
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the saved state loads into the reference's (unfused) AdamW and back
    load_optimizer_state(loop, fused.state_dict())
    load_optimizer_state(fused, loop.state_dict())


def test_adamw_falls_back_to_the_loop_for_parameters_the_fused_kernel_does_not_take():
    assert not build_adamw([{'params': [nn.Parameter(torch.zeros(2, device='meta'))]}], 1e-3, 0.0).defaults['fused']


def test_a_fused_step_marks_the_parameters_changed_for_caches_of_derived_weights():
    """The fused kernel alone leaves the version counters as they were; DerivedTensors (the inference weights of an
    evaluation between epochs) would then return weights of before the step."""
    from models.utils import DerivedTensors

    torch.manual_seed(0)
    net = Net()
    optimizer = build_adamw(param_groups(net, 1e-2, 1e-2), 1e-2, 0.0)
    cache = DerivedTensors()
    weight = net.head.weight

    def doubled():
        with torch.no_grad():
            return cache.get('w', [weight], lambda: (weight * 2,))[0]

    before = doubled()
    net(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    assert not torch.equal(doubled(), before) and torch.equal(doubled(), weight.detach() * 2)
