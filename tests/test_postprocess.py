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


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='target_sizes'):
        PostProcess(num_select=3)(_outputs(), torch.tensor([100, 200]))
    with pytest.raises(ValueError, match='num_select'):
        PostProcess(num_select=0)
