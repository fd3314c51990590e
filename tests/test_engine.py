"""engine.py with the real tiny CAFF-DINO: a training epoch updates the model, evaluation gives COCO numbers and a
results file, non-finite outputs or loss stop before the criterion / the step, a bad batch is a one-line user error,
AMP trains on CPU in bf16 and in fp16 with a GradScaler while MSDeformAttn computes in fp32, EMA averages."""
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datasets import build_dataset
from datasets.synthetic import generate_synthetic_dataset
from engine import (NonFiniteLossError, amp_autocast_dtype, amp_grad_scaler, evaluate, non_finite_outputs,
                    train_one_epoch, weighted_loss)
from models import build_model
from models.ops import ms_deform_attn_layer
from util.config import load_config
from util.errors import DataError, report_user_error
from util.misc import collate_fn
from util.optim import ModelEma, build_adamw, param_groups
from util.rng import seed_everything

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tiny_run_options):
    root = str(tmp_path_factory.mktemp('synthetic'))
    generate_synthetic_dataset(root, num_train=4, num_val=2, width=128, height=96)
    cfg = load_config(REPO / 'config/DINO/CAFF_tiny.py', [*tiny_run_options, f'coco_path={root!r}'])
    train_set, val_set = build_dataset('train', cfg), build_dataset('val', cfg)
    train_loader = DataLoader(train_set, batch_size=2, shuffle=False, collate_fn=collate_fn)
    val_loader = DataLoader(val_set, batch_size=1, shuffle=False, collate_fn=collate_fn)
    return cfg, train_loader, val_loader, val_set.coco


def build(cfg):
    seed_everything(0)
    model, criterion, postprocessors = build_model(cfg)
    optimizer = build_adamw(param_groups(model, cfg.lr, cfg.lr_backbone), cfg.lr, cfg.weight_decay)  # as main.py
    return model, criterion, postprocessors, optimizer


def test_weighted_loss_uses_only_weighted_terms():
    losses = {'loss_ce': torch.tensor(2.0), 'loss_bbox': torch.tensor(1.0), 'cardinality_error': torch.tensor(9.0)}
    assert weighted_loss(losses, {'loss_ce': 0.5, 'loss_bbox': 5.0}).item() == pytest.approx(6.0)


@pytest.mark.slow
def test_one_epoch_updates_the_model_and_returns_finite_averages(setup):
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch=0,
                            clip_max_norm=cfg.clip_max_norm, print_freq=100)
    assert {'loss', 'loss_ce', 'loss_bbox', 'loss_giou', 'loss_ce_unscaled', 'lr'} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats['lr'] == pytest.approx(cfg.lr)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith('conv_corr') for k in changed) and any(k.startswith('transformer') for k in changed)


@pytest.mark.slow
def test_non_finite_loss_names_epoch_step_and_terms(setup):
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    real_forward = criterion.forward

    def nan_loss(outputs, targets):
        losses = real_forward(outputs, targets)
        losses['loss_giou'] = losses['loss_giou'] * float('nan')
        return losses

    criterion.forward = nan_loss
    before = model.state_dict()['class_embed.0.bias'].clone()
    with pytest.raises(NonFiniteLossError, match=r'epoch 3, step 0.*loss_giou=nan'):
        train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch=3, print_freq=100)
    assert torch.equal(model.state_dict()['class_embed.0.bias'], before), 'no step with a NaN loss'


@pytest.mark.slow
def test_evaluate_gives_coco_stats_and_writes_detections(setup, tmp_path):
    cfg, _, val_loader, base_ds = setup
    model, criterion, postprocessors, _ = build(cfg)
    stats, evaluator = evaluate(model, criterion, postprocessors, val_loader, base_ds, torch.device('cpu'),
                                str(tmp_path), print_freq=100)
    assert len(stats['coco_eval_bbox']) == 12 and math.isfinite(stats['loss'])
    assert set(stats['coco_eval_per_class']) <= {'person', 'car'}
    rows = json.loads((tmp_path / 'detections_bbox.json').read_text())
    assert len(rows) == 2 * cfg.num_select
    assert {r['image_id'] for r in rows} == set(base_ds.getImgIds())
    again, _ = evaluate(model, criterion, postprocessors, val_loader, base_ds, torch.device('cpu'), print_freq=100)
    assert again['coco_eval_bbox'] == stats['coco_eval_bbox']


def _record_msda_calls(monkeypatch) -> list[dict]:
    """Wrap the op the MSDeformAttn layers call: per call, the input dtypes, whether autocast was on, and whether
    the output equals the op run in float32 outside autocast on the same inputs, rounded to the output dtype."""
    calls = []
    real_op = ms_deform_attn_layer.ms_deform_attn

    def recording_op(value, shapes, starts, locations, weights, *args, **kwargs):
        out = real_op(value, shapes, starts, locations, weights, *args, **kwargs)
        with torch.no_grad(), torch.autocast('cpu', enabled=False):
            in_fp32 = real_op(value.float(), shapes, starts, locations.float(), weights.float(), *args, **kwargs)
        calls.append({'autocast': torch.is_autocast_enabled('cpu'), 'value': value.dtype, 'out': out.dtype,
                      'computed_in_fp32': torch.equal(out, in_fp32.to(out.dtype))})
        return out

    monkeypatch.setattr(ms_deform_attn_layer, 'ms_deform_attn', recording_op)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize('amp_dtype, dtype', [('bfloat16', torch.bfloat16), ('float16', torch.float16)])
