"""Turn the model's normalised outputs into scored detections in pixels, the format the COCO evaluator reads.

Follows DINO's `PostProcess` (IDEA-Research/DINO `models/dino/dino.py`; CAFF-DINO uses it unchanged): one global
top-k over all (query, class) sigmoid scores of an image, so a query can give several detections with different
labels. DINO's optional NMS is here too (``nms_iou_threshold`` > 0; the reference configs set -1, off): class-agnostic
``torchvision.ops.nms`` over the top-k boxes in pixels, keeping the survivors in descending score. DINO's
``not_to_xyxy`` / ``test`` switches are left out. What differs: when num_select exceeds Q x num_classes all
Q x num_classes scores are kept (DINO's torch.topk would fail).
"""
import torch
from torch import Tensor, nn
from torchvision.ops import nms

from util.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-`num_select` detections per image.

    For logits (B, Q, C) and boxes (B, Q, 4) cxcywh in [0, 1]:
        s = sigmoid(logits).view(B, Q * C);  (scores, idx) = topk(s, k = min(num_select, Q * C))  (descending)
        query = idx // C,  label = idx % C
        box = xyxy(boxes[query]) * (w, h, w, h)      with (h, w) = target_sizes[b]
    then, with ``nms_iou_threshold`` t > 0, a detection is dropped when its box overlaps one of higher score by
    IoU > t, whatever the two labels (DINO's class-agnostic NMS); t <= 0 keeps all k.
    """

    def __init__(self, num_select: int = 300, nms_iou_threshold: float = -1.0):
        super().__init__()
        if num_select < 1:
            raise ValueError(f'PostProcess: num_select must be >= 1, got {num_select}')
        if nms_iou_threshold > 1:
            raise ValueError(f'PostProcess: nms_iou_threshold must be <= 1 (an IoU; <= 0 turns NMS off), '
                             f'got {nms_iou_threshold}')
        self.num_select = num_select
        self.nms_iou_threshold = nms_iou_threshold

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Args:
            outputs: 'pred_logits' (B, Q, C) and 'pred_boxes' (B, Q, 4) cxcywh normalised.
            target_sizes: (B, 2) as (h, w): the original image size for COCO evaluation, the transformed unpadded
                size to draw on the network input.
        Returns:
            B dicts with 'scores' (k,) descending, 'labels' (k,) int64, 'boxes' (k, 4) xyxy in pixels of
            target_sizes, k = min(num_select, Q * C), or fewer where NMS dropped some.
        """
        logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
        batch_size, _, num_classes = logits.shape
        if target_sizes.shape != (batch_size, 2):
            raise ValueError(f'PostProcess: target_sizes must have shape ({batch_size}, 2) as (h, w), one row per '
                             f'image, got {tuple(target_sizes.shape)}')
        scores = logits.sigmoid().view(batch_size, -1)
        scores, flat_idx = scores.topk(min(self.num_select, scores.shape[1]), dim=1)
        query_idx = flat_idx // num_classes
        labels = flat_idx % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(boxes).unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        results = [{'scores': s, 'labels': lab, 'boxes': b} for s, lab, b in zip(scores, labels, boxes)]
        if self.nms_iou_threshold > 0:
            results = [{k: v[nms(r['boxes'], r['scores'], self.nms_iou_threshold)] for k, v in r.items()}
                       for r in results]
        return results
