import pytest
import torch
from torch import nn

from models.dn_components import (check_dn_labelbook, dn_attention_mask, dn_post_process, noise_boxes,
                                  num_dn_groups, prepare_for_cdn)
from util.misc import inverse_sigmoid

HIDDEN = 8
NUM_CLASSES = 5


def make_targets():
    # image 0: two boxes, image 1: one box -> max_gt = 2
    return [{'labels': torch.tensor([1, 3]),
             'boxes': torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.4, 0.3]])},
            {'labels': torch.tensor([4]), 'boxes': torch.tensor([[0.5, 0.5, 0.1, 0.6]])}]


def make_label_enc():
    torch.manual_seed(0)
    return nn.Embedding(NUM_CLASSES + 1, HIDDEN)


def cdn(targets, dn_number=4, label_noise=0.0, box_noise=0.0, num_queries=7, label_enc=None):
    label_enc = label_enc if label_enc is not None else make_label_enc()
    return prepare_for_cdn((targets, dn_number, label_noise, box_noise), num_queries, NUM_CLASSES,
                           HIDDEN, label_enc)


def test_group_count_follows_dino_rule():
    assert num_dn_groups(100, 1) == 100   # budget 200 split into groups of 2 * 1 queries
    assert num_dn_groups(100, 7) == 14    # 200 // 14
    assert num_dn_groups(100, 150) == 1   # at least one group
    assert num_dn_groups(4, 3) == 8       # below the budget threshold dn_number * 2 is the group count
    assert num_dn_groups(100, 0) == 1


def test_layout_without_noise_keeps_labels_and_boxes():
    targets = make_targets()
    label_enc = make_label_enc()
    labels, boxes, attn_mask, meta = cdn(targets, dn_number=4, label_enc=label_enc)
    groups, max_gt = 8, 2
    assert meta == {'pad_size': groups * 2 * max_gt, 'num_dn_group': groups, 'max_gt': max_gt}
    assert labels.shape == (2, 32, HIDDEN) and boxes.shape == (2, 32, 4) and attn_mask.shape == (39, 39)
    for g in range(groups):
        for half in (0, max_gt):  # positive then negative copy
            start = g * 2 * max_gt + half
            for b, t in enumerate(targets):
                n = len(t['labels'])
                torch.testing.assert_close(labels[b, start:start + n], label_enc(t['labels']))
                torch.testing.assert_close(boxes[b, start:start + n], inverse_sigmoid(t['boxes']))
    # image 1 has one box: its second slot of every half-group is zero padding
    assert (labels[1, 1::2] == 0).all() and (boxes[1, 1::2] == 0).all()


def test_attention_mask_structure():
    mask = dn_attention_mask(num_groups=3, group_size=4, num_queries=5, device=torch.device('cpu'))
    pad = 12
    assert mask.shape == (17, 17)
    assert mask[pad:, :pad].all()          # matching queries don't see DN queries
    assert not mask[pad:, pad:].any()      # matching queries see each other
    assert not mask[:pad, pad:].any()      # DN queries see the matching queries
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert not mask[rows, rows].any()  # a group sees itself
        others = torch.ones(pad, dtype=torch.bool)
        others[rows] = False
        assert mask[rows, :pad][:, others].all()  # and no other group


def test_label_noise_draws_valid_labels_and_flips_about_half_the_ratio():
    torch.manual_seed(0)
    targets = [{'labels': torch.zeros(50, dtype=torch.int64), 'boxes': torch.full((50, 4), 0.5)}]
    label_enc = nn.Embedding(NUM_CLASSES + 1, HIDDEN)
    labels, _, _, meta = cdn(targets, dn_number=100, label_noise=1.0, label_enc=label_enc)
    # recover the class of every DN query from its embedding row
    distances = torch.cdist(labels[0], label_enc.weight[:NUM_CLASSES], compute_mode='donot_use_mm_for_euclid_dist')
    recovered = distances.argmin(-1)
    assert (distances.min(-1).values < 1e-5).all()
    changed = (recovered != 0).float().mean().item()
    # p(flip) = 0.5, and a flip lands on class 0 again with p = 1/5: expect 0.4 changed
    assert meta['pad_size'] == 200 and 0.3 < changed < 0.5


