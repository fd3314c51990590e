"""Contrastive denoising (CDN) queries of DINO: noised ground truth fed to the decoder next to the matching queries.

Follows IDEA-Research/DINO `models/dino/dn_components.py` (`prepare_for_cdn`, `dn_post_process`): same query
layout, noise and attention mask, so the criterion supervises query g * 2 * max_gt + j with target j. What
differs: the device comes from `label_enc` (no `.cuda()`); counts are read from tensor shapes (no host sync); the
mask is built without a Python loop over groups; a batch without any box gets no DN queries (all four outputs
None; DINO builds an empty DN part and its criterion needs special cases); and the work is split into small
functions.

Glossary of the counts (B images, n_b boxes in image b):
    max_gt      max_b n_b, the DN slots per image in one half-group ("single_pad" in DINO's prepare_for_cdn).
    dn_number   the config value. DINO's rule for the number of groups: with budget = 2 * dn_number,
                groups = max(1, budget // (2 * max_gt)) if budget >= 100, else groups = budget (so dn_number
                100 gives ~100 noised copies of the GT boxes in all, split into groups of the batch's GT).
    num_groups  the number of CDN groups ("num_dn_group" in dn_meta). Each group holds a positive half
                (boxes noised by less than the box size: reconstruct them) and a negative half (noised by 1-2x:
                predict "no object").
    group_size  2 * max_gt queries per group (what DINO's criterion calls "single_pad").
    pad_size    num_groups * group_size, the DN queries prepended to the num_queries matching queries.

Layout of the pad_size DN queries of image b: group g spans [g * group_size, (g + 1) * group_size); its
positive copy of box j sits at g * group_size + j and its negative copy at g * group_size + max_gt + j. Slots
j >= n_b are padding (zero content, anchor logit 0 = box (0.5, 0.5, 0.5, 0.5)) and are not supervised.
"""
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.misc import inverse_sigmoid

# dn_number * 2 at or above this is a budget of noised boxes split into groups; below it, a group count (DINO).
_GROUP_BUDGET_THRESHOLD = 100


def check_dn_labelbook(dn_labelbook_size: int, num_classes: int) -> None:
    """Raises unless the DN label embedding (dn_labelbook_size + 1 rows) can embed every label CDN may draw.

    Ground-truth labels and noised labels (drawn from [0, num_classes)) index `label_enc`, so labels must be
    < dn_labelbook_size and dn_labelbook_size >= num_classes.
    """
    if dn_labelbook_size < num_classes:
        raise ValueError(f'dn_labelbook_size={dn_labelbook_size} is smaller than num_classes={num_classes}: '
                         f'label noise draws labels up to num_classes-1 and label_enc has dn_labelbook_size+1 '
                         f'rows. Set dn_labelbook_size >= num_classes (the reference uses 91 for both).')


def num_dn_groups(dn_number: int, max_gt: int) -> int:
    """Number of CDN groups for a batch whose largest image has max_gt boxes (DINO's rule, see the glossary)."""
    budget = 2 * dn_number
    if max_gt == 0:
        return 1
    if budget >= _GROUP_BUDGET_THRESHOLD:
        budget = budget // (2 * max_gt)
    return max(budget, 1)


def dn_attention_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device) -> Tensor:
    """(pad_size + num_queries)^2 bool self-attention mask of the decoder, True = may not attend.

    DN queries see their own group and the matching queries; matching queries see no DN query (they must not
    learn from the ground truth); DN groups don't see each other.
    """
    pad_size = num_groups * group_size
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // max(group_size, 1)
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def noise_labels(labels: Tensor, noise_ratio: float, num_classes: int) -> Tensor:
    """Each label is replaced with probability noise_ratio / 2 by a uniform draw from [0, num_classes) (DINO)."""
    if noise_ratio <= 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device) < noise_ratio * 0.5
    random_labels = torch.randint(0, num_classes, labels.shape, device=labels.device, dtype=labels.dtype)
    return torch.where(flip, random_labels, labels)


def noise_boxes(boxes: Tensor, negative: Tensor, noise_scale: float) -> Tensor:
    """Moves each corner of each cxcywh box by a random fraction of half its size (DINO's CDN box noise).

    Positive boxes move each of x0, y0, x1, y1 by u * (w/2 or h/2) * noise_scale with u uniform in (-1, 1);
    negative boxes (`negative` True) by 1 <= |u| < 2. Corners are clamped to [0, 1].

    Args:
        boxes: (M, 4) cxcywh in [0, 1]; negative: (M,) bool.
    Returns:
        (M, 4) cxcywh.
    """
    if noise_scale <= 0:
        return boxes
    half_wh = boxes[:, 2:] / 2
    corner_step = torch.cat([half_wh, half_wh], 1)  # (w/2, h/2, w/2, h/2)
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device).to(boxes.dtype) * 2.0 - 1.0
    magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
    corners = box_cxcywh_to_xyxy(boxes) + sign * magnitude * corner_step * noise_scale
    return box_xyxy_to_cxcywh(corners.clamp(min=0.0, max=1.0))


