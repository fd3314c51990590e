import itertools
import math

import pytest
import torch

from models.matcher import HungarianMatcher


def _giou_cxcywh(a, b):
    """Scalar GIoU of two cxcywh boxes, written out independently of util.box_ops."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logits_q, box_q, label, box_t, w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25):
    p = 1 / (1 + math.exp(-float(logits_q[label])))
    pos = alpha * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = (1 - alpha) * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(float(x) - float(y)) for x, y in zip(box_q, box_t))
    return w_class * (pos - neg) + w_bbox * l1 - w_giou * _giou_cxcywh(box_q.tolist(), box_t.tolist())


def _random_case(generator, num_queries, num_targets, num_classes=4):
    outputs = {'pred_logits': torch.randn(1, num_queries, num_classes, generator=generator),
               'pred_boxes': torch.rand(1, num_queries, 4, generator=generator) * 0.4 + 0.1}
    target = {'labels': torch.randint(0, num_classes, (num_targets,), generator=generator),
              'boxes': torch.rand(num_targets, 4, generator=generator) * 0.4 + 0.1}
    return outputs, target


def _brute_force(outputs, target):
    """Minimum total cost over all one-to-one assignments, and the set of (query, target) pairs achieving it."""
    logits, boxes = outputs['pred_logits'][0], outputs['pred_boxes'][0]
    num_queries, num_targets = len(boxes), len(target['labels'])
    cost = [[_pair_cost(logits[q], boxes[q], int(target['labels'][t]), target['boxes'][t])
             for t in range(num_targets)] for q in range(num_queries)]
    best, best_pairs = math.inf, None
    if num_queries >= num_targets:
        for queries in itertools.permutations(range(num_queries), num_targets):
            total = sum(cost[q][t] for t, q in enumerate(queries))
            if total < best:
                best, best_pairs = total, {(q, t) for t, q in enumerate(queries)}
    else:
        for tgts in itertools.permutations(range(num_targets), num_queries):
            total = sum(cost[q][t] for q, t in enumerate(tgts))
            if total < best:
                best, best_pairs = total, {(q, t) for q, t in enumerate(tgts)}
    return best, best_pairs, cost


@pytest.mark.parametrize('num_queries,num_targets', [(5, 3), (4, 4), (2, 3), (6, 1)])
def test_matcher_equals_brute_force(num_queries, num_targets):
    generator = torch.Generator().manual_seed(num_queries * 10 + num_targets)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25)
    for _ in range(3):
        outputs, target = _random_case(generator, num_queries, num_targets)
        (query_idx, target_idx), = matcher(outputs, [target])
        best, best_pairs, cost = _brute_force(outputs, target)
        pairs = set(zip(query_idx.tolist(), target_idx.tolist()))
        assert len(pairs) == min(num_queries, num_targets)
        assert sum(cost[q][t] for q, t in pairs) == pytest.approx(best, rel=1e-5, abs=1e-5)
        assert pairs == best_pairs


def test_pairwise_cost_matches_formula():
    generator = torch.Generator().manual_seed(3)
    outputs, target = _random_case(generator, 3, 2)
    matcher = HungarianMatcher()
    cost = matcher.pairwise_cost(outputs['pred_logits'][0], outputs['pred_boxes'][0], target['labels'],
                                 target['boxes'])
    _, _, expected = _brute_force(outputs, target)
    torch.testing.assert_close(cost, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_batched_matching_equals_per_image_matching():
    generator = torch.Generator().manual_seed(7)
    sizes = [2, 0, 4, 1]
    outputs = {'pred_logits': torch.randn(len(sizes), 6, 5, generator=generator),
               'pred_boxes': torch.rand(len(sizes), 6, 4, generator=generator) * 0.5 + 0.1}
    targets = [{'labels': torch.randint(0, 5, (k,), generator=generator),
                'boxes': torch.rand(k, 4, generator=generator) * 0.5 + 0.1} for k in sizes]
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single, = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == sizes[i]
        assert batched[i][0].dtype == torch.int64 and batched[i][1].dtype == torch.int64


def test_empty_targets_give_empty_indices():
    outputs = {'pred_logits': torch.randn(2, 5, 3), 'pred_boxes': torch.rand(2, 5, 4) * 0.5 + 0.1}
    empty = {'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}
    indices = HungarianMatcher()(outputs, [empty, empty])
    assert len(indices) == 2
    for query_idx, target_idx in indices:
        assert query_idx.shape == (0,) and target_idx.shape == (0,)
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64


def test_nan_predictions_raise_clear_error():
    outputs = {'pred_logits': torch.randn(1, 4, 3), 'pred_boxes': torch.rand(1, 4, 4) * 0.5 + 0.1}
    outputs['pred_logits'][0, 2, 1] = float('nan')
    target = {'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match='NaN'):
        HungarianMatcher()(outputs, [target])


def test_target_count_must_match_batch():
    outputs = {'pred_logits': torch.randn(2, 4, 3), 'pred_boxes': torch.rand(2, 4, 4)}
    target = {'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match='one target dict per image'):
        HungarianMatcher()(outputs, [target])


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match='all 0'):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
