import math

import pytest
import torch

import models.criterion as criterion_module
from models.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss
from models.matcher import HungarianMatcher

NUM_CLASSES = 5
LOGGED_PER_SET = ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_xy', 'loss_hw', 'cardinality_error')


def _predictions(generator, batch, queries, requires_grad=False):
    logits = torch.randn(batch, queries, NUM_CLASSES, generator=generator).requires_grad_(requires_grad)
    boxes = (torch.rand(batch, queries, 4, generator=generator) * 0.4 + 0.1).requires_grad_(requires_grad)
    return {'pred_logits': logits, 'pred_boxes': boxes}


def _targets(generator, sizes):
    return [{'labels': torch.randint(0, NUM_CLASSES, (k,), generator=generator),
             'boxes': torch.rand(k, 4, generator=generator) * 0.4 + 0.1} for k in sizes]


def _full_outputs(generator, sizes, dec_layers=6, queries=12, num_dn_group=3, requires_grad=False):
    """Model-like outputs: last layer, dec_layers - 1 aux layers, interm, and DN groups sized for `sizes`."""
    batch = len(sizes)
    outputs = _predictions(generator, batch, queries, requires_grad)
    outputs['aux_outputs'] = [_predictions(generator, batch, queries, requires_grad) for _ in range(dec_layers - 1)]
    outputs['interm_outputs'] = _predictions(generator, batch, queries, requires_grad)
    pad_size = num_dn_group * 2 * max(max(sizes), 1)
    known = _predictions(generator, batch, pad_size, requires_grad)
    known['aux_outputs'] = [_predictions(generator, batch, pad_size, requires_grad) for _ in range(dec_layers - 1)]
    outputs['dn_meta'] = {'output_known_lbs_bboxes': known, 'num_dn_group': num_dn_group, 'pad_size': pad_size}
    return outputs


def _criterion(dec_layers=6, use_dn=True, aux_loss=True):
    weights = build_weight_dict(cls=1.0, bbox=5.0, giou=2.0, interm=1.0, dec_layers=dec_layers, use_dn=use_dn,
                                aux_loss=aux_loss)
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0, 0.25), weights, focal_alpha=0.25)


def test_sigmoid_focal_loss_formula():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=generator)
    targets = (torch.rand(2, 3, 4, generator=generator) > 0.7).float()
    alpha, gamma, num_boxes = 0.25, 2.0, 3.0
    expected = 0.0
    for x, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if y == 1:
            expected += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            expected += -(1 - alpha) * p ** gamma * math.log(1 - p)
    expected /= 3 * num_boxes  # mean over the 3 queries (dim 1), then / num_boxes
    assert float(sigmoid_focal_loss(logits, targets, num_boxes, alpha, gamma)) == pytest.approx(expected, rel=1e-5)


def test_weight_dict_matches_reference():
    weights = build_weight_dict(cls=1.0, bbox=5.0, giou=2.0, interm=1.0, dec_layers=6, use_dn=True, aux_loss=True)
    assert len(weights) == 39
    for suffix in [''] + [f'_{i}' for i in range(5)]:
        for dn in ('', '_dn'):
            name = f'{dn}{suffix}'
            assert (weights[f'loss_ce{name}'], weights[f'loss_bbox{name}'], weights[f'loss_giou{name}']) == (1, 5, 2)
    assert (weights['loss_ce_interm'], weights['loss_bbox_interm'], weights['loss_giou_interm']) == (1, 5, 2)
    half_interm = build_weight_dict(1.0, 5.0, 2.0, 0.5, 6, True, True)
    assert (half_interm['loss_ce_interm'], half_interm['loss_bbox_interm']) == (0.5, 2.5)
    assert len(build_weight_dict(1.0, 5.0, 2.0, 1.0, 6, use_dn=False, aux_loss=True)) == 3 + 5 * 3 + 3
    assert len(build_weight_dict(1.0, 5.0, 2.0, 1.0, 6, use_dn=True, aux_loss=False)) == 6 + 3


def test_loss_keys_with_dn_and_aux_are_complete_and_finite():
    generator = torch.Generator().manual_seed(1)
    criterion = _criterion()
    outputs = _full_outputs(generator, [2, 0, 3], requires_grad=True)
    losses = criterion(outputs, _targets(generator, [2, 0, 3]))
    expected = {'class_error'}
    for suffix in ['', '_interm', '_dn'] + [f'_{i}' for i in range(5)] + [f'_dn_{i}' for i in range(5)]:
        expected |= {k + suffix for k in LOGGED_PER_SET}
    assert set(losses) == expected and len(losses) == 79
    assert set(criterion.weight_dict) <= set(losses)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert losses['loss_bbox_dn'].item() > 0 and losses['loss_giou_dn_3'].item() > 0
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert torch.isfinite(outputs['pred_logits'].grad).all()
    assert outputs['dn_meta']['output_known_lbs_bboxes']['aux_outputs'][0]['pred_boxes'].grad.abs().sum() > 0


def test_without_dn_queries_dn_losses_are_zero_and_keys_stable():
    generator = torch.Generator().manual_seed(2)
    criterion = _criterion()
    outputs = _full_outputs(generator, [2, 1])
    targets = _targets(generator, [2, 1])
    with_dn = criterion(outputs, targets)
    for dn_meta in (None, {'num_dn_group': 0, 'pad_size': 0}):
        outputs['dn_meta'] = dn_meta
        without_dn = criterion(outputs, targets)
        assert set(without_dn) == set(with_dn)
        dn_keys = [k for k in without_dn if '_dn' in k]
        assert len(dn_keys) == 6 * 6
        assert all(float(without_dn[k]) == 0 for k in dn_keys)
        assert float(without_dn['loss_bbox']) == pytest.approx(float(with_dn['loss_bbox']))


def test_empty_targets_give_zero_box_and_dn_losses():
    generator = torch.Generator().manual_seed(3)
    criterion = _criterion()
    losses = criterion(_full_outputs(generator, [0, 0]), _targets(generator, [0, 0]))
    for key, value in losses.items():
        assert torch.isfinite(value), key
        if '_dn' in key or key.startswith(('loss_bbox', 'loss_giou', 'loss_xy', 'loss_hw')):
            assert float(value) == 0, key
    assert float(losses['loss_ce']) > 0 and float(losses['loss_ce_interm']) > 0


def test_perfect_prediction_has_zero_box_losses():
    targets = [{'labels': torch.tensor([1, 3]), 'boxes': torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.3, 0.4]])},
               {'labels': torch.tensor([0]), 'boxes': torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    logits = torch.full((2, 4, NUM_CLASSES), -8.0)
    boxes = torch.tensor([[0.1, 0.1, 0.05, 0.05]]).repeat(2, 4, 1)
    logits[0, 2, 1], logits[0, 0, 3], logits[1, 3, 0] = 8.0, 8.0, 8.0
    boxes[0, 2], boxes[0, 0], boxes[1, 3] = targets[0]['boxes'][0], targets[0]['boxes'][1], targets[1]['boxes'][0]
    losses = _criterion(dec_layers=1, use_dn=False)({'pred_logits': logits, 'pred_boxes': boxes}, targets)
    assert float(losses['loss_bbox']) == pytest.approx(0, abs=1e-6)
    assert float(losses['loss_giou']) == pytest.approx(0, abs=1e-6)
    assert float(losses['class_error']) == 0
    assert float(losses['loss_ce']) < 1e-3


def _offset_case(offset):
    """Every query matched (Q = K per image) and off its target by `offset` in each coordinate."""
    targets = [{'labels': torch.tensor([0, 2]), 'boxes': torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])},
               {'labels': torch.tensor([1, 4]), 'boxes': torch.tensor([[0.4, 0.6, 0.3, 0.2], [0.6, 0.3, 0.2, 0.3]])}]
    boxes = torch.stack([t['boxes'] for t in targets]) + offset
    return {'pred_logits': torch.zeros(2, 2, NUM_CLASSES), 'pred_boxes': boxes}, targets


def test_box_losses_are_normalised_by_num_boxes():
    outputs, targets = _offset_case(0.01)
    losses = _criterion(dec_layers=1, use_dn=False)(outputs, targets)
    # 4 pairs x 4 coordinates x 0.01, divided by the 4 target boxes
    assert float(losses['loss_bbox']) == pytest.approx(0.04, rel=1e-4)
    assert float(losses['loss_xy']) + float(losses['loss_hw']) == pytest.approx(0.04, rel=1e-4)


