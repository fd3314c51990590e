"""Bounding-box conversions and pairwise overlap measures.

Follows the box utilities of DETR (facebookresearch/detr, util/box_ops.py): boxes are (..., 4) tensors either
as (cx, cy, w, h) or as corners (x0, y0, x1, y1). Every function is vectorised over all boxes; the pairwise
measures return an (N, M) matrix for (N, 4) x (M, 4) corner boxes. `masks_to_boxes` is not provided
(no segmentation in CAFF-DINO).
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2), over the last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0), over the last dimension."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area (x1 - x0) * (y1 - y0) of corner boxes (..., 4) -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection over union of corner boxes.

    Args:
        boxes1: (N, 4) xyxy. boxes2: (M, 4) xyxy.
    Returns:
        iou (N, M) = |A ∩ B| / |A ∪ B| and union (N, M) = |A| + |B| - |A ∩ B|.
        A pair of zero-area boxes gives 0/0 = nan, as in DETR; callers pass non-degenerate boxes.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of corner boxes.

    GIoU(A, B) = IoU(A, B) - (|C| - |A ∪ B|) / |C|, with C the smallest box enclosing A and B; values in [-1, 1].

    Args:
        boxes1: (N, 4) xyxy with x1 >= x0, y1 >= y0. boxes2: (M, 4) xyxy, same condition.
    Returns:
        (N, M) tensor.
    Raises:
        ValueError if a box has x1 < x0 or y1 < y0 (usually cxcywh boxes passed without conversion).
    """
    for name, boxes in (('boxes1', boxes1), ('boxes2', boxes2)):
        if not (boxes[:, 2:] >= boxes[:, :2]).all():
            raise ValueError(f'generalized_box_iou: {name} has boxes with x1 < x0 or y1 < y0; '
                             'pass corner (xyxy) boxes, e.g. box_cxcywh_to_xyxy(boxes)')
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