def prepare_for_cdn(dn_args: tuple, num_queries: int, num_classes: int, hidden_dim: int,
                    label_enc: nn.Embedding) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                                      Optional[dict]]:
    """Builds the DN queries for a training batch.

    Args:
        dn_args: (targets, dn_number, label_noise_ratio, box_noise_scale); targets: list of dicts with
            'labels' (n_b,) int64 < dn_labelbook_size and 'boxes' (n_b, 4) cxcywh normalised.
        num_queries: matching queries after the DN ones (for the attention mask).
        num_classes: label noise draws from [0, num_classes).
        hidden_dim: width of the content queries.
        label_enc: nn.Embedding(dn_labelbook_size + 1, hidden_dim); its device is the output device.

    Returns:
        input_query_label (B, pad_size, hidden_dim) content queries (label embeddings),
        input_query_bbox (B, pad_size, 4) anchors as logits (inverse sigmoid of the noised cxcywh),
        attn_mask (pad_size + num_queries, pad_size + num_queries) bool, True = blocked,
        dn_meta {'pad_size', 'num_dn_group', 'max_gt'};
        or (None, None, None, None) with dn_number <= 0 or when the batch has no box. The caller decides that
        DN queries exist only in training (DINO passes a ``training`` flag instead).
    """
    targets, dn_number, label_noise_ratio, box_noise_scale = dn_args
    num_gt = [int(t['labels'].shape[0]) for t in targets]
    max_gt = max(num_gt, default=0)
    if dn_number <= 0 or max_gt == 0:
        return None, None, None, None
    device = label_enc.weight.device
    num_groups = num_dn_groups(dn_number, max_gt)
    num_copies = 2 * num_groups  # positive and negative copy per group
    pad_size = num_copies * max_gt

    labels = torch.cat([t['labels'] for t in targets]).to(device=device, dtype=torch.int64)
    boxes = torch.cat([t['boxes'] for t in targets]).to(device=device, dtype=label_enc.weight.dtype)
    image_index = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(num_gt)]).to(device)
    slot_in_image = torch.cat([torch.arange(n, dtype=torch.int64) for n in num_gt]).to(device)

    # copy c = 2g (positive) or 2g + 1 (negative) of group g; copy-major, as DINO's repeat
    copy_index = torch.arange(num_copies, device=device).repeat_interleave(labels.shape[0])
    known_labels = noise_labels(labels.repeat(num_copies), label_noise_ratio, num_classes)
    known_boxes = noise_boxes(boxes.repeat(num_copies, 1), copy_index % 2 == 1, box_noise_scale)
    rows = image_index.repeat(num_copies)
    slots = copy_index * max_gt + slot_in_image.repeat(num_copies)

    batch_size = len(targets)
    input_query_label = label_enc.weight.new_zeros(batch_size, pad_size, hidden_dim)
    input_query_bbox = label_enc.weight.new_zeros(batch_size, pad_size, 4)
    input_query_label = input_query_label.index_put((rows, slots), label_enc(known_labels))
    input_query_bbox = input_query_bbox.index_put((rows, slots), inverse_sigmoid(known_boxes))

    attn_mask = dn_attention_mask(num_groups, 2 * max_gt, num_queries, device)
    dn_meta = {'pad_size': pad_size, 'num_dn_group': num_groups, 'max_gt': max_gt}
    return input_query_label, input_query_bbox, attn_mask, dn_meta


def dn_post_process(outputs_class: Tensor, outputs_coord: Tensor, dn_meta: Optional[dict], aux_loss: bool,
                    _set_aux_loss: Callable[[Tensor, Tensor], list]) -> tuple[Tensor, Tensor]:
    """Splits the DN queries off the decoder predictions and stores them in dn_meta (as DINO).

    Args:
        outputs_class: (n_dec, B, pad_size + Q, num_classes); outputs_coord: (n_dec, B, pad_size + Q, 4).
        dn_meta: from `prepare_for_cdn`, or None.
        aux_loss: also keep the earlier layers' DN predictions, via `_set_aux_loss(class, coord)`.

    Returns:
        the matching-query predictions (n_dec, B, Q, ...). dn_meta gains 'output_known_lbs_bboxes' =
        {'pred_logits', 'pred_boxes'} of the last layer's DN queries (+ 'aux_outputs'). Without DN queries the
        inputs come back unchanged.
    """
    if not dn_meta or dn_meta['pad_size'] <= 0:
        return outputs_class, outputs_coord
    pad_size = dn_meta['pad_size']
    known_class, outputs_class = outputs_class[:, :, :pad_size], outputs_class[:, :, pad_size:]
    known_coord, outputs_coord = outputs_coord[:, :, :pad_size], outputs_coord[:, :, pad_size:]
    known = {'pred_logits': known_class[-1], 'pred_boxes': known_coord[-1]}
    if aux_loss:
        known['aux_outputs'] = _set_aux_loss(known_class, known_coord)
    dn_meta['output_known_lbs_bboxes'] = known
    return outputs_class, outputs_coord
