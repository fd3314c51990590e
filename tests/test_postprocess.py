import pytest
import torch

from models.postprocess import PostProcess


def _outputs():
    """Batch of 2, 4 queries, 3 classes; every logit -10 except a few chosen ones."""
    logits = torch.full((2, 4, 3), -10.0)
    logits[0, 2, 1], logits[0, 0, 2], logits[0, 2, 0] = 5.0, 4.0, 3.0
    logits[1, 3, 2], logits[1, 1, 1] = 2.0, 1.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5], [0.9, 0.9, 0.2, 0.2]])
    return {'pred_logits': logits, 'pred_boxes': boxes.repeat(2, 1, 1)}


def test_topk_over_queries_and_classes():
    results = PostProcess(num_select=3)(_outputs(), torch.tensor([[100, 200], [100, 200]]))
    first, second = results
    torch.testing.assert_close(first['scores'], torch.tensor([5.0, 4.0, 3.0]).sigmoid())
    assert first['labels'].tolist() == [1, 2, 0]
    # query 2 gives two detections (labels 1 and 0), query 0 one
    expected_boxes = torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    torch.testing.assert_close(first['boxes'], expected_boxes)
    assert second['labels'].tolist()[:2] == [2, 1]
    assert (second['scores'][:-1] >= second['scores'][1:]).all()


def test_boxes_scaled_by_width_and_height():
    outputs = {'pred_logits': torch.tensor([[[3.0]]]), 'pred_boxes': torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])}
    sizes = torch.tensor([[100, 200]])  # (h, w)
    result, = PostProcess(num_select=1)(outputs, sizes)
    torch.testing.assert_close(result['boxes'], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    assert result['labels'].dtype == torch.int64


def test_each_image_uses_its_own_size():
    outputs = _outputs()
    results = PostProcess(num_select=1)(outputs, torch.tensor([[10, 20], [1000, 500]]))
    box_q2 = torch.tensor([0.0, 0.5, 0.5, 1.0])
    torch.testing.assert_close(results[0]['boxes'][0], box_q2 * torch.tensor([20.0, 10.0, 20.0, 10.0]))
    box_q3 = torch.tensor([0.8, 0.8, 1.0, 1.0])
    torch.testing.assert_close(results[1]['boxes'][0], box_q3 * torch.tensor([500.0, 1000.0, 500.0, 1000.0]))


def test_num_select_larger_than_candidates_keeps_all():
    results = PostProcess(num_select=300)(_outputs(), torch.tensor([[100, 200], [100, 200]]))
    assert all(len(r['scores']) == 12 for r in results)


def _overlapping():
    """One image, 3 classes: query 0 (label 0, score s(4)) and query 1 (label 1, s(3)) on boxes of IoU 0.8;
    query 2 (label 0, s(2)) far from both; every other score s(-10)."""
    logits = torch.full((1, 3, 3), -10.0)
    logits[0, 0, 0], logits[0, 1, 1], logits[0, 2, 0] = 4.0, 3.0, 2.0
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.16], [0.8, 0.8, 0.2, 0.2]]])
    return {'pred_logits': logits, 'pred_boxes': boxes}


@pytest.mark.parametrize('threshold, kept', [(0.7, [4.0, 2.0]), (0.85, [4.0, 3.0, 2.0]), (-1.0, [4.0, 3.0, 2.0])])
def test_nms_is_class_agnostic_and_keeps_the_higher_score(threshold, kept):
    result, = PostProcess(num_select=3, nms_iou_threshold=threshold)(_overlapping(), torch.tensor([[100, 100]]))
    torch.testing.assert_close(result['scores'], torch.tensor(kept).sigmoid())
    assert len(result['labels']) == len(result['boxes']) == len(kept)
    assert result['labels'].tolist() == ([0, 0] if len(kept) == 2 else [0, 1, 0])


def test_nms_keeps_the_top_k_of_every_image_it_does_not_drop():
    outputs = _outputs()
    plain = PostProcess(num_select=12)(outputs, torch.tensor([[100, 200], [100, 200]]))
    suppressed = PostProcess(num_select=12, nms_iou_threshold=0.5)(outputs, torch.tensor([[100, 200], [100, 200]]))
    for before, after in zip(plain, suppressed):
        assert len(after['scores']) < len(before['scores'])  # the 3 labels of a query share its box (IoU 1)
        rows = {tuple(b.tolist()) + (s.item(), lab.item()) for s, lab, b in zip(*before.values())}
        assert all(tuple(b.tolist()) + (s.item(), lab.item()) in rows for s, lab, b in zip(*after.values()))
        assert len({tuple(b.tolist()) for b in after['boxes']}) == len(after['boxes']), 'one detection per box'


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='target_sizes'):
        PostProcess(num_select=3)(_outputs(), torch.tensor([100, 200]))
    with pytest.raises(ValueError, match='num_select'):
        PostProcess(num_select=0)
    with pytest.raises(ValueError, match='nms_iou_threshold'):
        PostProcess(num_select=3, nms_iou_threshold=1.5)