def test_num_boxes_is_averaged_over_ranks_and_clamped(monkeypatch):
    empty = [{'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}]
    assert SetCriterion.average_num_boxes(empty, torch.device('cpu')) == 1.0
    calls = []

    def fake_all_reduce(tensor):
        calls.append(float(tensor))
        tensor += 6.0  # the other rank holds 6 boxes

    monkeypatch.setattr(criterion_module, 'is_dist_avail_and_initialized', lambda: True)
    monkeypatch.setattr(criterion_module, 'get_world_size', lambda: 2)
    monkeypatch.setattr(criterion_module.torch_dist, 'all_reduce', fake_all_reduce)
    outputs, targets = _offset_case(0.01)
    assert SetCriterion.average_num_boxes(targets, torch.device('cpu')) == 5.0  # (4 + 6) / 2
    assert SetCriterion.average_num_boxes(targets, torch.device('cpu'), across_ranks=False) == 4.0
    losses = _criterion(dec_layers=1, use_dn=False)(outputs, targets)
    assert calls[-1] == 4.0
    assert float(losses['loss_bbox']) == pytest.approx(0.16 / 5, rel=1e-4)


def test_eval_losses_do_not_depend_on_the_world_size(monkeypatch):
    """In eval mode (the test_loss of evaluate) the normaliser is the batch's own box count: the same losses in a
    plain process and as one of 2 ranks whose peer holds 6 boxes, with no collective called."""
    outputs, targets = _offset_case(0.01)
    criterion = _criterion(dec_layers=1, use_dn=False).eval()
    alone = criterion(outputs, targets)
    calls = []
    monkeypatch.setattr(criterion_module, 'is_dist_avail_and_initialized', lambda: True)
    monkeypatch.setattr(criterion_module, 'get_world_size', lambda: 2)
    monkeypatch.setattr(criterion_module.torch_dist, 'all_reduce', lambda tensor: calls.append(1) or tensor.add_(6))
    in_a_group = criterion(outputs, targets)
    assert not calls
    assert float(in_a_group['loss_bbox']) == pytest.approx(0.04, rel=1e-4)
    assert all(torch.equal(in_a_group[k], alone[k]) for k in alone)
    criterion.train()
    assert float(criterion(outputs, targets)['loss_bbox']) == pytest.approx(0.16 / 5, rel=1e-4) and calls


def test_dn_indices_follow_group_layout():
    targets = [{'labels': torch.tensor([3, 1])}, {'labels': torch.zeros(0, dtype=torch.int64)},
               {'labels': torch.tensor([0, 0, 2])}]
    indices = SetCriterion.dn_indices(targets, num_groups=2, single_pad=6)
    assert indices[0][0].tolist() == [0, 1, 6, 7] and indices[0][1].tolist() == [0, 1, 0, 1]
    assert indices[1][0].tolist() == [] and indices[1][1].tolist() == []
    assert indices[2][0].tolist() == [0, 1, 2, 6, 7, 8] and indices[2][1].tolist() == [0, 1, 2, 0, 1, 2]


def test_dn_losses_supervise_positive_queries_normalised_per_group():
    generator = torch.Generator().manual_seed(4)
    sizes, groups, offset = [2, 1], 3, 0.02
    targets = _targets(generator, sizes)
    outputs = _full_outputs(generator, sizes, dec_layers=2, num_dn_group=groups)
    single_pad = outputs['dn_meta']['pad_size'] // groups
    for known in (outputs['dn_meta']['output_known_lbs_bboxes'],
                  outputs['dn_meta']['output_known_lbs_bboxes']['aux_outputs'][0]):
        for b, target in enumerate(targets):
            for g in range(groups):
                k = len(target['boxes'])
                known['pred_boxes'][b, g * single_pad:g * single_pad + k] = target['boxes'] + offset
    losses = _criterion(dec_layers=2)(outputs, targets)
    # groups x 3 pairs x 4 coordinates x offset, divided by num_boxes (3) x groups
    for key in ('loss_bbox_dn', 'loss_bbox_dn_0'):
        assert float(losses[key]) == pytest.approx(4 * offset, rel=1e-4)


def test_invalid_inputs_raise_clear_errors():
    outputs, targets = _offset_case(0.0)
    targets[1]['labels'] = torch.tensor([1, NUM_CLASSES])
    with pytest.raises(ValueError, match='num_classes'):
        _criterion(dec_layers=1)(outputs, targets)
    generator = torch.Generator().manual_seed(5)
    outputs = _full_outputs(generator, [1], dec_layers=1, num_dn_group=2)
    outputs['dn_meta']['pad_size'] = 5
    with pytest.raises(ValueError, match='multiple of num_dn_group'):
        _criterion(dec_layers=1)(outputs, _targets(generator, [1]))
