import pytest
import torch

from util.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou


def test_conversions_are_inverse():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_conversions_keep_leading_dimensions():
    boxes = torch.rand(2, 3, 4)
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 3, 4)


def test_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(a, b)
    assert iou.shape == (1, 3)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0, 5.0]]))


def test_generalized_box_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    # Disjoint pair: IoU 0, enclosing box 3, union 2 -> -(3 - 2) / 3.
    assert torch.allclose(giou, torch.tensor([[1.0, -1 / 3]]))


def test_generalized_box_iou_is_pairwise_matrix_in_range():
    a = box_cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(3, 4) * 0.5 + 0.1)
    giou = generalized_box_iou(a, b)
    assert giou.shape == (5, 3)
    assert (giou <= 1).all() and (giou >= -1).all()
    assert torch.allclose(generalized_box_iou(a, a).diag(), torch.ones(5))
    for i in range(5):
        for j in range(3):
            assert torch.allclose(giou[i, j], generalized_box_iou(a[i:i + 1], b[j:j + 1])[0, 0])


def test_generalized_box_iou_rejects_inverted_boxes():
    with pytest.raises(ValueError, match='boxes2'):
        generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.2, 0.2]]))


def test_pairwise_measures_with_no_boxes():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert generalized_box_iou(boxes, torch.zeros(0, 4)).shape == (1, 0)
    assert box_iou(torch.zeros(0, 4), boxes)[0].shape == (0, 1)