def test_amp_on_cpu_trains_with_finite_loss_and_msda_in_fp32(setup, monkeypatch, amp_dtype, dtype):
    """A full training epoch (2 steps) under CPU autocast; float16 with a GradScaler, as on CUDA."""
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    device = torch.device('cpu')
    scaler = amp_grad_scaler(device, True, amp_dtype)
    assert (scaler is not None) == (dtype == torch.float16)
    if scaler is not None:  # the default scale 2**16 overflows fp16 gradients of this loss (~40): the scaler would
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)  # skip both steps while it backs off
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _record_msda_calls(monkeypatch)
    stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch=0, clip_max_norm=0.1, amp=True,
                            scaler=scaler, print_freq=100, amp_dtype=amp_dtype)
    assert all(math.isfinite(v) for v in stats.values())
    assert calls and all(c['autocast'] and c['value'] == dtype and c['out'] == dtype for c in calls)
    assert all(c['computed_in_fp32'] for c in calls)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith('transformer') for k in changed), 'no optimizer step was taken'
    if scaler is not None:
        assert scaler.get_scale() == 2.0 ** 8, 'a step found an inf gradient and was skipped'


def test_amp_dtype_auto_is_float16_with_a_scaler_on_cuda_and_bfloat16_on_cpu():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert amp_autocast_dtype(cpu) == torch.bfloat16 and amp_autocast_dtype(cuda) == torch.float16
    assert amp_autocast_dtype(cuda, 'bfloat16') == torch.bfloat16
    assert amp_grad_scaler(cpu, True) is None and amp_grad_scaler(cpu, False, 'float16') is None
    assert amp_grad_scaler(cuda, True, 'bfloat16') is None
    with pytest.raises(ValueError, match="amp_dtype must be one of.*'half'"):
        amp_autocast_dtype(cpu, 'half')


@pytest.mark.slow
def test_train_one_epoch_updates_the_ema(setup):
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    ema = ModelEma(model, decay=0.5)
    start = model.class_embed[0].bias.detach().clone()
    train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch=0, ema=ema,
                    print_freq=100)
    ema_bias = ema.module.class_embed[0].bias
    assert not torch.equal(ema_bias, start) and not torch.equal(ema_bias, model.class_embed[0].bias)


@pytest.mark.slow
def test_nan_weights_stop_before_the_criterion_sees_the_outputs(setup):
    """A diverged weight makes every output NaN; the matcher and the DN box loss (generalized_box_iou) would raise
    a ValueError on them, so the check must come first and name the outputs."""
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    with torch.no_grad():
        model.transformer.level_embed.fill_(float('nan'))
    calls = []
    real_forward = criterion.forward
    criterion.forward = lambda outputs, targets: calls.append(1) or real_forward(outputs, targets)
    with pytest.raises(NonFiniteLossError, match=r"outputs are not finite at epoch 2, step 0 .*pred_logits"):
        train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch=2, print_freq=100)
    assert not calls, 'the criterion ran on non-finite outputs'


def test_non_finite_outputs_names_nested_tensors():
    outputs = {'pred_boxes': torch.zeros(1, 2, 4), 'aux_outputs': [{'pred_logits': torch.tensor([1.0, float('inf')])}],
               'dn_meta': {'pad_size': 4, 'output_known_lbs_bboxes': {'pred_boxes': torch.tensor([float('nan')])}},
               'labels': torch.tensor([1, 2])}
    assert non_finite_outputs(outputs) == ["outputs['aux_outputs'][0]['pred_logits']",
                                           "outputs['dn_meta']['output_known_lbs_bboxes']['pred_boxes']"]
    assert non_finite_outputs({'pred_boxes': torch.ones(2, 4)}) == []


@pytest.mark.slow
def test_infinite_gradient_stops_before_the_optimizer_step(setup):
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    model.class_embed[0].bias.register_hook(lambda grad: grad * float('inf'))
    before = model.state_dict()['transformer.level_embed'].clone()
    with pytest.raises(NonFiniteLossError, match=r'gradient norm is (inf|nan) at epoch 0, step 0'):
        train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch=0, clip_max_norm=0.1,
                        print_freq=100)
    assert torch.equal(model.state_dict()['transformer.level_embed'], before), 'no step with an infinite gradient'


class _BadSecondItem(torch.utils.data.Dataset):
    """Two items of a real data set; the second one raises the data error a broken image file would."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 1:
            raise DataError('/data/visible/000002.png: unreadable or corrupt image')
        return self.dataset[index]


@pytest.mark.slow
def test_a_data_error_in_a_worker_stays_a_one_line_user_error(setup):
    cfg, train_loader, _, _ = setup
    model, criterion, _, optimizer = build(cfg)
    loader = DataLoader(_BadSecondItem(train_loader.dataset), batch_size=1, collate_fn=collate_fn, num_workers=1)
    with pytest.raises(DataError) as info:
        train_one_epoch(model, criterion, loader, optimizer, torch.device('cpu'), epoch=0, print_freq=100)
    assert 'Traceback' in str(info.value), 'torch re-raises it with the worker traceback'
    report = io.StringIO()
    report_user_error(info.value, file=report)
    assert report.getvalue() == 'error: /data/visible/000002.png: unreadable or corrupt image\n'
