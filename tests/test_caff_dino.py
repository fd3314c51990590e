"""Tests for models/caff_dino.py on the tiny config (CPU): losses, DN, empty targets, routing, determinism, overfit."""
import copy
import math

import pytest
import torch

from models import build_model
from models.backbones.resnet import FrozenBatchNorm2d
from util.errors import InputSizeError, UserError
from util.misc import nested_tensor_from_tensor_list

SIZE = (64, 80)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny tensors gain nothing from more, and on a busy shared CPU the thread
    synchronisation of the default made a training step 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny(tiny_cfg):
    tiny_cfg.msda_backend = 'pytorch'  # nothing to compile in unit tests
    return tiny_cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def image_pair(value_rgb=0.0, value_ir=0.0, size=SIZE):
    """An RGB/IR pair whose modalities are told apart by their mean (plus small noise)."""
    rgb = value_rgb + 0.1 * torch.randn(3, *size)
    ir = value_ir + 0.1 * torch.randn(3, *size)
    return rgb, ir


def target(boxes, labels):
    return {'boxes': torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            'labels': torch.tensor(labels, dtype=torch.int64)}


def weighted_loss(criterion, outputs, targets):
    losses = criterion(outputs, targets)
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses), losses


def test_train_forward_backward_gives_finite_losses_and_dn_outputs(tiny):
    model, criterion, _ = build(tiny)
    model.train()
    pairs = [image_pair(), image_pair()]
    targets = [target([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]], [1, 2]), target([[0.4, 0.4, 0.3, 0.2]], [0])]
    outputs = model([p[0] for p in pairs], [p[1] for p in pairs], targets)
    q, c = tiny.num_queries, tiny.num_classes
    assert outputs['pred_logits'].shape == (2, q, c) and outputs['pred_boxes'].shape == (2, q, 4)
    assert len(outputs['aux_outputs']) == tiny.dec_layers - 1
    assert outputs['interm_outputs']['pred_boxes'].shape == (2, q, 4)
    assert outputs['interm_outputs_for_matching_pre']['pred_logits'].shape == (2, q, c)
    assert outputs['dn_meta'] is not None and outputs['dn_meta']['pad_size'] > 0
    assert outputs['dn_meta']['output_known_lbs_bboxes']['pred_logits'].shape[:2] == (2, outputs['dn_meta']['pad_size'])
    total, losses = weighted_loss(criterion, outputs, targets)
    assert {'loss_ce_dn', 'loss_bbox_interm', f'loss_giou_{tiny.dec_layers - 2}'} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    total.backward()
    for name in ('conv_corr', 'redim_corr', 'input_proj', 'input_proj_ir', 'label_enc', 'transformer'):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
    assert any(g.abs().sum() > 0 for g in (p.grad for p in model.conv_corr.parameters()))


