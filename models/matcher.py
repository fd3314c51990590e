"""One-to-one (Hungarian) assignment of predicted queries to ground-truth boxes.

Follows DINO (IDEA-Research/DINO `models/dino/matcher.py`, which is Deformable DETR's focal-cost variant of
facebookresearch/detr `models/matcher.py`): the cost of every (query, target) pair of the whole batch is computed
in one pass, then `scipy.optimize.linear_sum_assignment` solves each image on its own block. The numbers are
DINO's. What differs:
- non-finite predictions or costs raise a ValueError that says so (DINO has a `match_unstable_error` option
  that no code reads; scipy alone fails with "matrix contains invalid numeric entries");
- the costs are computed in float32 even when the model runs under autocast (the 1e-8 of the focal cost is
  below float16 resolution);
- a batch without any target returns empty indices without building a cost matrix.
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

FOCAL_GAMMA = 2.0  # fixed in DINO's matcher
LOG_EPS = 1e-8


def _empty_match() -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """Minimum-cost matching between the Q queries of each image and its K ground-truth boxes.

    For query q with class probabilities p_q = sigmoid(logits_q) and box b_q, and target t with class c_t and box
    g_t (boxes cxcywh, normalised to the image):

        C[q, t] = cost_class * (pos(p_q[c_t]) - neg(p_q[c_t]))
                + cost_bbox  * |b_q - g_t|_1
                - cost_giou  * GIoU(xyxy(b_q), xyxy(g_t))

        pos(p) = alpha * (1 - p)^gamma * -log(p + 1e-8)        (focal loss if the query were labelled c_t)
        neg(p) = (1 - alpha) * p^gamma * -log(1 - p + 1e-8)    (focal loss if it were labelled background)

    with alpha = focal_alpha and gamma = 2. Each image gets min(Q, K) pairs.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError('HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0; '
                             'set at least one of set_cost_class / set_cost_bbox / set_cost_giou to a non-zero value')
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha

    def pairwise_cost(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost matrix C (N, M) of N predictions (logits (N, num_classes), boxes (N, 4)) against M targets
        (labels (M,), boxes (M, 4)); the formula is in the class docstring."""
        prob = logits.float().sigmoid()
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        alpha = self.focal_alpha
        pos = alpha * (1 - prob) ** FOCAL_GAMMA * -(prob + LOG_EPS).log()
        neg = (1 - alpha) * prob ** FOCAL_GAMMA * -(1 - prob + LOG_EPS).log()
        cost_class = (pos - neg)[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: 'pred_logits' (B, Q, num_classes) and 'pred_boxes' (B, Q, 4) cxcywh normalised; other keys
                are ignored.
            targets: B dicts with 'labels' (K_i,) int64 and 'boxes' (K_i, 4) cxcywh normalised.
        Returns:
            B pairs (query_idx, target_idx) of int64 CPU tensors of length min(Q, K_i); query_idx is sorted
            increasingly (scipy's order). An image without targets gets two empty tensors.
        """
        logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
        batch_size, num_queries = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f'HungarianMatcher: {len(targets)} targets for a batch of {batch_size} predictions; '
                             'pass one target dict per image')
        sizes = [len(t['boxes']) for t in targets]
        if sum(sizes) == 0:
            return [_empty_match() for _ in targets]
        if not (torch.isfinite(logits).all() and torch.isfinite(boxes).all()):
            raise ValueError('HungarianMatcher: pred_logits or pred_boxes contain NaN/inf, so the matching is '
                             'undefined; training has diverged (lower lr, check amp / clip_max_norm, or resume '
                             'from an earlier checkpoint)')
        tgt_labels = torch.cat([t['labels'] for t in targets])
        tgt_boxes = torch.cat([t['boxes'] for t in targets])
        cost = self.pairwise_cost(logits.flatten(0, 1), boxes.flatten(0, 1), tgt_labels, tgt_boxes)
        cost = cost.view(batch_size, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError('HungarianMatcher: the matching cost has NaN/inf entries although the predictions are '
                             'finite; check the target boxes (cxcywh normalised, w and h > 0) and labels')
        indices = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            query_idx, target_idx = linear_sum_assignment(block[i])
            indices.append((torch.as_tensor(query_idx, dtype=torch.int64),
                            torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices
