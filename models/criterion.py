"""Training losses of DINO: focal classification, L1 and GIoU box losses on every decoder layer, the encoder
proposals ('interm') and the contrastive denoising (DN) groups, plus the weights that sum them.

Follows DINO (IDEA-Research/DINO `models/dino/dino.py` `SetCriterion` and `build_dino`'s weight dict,
`models/dino/utils.py` `sigmoid_focal_loss`; CAFF-DINO uses them unchanged). The numbers and the loss keys are
DINO's. What differs:
- the DN losses are computed whenever the outputs carry DN queries ('output_known_lbs_bboxes' in dn_meta, a
  positive pad_size) and the batch has at least one target; DINO also asks `self.training`, which is equivalent
  because the model only builds DN queries in training;
- the zero DN losses of the other case are created on the device of the predictions (DINO: `.to('cuda')`, so
  its evaluation cannot run on CPU);
- target labels outside [0, num_classes) raise a ValueError (DINO's one-hot scatter fails with an index error,
  or silently treats label num_classes as background);
- only the 'labels', 'boxes' and 'cardinality' losses exist (no masks); 'enc_outputs' (not produced by the
  two-stage 'standard' model) is not read;
- in eval mode num_boxes is the batch's own box count (DINO all-reduces it there too), so the evaluation loss
  (``test_loss``) of an image does not depend on how many ranks share the validation set, nor on what the other
  ranks hold; training keeps DINO's average over ranks, which gives every rank's gradient the same normaliser.

Loss keys for one set of predictions (suffix '' for the last decoder layer, '_{i}' for aux layer i,
'_interm' for the encoder proposals, '_dn' / '_dn_{i}' for the DN queries of the last / aux layer i):
    labels      -> loss_ce (+ class_error on the last layer only, logged)
    boxes       -> loss_bbox, loss_giou (+ loss_xy, loss_hw, logged)
    cardinality -> cardinality_error (logged)
"""
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from util.dist import get_world_size, is_dist_avail_and_initialized

FOCAL_GAMMA = 2.0
LOSS_KEYS = {
    'labels': ('loss_ce',),
    'boxes': ('loss_bbox', 'loss_giou', 'loss_xy', 'loss_hw'),
    'cardinality': ('cardinality_error',),
}
Indices = list[tuple[Tensor, Tensor]]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = FOCAL_GAMMA) -> Tensor:
    """Binary focal loss of RetinaNet (Lin et al., 2017) over every logit, for (B, Q, C) logits and 0/1 targets.

    With p = sigmoid(x) and p_t = p if y = 1 else 1 - p:

        FL = -alpha_t * (1 - p_t)^gamma * log(p_t),   alpha_t = alpha if y = 1 else 1 - alpha  (alpha < 0: no alpha_t)

    Returns FL averaged over the query axis (dim 1), summed over the rest, divided by num_boxes (DINO's
    normalisation; its callers multiply by Q to get the sum over all logits).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def build_weight_dict(cls: float, bbox: float, giou: float, interm: float, dec_layers: int, use_dn: bool,
                      aux_loss: bool) -> dict[str, float]:
    """Weights of the summed training loss, as DINO's `build_dino`.

    Last layer: loss_ce = cls, loss_bbox = bbox, loss_giou = giou, and the same for loss_*_dn when use_dn.
    With aux_loss, the decoder layers 0 .. dec_layers - 2 repeat these under suffix '_{i}' (DN: '_dn_{i}').
    The encoder proposals always count (two-stage): loss_*_interm = interm * (cls, bbox, giou).
    Reference (1, 5, 2, 1, 6 layers, DN, aux): 6 + 5 * 6 + 3 = 39 keys. Logged-only terms have no weight.
    """
    base = {'loss_ce': cls, 'loss_bbox': bbox, 'loss_giou': giou}
    per_layer = dict(base)
    if use_dn:
        per_layer.update({f'{k}_dn': v for k, v in base.items()})
    weights = dict(per_layer)
    if aux_loss:
        for i in range(dec_layers - 1):
            weights.update({f'{k}_{i}': v for k, v in per_layer.items()})
    weights.update({f'{k}_interm': v * interm for k, v in base.items()})
    return weights


def _class_error(matched_logits: Tensor, matched_labels: Tensor) -> Tensor:
    """100 - top-1 accuracy (%) of the matched queries; 100 when nothing is matched (as DETR's `accuracy`)."""
    if matched_labels.numel() == 0:
        return torch.full((), 100.0, device=matched_logits.device)
    correct = (matched_logits.argmax(-1) == matched_labels).float().mean()
    return 100 - 100 * correct


def _src_permutation(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched pair, concatenated over the batch, on `device`."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


@dataclass
class _DNSupervision:
    """The DN queries' outputs ({'pred_logits', 'pred_boxes', 'aux_outputs'}), their positive (query, target)
    pairs per image, and the DN normaliser num_boxes * num_dn_group."""
    outputs: dict
    indices: Indices
    num_boxes: float


class SetCriterion(nn.Module):
    """DINO's loss: match, then supervise each matched (query, target) pair; unmatched queries learn background.

    The returned losses are unweighted; the training loss is sum(losses[k] * weight_dict[k] for k in weight_dict).
    Every loss is normalised by num_boxes = max(1, mean over ranks of the number of target boxes) in training,
    max(1, the batch's number of target boxes) in eval mode; the DN losses by num_boxes * num_dn_group.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.losses = tuple(LOSS_KEYS)  # DINO's list for box detection: labels, boxes, cardinality

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                    log: bool = True) -> dict[str, Tensor]:
        """loss_ce: focal loss over all Q x num_classes logits; the matched query of a target has the one-hot
        of its label, every other query all zeros. Equals sum(FL) / num_boxes (DINO writes mean(1) * Q)."""
        logits = outputs['pred_logits']
        batch_idx, query_idx = _src_permutation(indices, logits.device)
        matched_labels = torch.cat([t['labels'][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, matched_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha) * logits.shape[1]
        losses = {'loss_ce': loss_ce}
        if log:
            losses['class_error'] = _class_error(logits[batch_idx, query_idx].detach(), matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices,
                         num_boxes: float) -> dict[str, Tensor]:
        """cardinality_error (logged only): mean over images of |#queries whose argmax is not the last class - K|,
        DETR's softmax-era definition kept as in DINO."""
        logits = outputs['pred_logits']
        num_targets = torch.as_tensor([len(t['labels']) for t in targets], device=logits.device, dtype=torch.float)
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {'cardinality_error': F.l1_loss(num_pred, num_targets)}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """On the matched pairs (boxes cxcywh normalised): loss_bbox = sum |b - g|_1 / num_boxes,
        loss_giou = sum (1 - GIoU(b, g)) / num_boxes; loss_xy / loss_hw (logged) split the L1 by coordinates."""
        batch_idx, query_idx = _src_permutation(indices, outputs['pred_boxes'].device)
        src_boxes = outputs['pred_boxes'][batch_idx, query_idx]
        tgt_boxes = torch.cat([t['boxes'][tgt] for t, (_, tgt) in zip(targets, indices)]).to(src_boxes)
        l1 = F.l1_loss(src_boxes, tgt_boxes, reduction='none')
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        losses = {'loss_bbox': l1.sum() / num_boxes, 'loss_giou': (1 - giou).sum() / num_boxes}
        with torch.no_grad():
            losses['loss_xy'] = l1[:, :2].sum() / num_boxes
            losses['loss_hw'] = l1[:, 2:].sum() / num_boxes
        return losses

    def get_losses(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                   suffix: str = '', log: bool = False) -> dict[str, Tensor]:
        """All losses of self.losses for one set of predictions, keys suffixed; class_error only if log."""
        losses = {}
        for name in self.losses:
            if name == 'labels':
                losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log))
            elif name == 'boxes':
                losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
            else:
                losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def zero_losses(self, device: torch.device, suffix: str) -> dict[str, Tensor]:
        """The keys get_losses(log=False) would give, all 0: keeps the key set stable without DN queries."""
        return {k + suffix: torch.zeros((), device=device) for name in self.losses for k in LOSS_KEYS[name]}

    @staticmethod
    def average_num_boxes(targets: list[dict], device: torch.device, across_ranks: bool = True) -> float:
        """max(1, sum over ranks of the target count / world size) with ``across_ranks`` (a collective in a
        process group), else max(1, the target count of this batch); a plain process uses its own count."""
        num_boxes = torch.as_tensor([float(sum(len(t['labels']) for t in targets))], device=device)
        if across_ranks and is_dist_avail_and_initialized():
            torch_dist.all_reduce(num_boxes)
            num_boxes = num_boxes / get_world_size()
        return torch.clamp(num_boxes, min=1).item()

    @staticmethod
    def dn_indices(targets: list[dict], num_groups: int, single_pad: int) -> Indices:
        """(DN query, target) pairs of the positive DN queries: target j of an image is reconstructed by query
        g * single_pad + j of group g = 0 .. num_groups - 1 (the negatives, at + single_pad / 2, learn background).
        """
        indices = []
        for t in targets:
            tgt = torch.arange(len(t['labels']), dtype=torch.int64).repeat(num_groups)
            group = torch.arange(num_groups, dtype=torch.int64).repeat_interleave(len(t['labels']))
            indices.append((group * single_pad + tgt, tgt))
        return indices

    def _dn_setup(self, dn_meta: dict | None, targets: list[dict], num_boxes: float) -> _DNSupervision | None:
        """What the DN losses need, or None without DN queries or without any target (zero DN losses then)."""
        if not dn_meta or 'output_known_lbs_bboxes' not in dn_meta or dn_meta['pad_size'] <= 0:
            return None
        if sum(len(t['labels']) for t in targets) == 0:
            return None
        num_groups, pad_size = dn_meta['num_dn_group'], dn_meta['pad_size']
        if pad_size % num_groups != 0:
            raise ValueError(f'SetCriterion: dn_meta pad_size {pad_size} is not a multiple of num_dn_group '
                             f'{num_groups}; the DN queries must come in equal groups (see models/dn_components.py)')
        indices = self.dn_indices(targets, num_groups, pad_size // num_groups)
        return _DNSupervision(dn_meta['output_known_lbs_bboxes'], indices, num_boxes * num_groups)

    def _dn_losses(self, dn: _DNSupervision | None, layer: int | None, targets: list[dict],
                   device: torch.device) -> dict[str, Tensor]:
        """DN losses of the last decoder layer (layer None, suffix '_dn') or of aux layer i ('_dn_{i}')."""
        suffix = '_dn' if layer is None else f'_dn_{layer}'
        if dn is None:
            return self.zero_losses(device, suffix)
        outputs = dn.outputs
        if layer is not None:
            aux_known = outputs.get('aux_outputs', [])
            if layer >= len(aux_known):
                raise ValueError(f"SetCriterion: dn_meta['output_known_lbs_bboxes'] has {len(aux_known)} "
                                 f'aux_outputs but the outputs have at least {layer + 1}; both must hold one entry '
                                 'per earlier decoder layer')
            outputs = aux_known[layer]
        return self.get_losses(outputs, targets, dn.indices, dn.num_boxes, suffix=suffix)

    def _check_labels(self, targets: list[dict]) -> None:
        labels = torch.cat([t['labels'] for t in targets])
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f'SetCriterion: target labels must lie in [0, {self.num_classes}) but range over '
                             f'[{int(labels.min())}, {int(labels.max())}]; raise num_classes in the config or fix '
                             'the category ids of the annotations')

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Compute every loss of the model outputs.

        Args:
            outputs: 'pred_logits' (B, Q, C), 'pred_boxes' (B, Q, 4) cxcywh normalised; optional 'aux_outputs'
                (list of such dicts, one per earlier decoder layer), 'interm_outputs' (dict) and 'dn_meta'
                ({'output_known_lbs_bboxes': {'pred_logits', 'pred_boxes', 'aux_outputs'}, 'num_dn_group',
                'pad_size'}: the DN queries as num_dn_group groups of pad_size / num_dn_group queries, in each
                group the positives first, then the negatives).
            targets: B dicts with 'labels' (K_i,) int64 in [0, C) and 'boxes' (K_i, 4) cxcywh normalised.
        Returns:
            dict of scalar tensors (unweighted), keys as in the module docstring, in DINO's order. The DN keys are
            always present (zeros without DN queries or without targets); aux keys only with 'aux_outputs'.
        """
        device = outputs['pred_logits'].device
        self._check_labels(targets)
        num_boxes = self.average_num_boxes(targets, device, across_ranks=self.training)
        dn = self._dn_setup(outputs.get('dn_meta'), targets, num_boxes)

        losses = self._dn_losses(dn, None, targets, device)
        indices = self.matcher(outputs, targets)
        losses.update(self.get_losses(outputs, targets, indices, num_boxes, log=True))
        for i, aux in enumerate(outputs.get('aux_outputs', [])):
            indices = self.matcher(aux, targets)
            losses.update(self.get_losses(aux, targets, indices, num_boxes, suffix=f'_{i}'))
            losses.update(self._dn_losses(dn, i, targets, device))
        if 'interm_outputs' in outputs:
            interm = outputs['interm_outputs']
            indices = self.matcher(interm, targets)
            losses.update(self.get_losses(interm, targets, indices, num_boxes, suffix='_interm'))
        return losses