def test_batch_without_objects_trains(tiny):
    model, criterion, _ = build(tiny)
    model.train()
    rgb, ir = image_pair()
    targets = [target([], []), target([], [])]
    outputs = model([rgb, rgb], [ir, ir], targets)
    assert outputs['dn_meta'] is None
    total, losses = weighted_loss(criterion, outputs, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses['loss_bbox'] == 0 and losses['loss_giou'] == 0
    total.backward()
    assert model.label_enc.weight.grad is not None


def test_batch_mixing_empty_and_annotated_images_trains(tiny):
    model, criterion, _ = build(tiny)
    model.train()
    rgb, ir = image_pair()
    targets = [target([], []), target([[0.5, 0.5, 0.2, 0.3]], [2])]
    outputs = model([rgb, rgb], [ir, ir], targets)
    assert outputs['dn_meta']['pad_size'] > 0
    total, losses = weighted_loss(criterion, outputs, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    total.backward()


def test_eval_is_deterministic_and_has_no_dn(tiny):
    model, _, postprocessors = build(tiny)
    model.eval()
    rgb, ir = image_pair()
    with torch.no_grad():
        first = model([rgb], [ir])
        second = model([rgb], [ir], [target([[0.5, 0.5, 0.2, 0.2]], [1])])  # targets do not matter in eval
    assert first['dn_meta'] is None
    assert torch.equal(first['pred_logits'], second['pred_logits'])
    assert torch.equal(first['pred_boxes'], second['pred_boxes'])
    detections = postprocessors['bbox'](first, torch.tensor([[SIZE[0], SIZE[1]]]))
    assert detections[0]['boxes'].shape == (tiny.num_select, 4)


def test_lists_and_nested_tensors_give_the_same_outputs(tiny):
    model, _, _ = build(tiny)
    model.eval()
    rgb = [torch.randn(3, 64, 80), torch.randn(3, 56, 72)]
    ir = [torch.randn(3, 64, 80), torch.randn(3, 56, 72)]
    with torch.no_grad():
        from_lists = model(rgb, ir)
        from_nested = model(nested_tensor_from_tensor_list(rgb), nested_tensor_from_tensor_list(ir))
    assert torch.equal(from_lists['pred_boxes'], from_nested['pred_boxes'])



def _randomise_frozen_norms(model):
    """Non-trivial FrozenBatchNorm2d statistics, so that folding them into the convolutions changes the weights."""
    for norm in model.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 2)


def _detections(outputs) -> dict[str, torch.Tensor]:
    """The outputs that inference uses: last layer, every auxiliary layer and the encoder proposals."""
    flat = {'pred_logits': outputs['pred_logits'], 'pred_boxes': outputs['pred_boxes']}
    for i, aux in enumerate(outputs['aux_outputs']):
        flat.update({f'aux{i}_{k}': v for k, v in aux.items()})
    flat.update({f'interm_{k}': v for k, v in outputs['interm_outputs'].items()})
    return flat


@pytest.mark.parametrize('backbone, fusion_type', [('resnet18', 'caff'), ('resnet18', 'caff_dw'),
                                                   pytest.param('resnet50', 'caff', marks=pytest.mark.slow)])
@pytest.mark.slow
def test_inference_speedups_give_the_outputs_of_the_plain_computation(tiny, backbone, fusion_type):
    """End to end, in eval mode: the inference path (folded channels-last backbone, oneDNN fused conv/linear
    kernels, fused CAFF q/k/v convolutions, cached derived weights) equals the training path, which composes
    plain PyTorch ops with autograd, in float32 and in float64, within 1e-4."""
    tiny.backbone, tiny.fusion_type = backbone, fusion_type
    model, _, _ = build(tiny)
    model.eval()
    _randomise_frozen_norms(model)
    assert any(p.requires_grad for p in model.backbone_visible.parameters())  # CAFF_tiny trains layer2-4
    plain64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(3)
    rgb, ir = torch.randn(1, 3, *SIZE, generator=gen), torch.randn(1, 3, *SIZE, generator=gen)
    with torch.inference_mode():
        fast = _detections(model(rgb, ir))
    assert len(model.backbone_visible[0]._folded) > 0  # the shortcut did run
    with torch.enable_grad():
        plain = _detections(model(rgb, ir))
        exact = _detections(plain64(rgb.double(), ir.double()))
    assert plain['pred_logits'].requires_grad and len(plain64.backbone_visible[0]._folded) == 0
    for name, want in exact.items():
        for path, got in (('inference', fast[name]), ('training', plain[name].detach())):
            torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=1e-4,
                                       msg=lambda m: f'{path} path, {name}: {m}')


@pytest.mark.parametrize('query_modality', ['ir', 'rgb'])
def test_modality_routing(tiny, query_modality):
    """'ir' (the reference): the thermal image runs through backbone_visible / input_proj (CAFF query side) and
    the RGB image through backbone_ir / input_proj_ir (key/value side); 'rgb' swaps the roles."""
    tiny.query_modality = query_modality
    model, _, _ = build(tiny)
    model.eval()
    seen = {}
    model.backbone_visible.register_forward_hook(
        lambda m, args, out: seen.__setitem__('backbone_visible', args[0].tensors.mean().item()))
    model.backbone_ir.register_forward_hook(
        lambda m, args, out: seen.__setitem__('backbone_ir', args[0].tensors.mean().item()))
    model.conv_corr[0].register_forward_hook(
        lambda m, args, out: seen.__setitem__('caff_query', args[0]))
    model.input_proj[0].register_forward_hook(lambda m, args, out: seen.__setitem__('input_proj', out))
    rgb, ir = image_pair(value_rgb=1.0, value_ir=-1.0)
    with torch.no_grad():
        model([rgb], [ir])
    query_mean, key_value_mean = (-1.0, 1.0) if query_modality == 'ir' else (1.0, -1.0)
    assert seen['backbone_visible'] == pytest.approx(query_mean, abs=0.05)
    assert seen['backbone_ir'] == pytest.approx(key_value_mean, abs=0.05)
    assert torch.equal(seen['caff_query'], seen['input_proj'])  # the same values (a channels-last map is copied)


@pytest.mark.parametrize('fusion_type,query_modality,used', [('rgb_only', 'ir', 'backbone_ir'),
                                                             ('ir_only', 'ir', 'backbone_visible'),
                                                             ('rgb_only', 'rgb', 'backbone_visible')])
def test_single_stream_fusion_runs_one_backbone(tiny, fusion_type, query_modality, used):
    tiny.fusion_type, tiny.query_modality = fusion_type, query_modality
    model, _, _ = build(tiny)
    model.eval()
    calls = []
    for name in ('backbone_visible', 'backbone_ir'):
        getattr(model, name).register_forward_hook(lambda m, args, out, name=name: calls.append(name))
    rgb, ir = image_pair()
    with torch.no_grad():
        out = model([rgb], [ir])
    assert calls == [used]
    assert torch.isfinite(out['pred_logits']).all()
    unused = 'backbone_ir' if used == 'backbone_visible' else 'backbone_visible'
    unused_proj = 'input_proj_ir' if unused == 'backbone_ir' else 'input_proj'
    assert not any(p.requires_grad for p in getattr(model, unused).parameters())
    assert not any(p.requires_grad for p in getattr(model, unused_proj).parameters())


@pytest.mark.parametrize('fusion_type', ['caff_dw', 'concat', 'add'])
def test_two_stream_types_use_and_train_both_streams(tiny, fusion_type):
    """Every two-stream type reads both images (changing either changes the detections) and the loss trains
    both input projections and the fusion layers."""
    tiny.fusion_type = fusion_type
    model, criterion, _ = build(tiny)
    model.eval()
    rgb, ir = image_pair()
    with torch.no_grad():
        base = model([rgb], [ir])['pred_logits']
        assert not torch.allclose(model([rgb + 1.0], [ir])['pred_logits'], base)
        assert not torch.allclose(model([rgb], [ir + 1.0])['pred_logits'], base)
    model.train()
    targets = [target([[0.5, 0.5, 0.2, 0.3]], [1])]
    total, _ = weighted_loss(criterion, model([rgb], [ir], targets), targets)
    total.backward()
    trained = [model.input_proj, model.input_proj_ir] + [m for m in (model.conv_corr, model.redim_corr) if m]
    for module in trained:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.slow
def test_64px_image_at_batch_size_one(tiny):
    """A 64x64 image makes the stride-64 level 1x1: the tiny config (hidden_dim 64, two values per GroupNorm
    group) runs it; with hidden_dim 32 (one value per group, which torch refuses) the error names the sizes that
    run, and one pixel more runs."""
    model = build(tiny)[0].eval()
    rgb, ir = image_pair(size=(64, 64))
    with torch.no_grad():
        assert model([rgb], [ir])['pred_logits'].shape == (1, tiny.num_queries, tiny.num_classes)
    tiny.hidden_dim = 32
    model = build(tiny)[0].eval()
    with torch.no_grad(), pytest.raises(InputSizeError, match=r'64x64 input gives a 1x1 map at the stride-64 '
                                                              r'level.*larger than 64x64 px'):
        model([rgb], [ir])
    assert issubclass(InputSizeError, UserError), 'a size the config chose: one line, exit 2'
    rgb, ir = image_pair(size=(64, 65))
    with torch.no_grad():
        assert torch.isfinite(model([rgb], [ir])['pred_logits']).all()


def test_frozen_backbones_stay_in_train_mode_as_the_reference(tiny):
    tiny.freeze_backbones = True
    model, _, _ = build(tiny)
    model.train()
    assert model.backbone_visible.training and model.backbone_ir.training
    assert not any(p.requires_grad for p in model.backbone_visible.parameters())
    assert not any(p.requires_grad for p in model.backbone_ir.parameters())
    assert all(p.requires_grad for p in model.conv_corr.parameters())


def test_heads_are_initialised_as_dino(tiny):
    model, _, _ = build(tiny)
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(model.class_embed[0].bias, torch.full_like(model.class_embed[0].bias, prior))
    assert model.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert model.input_proj[0][0].bias.abs().sum() == 0
    assert model.input_proj_ir[0][0].bias.abs().sum() > 0  # PyTorch default, as the reference


def synthetic_pairs(size=(64, 64)):
    """Two pairs with bright boxes on a dark background, same geometry in both modalities."""
    boxes = [[[0.3, 0.35, 0.3, 0.4]], [[0.6, 0.6, 0.4, 0.3], [0.25, 0.25, 0.2, 0.2]]]
    labels = [[1], [2, 0]]
    rgbs, irs, targets = [], [], []
    for image_boxes, image_labels in zip(boxes, labels):
        rgb = torch.zeros(3, *size)
        ir = torch.zeros(3, *size)
        for (cx, cy, w, h), label in zip(image_boxes, image_labels):
            y0, y1 = int((cy - h / 2) * size[0]), int((cy + h / 2) * size[0])
            x0, x1 = int((cx - w / 2) * size[1]), int((cx + w / 2) * size[1])
            rgb[label, y0:y1, x0:x1] = 2.0
            ir[:, y0:y1, x0:x1] = 1.0 + label
        rgbs.append(rgb)
        irs.append(ir)
        targets.append(target(image_boxes, image_labels))
    return rgbs, irs, targets


@pytest.mark.slow
def test_overfits_two_pairs(tiny):
    tiny.freeze_backbones = True  # faster; CAFF, projections and transformer learn
    model, criterion, _ = build(tiny)
    model.train()
    rgbs, irs, targets = synthetic_pairs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        total, _ = weighted_loss(criterion, model(rgbs, irs, targets), targets)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert min(history[-3:]) < 0.5 * history[0], history