def test_box_noise_bounds_for_positive_and_negative_copies():
    torch.manual_seed(0)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    boxes = box.repeat(2000, 1)
    negative = torch.arange(2000) % 2 == 1
    noised = noise_boxes(boxes, negative, noise_scale=0.4)
    corner_shift = (noised - box).abs()
    # corners move by |u| * (w/2, h/2) * 0.4: positives |u| < 1, negatives 1 <= |u| < 2
    x0 = 0.4 - (noised[:, 0] - noised[:, 2] / 2)
    step = 0.1 * 0.4
    assert (x0[~negative].abs() < step + 1e-6).all()
    assert (x0[negative].abs() >= step - 1e-6).all() and (x0[negative].abs() < 2 * step + 1e-6).all()
    assert corner_shift.max() > 0
    assert torch.equal(noise_boxes(boxes, negative, noise_scale=0.0), boxes)


def test_empty_batch_or_no_dn_number_gives_no_dn_queries():
    empty = [{'labels': torch.zeros(0, dtype=torch.int64), 'boxes': torch.zeros(0, 4)}] * 2
    assert cdn(empty) == (None, None, None, None)
    assert cdn(make_targets(), dn_number=0) == (None, None, None, None)
    # one image without boxes next to one with boxes: its DN slots are all padding
    mixed = [make_targets()[1], empty[0]]
    labels, boxes, _, meta = cdn(mixed, dn_number=100)
    assert meta['max_gt'] == 1 and meta['pad_size'] == 200
    assert (labels[1] == 0).all() and (boxes[1] == 0).all()


def test_gradients_reach_label_enc():
    label_enc = make_label_enc()
    labels, _, _, _ = cdn(make_targets(), label_enc=label_enc)
    labels.sum().backward()
    assert label_enc.weight.grad[[1, 3, 4]].abs().sum() > 0
    assert label_enc.weight.grad[[0, 2, 5]].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_outputs_follow_label_enc_device():
    label_enc = make_label_enc().cuda()
    labels, boxes, attn_mask, _ = cdn(make_targets(), label_noise=0.5, box_noise=0.4, label_enc=label_enc)
    assert labels.is_cuda and boxes.is_cuda and attn_mask.is_cuda


def test_outputs_follow_label_enc_dtype_and_device_on_cpu():
    label_enc = make_label_enc().double()
    labels, boxes, attn_mask, _ = cdn(make_targets(), label_noise=0.5, box_noise=0.4, label_enc=label_enc)
    assert labels.dtype == boxes.dtype == torch.float64
    assert labels.device == boxes.device == attn_mask.device == label_enc.weight.device


def test_dn_post_process_splits_and_stores_known_outputs():
    pad, queries = 4, 3
    logits = torch.randn(2, 1, pad + queries, NUM_CLASSES)
    coords = torch.rand(2, 1, pad + queries, 4)
    meta = {'pad_size': pad, 'num_dn_group': 1, 'max_gt': 2}

    def set_aux(c, b):
        return [{'pred_logits': x, 'pred_boxes': y} for x, y in zip(c[:-1], b[:-1])]

    out_logits, out_coords = dn_post_process(logits, coords, meta, True, set_aux)
    assert torch.equal(out_logits, logits[:, :, pad:]) and torch.equal(out_coords, coords[:, :, pad:])
    known = meta['output_known_lbs_bboxes']
    assert torch.equal(known['pred_logits'], logits[-1, :, :pad])
    assert torch.equal(known['aux_outputs'][0]['pred_boxes'], coords[0, :, :pad])
    same = dn_post_process(logits, coords, None, True, set_aux)
    assert same[0] is logits and same[1] is coords


def test_check_dn_labelbook():
    check_dn_labelbook(91, 91)
    with pytest.raises(ValueError, match='dn_labelbook_size=10 is smaller than num_classes=91'):
        check_dn_labelbook(10, 91)
