"""MR^-2 (datasets/kaist_eval.py) against hand-computed cases: a perfect detector, a blind one, a known mix of
true positives, false positives, misses and detections on ignore regions, all / day / night, and the matching rules."""
import math

import numpy as np
import pytest
import torch

from datasets.kaist_eval import (FALSE_POSITIVE, FPPI_POINTS, IGNORED, REASONABLE, TRUE_POSITIVE, EvalSetting,
                                 MissRateEvaluator, box_overlaps, log_average_miss_rate, match_image)
from datasets.pairs import coco_from_dict

W, H = 640, 512


def person(image_id, x, y, w, h, **extra):
    return {'image_id': image_id, 'bbox': [x, y, w, h], 'category_id': 1, 'iscrowd': 0, 'area': w * h, **extra}


def ground_truth(annotations, images=((1, 'day'), (2, 'night'))):
    dataset = {'images': [{'id': i, 'width': W, 'height': H, 'file_name': f'{i}.jpg', 'time_of_day': t}
                          for i, t in images],
               'annotations': [dict(a, id=n) for n, a in enumerate(annotations, start=1)],
               'categories': [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'}]}
    return coco_from_dict(dataset)


def prediction(rows):
    """rows of (x0, y0, x1, y1, score[, label])."""
    rows = [r if len(r) == 6 else (*r, 1) for r in rows]
    return {'boxes': torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
            'scores': torch.tensor([r[4] for r in rows], dtype=torch.float32),
            'labels': torch.tensor([r[5] for r in rows], dtype=torch.int64)}


def evaluate(coco, predictions) -> MissRateEvaluator:
    evaluator = MissRateEvaluator(coco, category_id=1)
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator


def xyxy(ann):
    x, y, w, h = ann['bbox']
    return (x, y, x + w, y + h)


# Image 1 (day): two evaluated persons P1, P2 and one 40 px person (ignored: under 55 px).
# Image 2 (night): two evaluated persons P3, P4 and a `people` group (an ignore region).
P1, P2 = person(1, 50, 100, 40, 100), person(1, 300, 100, 40, 100)
SMALL = person(1, 500, 200, 16, 40)
P3, P4 = person(2, 50, 100, 40, 100), person(2, 300, 100, 40, 100)
GROUP = person(2, 420, 100, 150, 120, ignore=1, iscrowd=1, label='people')
MIX_GT = [P1, P2, SMALL, P3, P4, GROUP]
MIX_DETECTIONS = {
    1: prediction([(*xyxy(P1), 0.9),                    # TP
                   (*xyxy(SMALL), 0.85),                # on an ignored person: neither TP nor FP
                   (100, 300, 140, 400, 0.8),           # FP
                   (*xyxy(P1), 0.4),                    # second detection of P1: FP
                   (*xyxy(P2), 0.95, 2)]),              # another class: not scored (P2 stays missed)
    2: prediction([(*xyxy(P3), 0.7),                    # TP
                   (430, 110, 470, 200, 0.65),          # inside the group, IoU with it < 0.5: neither
                   (100, 300, 140, 400, 0.6),           # FP
                   (*xyxy(P4), 0.5)]),                  # TP
}


def test_the_fppi_points_are_the_nine_of_the_definition():
    assert np.allclose(FPPI_POINTS, [10 ** (-2 + i / 4) for i in range(9)])
    assert (FPPI_POINTS[0], FPPI_POINTS[4], FPPI_POINTS[8]) == (0.01, 0.1, 1.0)  # an FPPI of exactly 1 is at point 9


def test_perfect_detector_scores_zero():
    evaluator = evaluate(ground_truth([P1, P2, P3, P4]),
                         {1: prediction([(*xyxy(P1), 0.9), (*xyxy(P2), 0.8)]),
                          2: prediction([(*xyxy(P3), 0.7), (*xyxy(P4), 0.6)])})
    stats = evaluator.stats_dict()
    assert stats['all'] <= 1e-10 and stats['day'] <= 1e-10 and stats['night'] <= 1e-10
    rows = [line.split() for line in evaluator.summarize().splitlines()[2:]]
    assert rows[0] == ['all', '2', '4', '4', '0', '0.00', '%']


def test_a_detector_that_finds_nobody_scores_one_hundred_percent():
    coco = ground_truth([P1, P2, P3, P4])
    assert evaluate(coco, {1: prediction([]), 2: prediction([])}).stats_dict()['all'] == 1.0
    wrong_places = {1: prediction([(400, 300, 440, 400, 0.9)]), 2: prediction([(400, 300, 440, 400, 0.8)])}
    assert evaluate(coco, wrong_places).stats_dict() == {'all': 1.0, 'day': 1.0, 'night': 1.0}


def test_known_mix_gives_the_hand_computed_value():
    # Kept detections in score order: .9 TP, .8 FP, .7 TP, .6 FP, .5 TP, .4 FP; 4 persons, 2 images.
    # fppi 0, .5, .5, 1, 1, 1.5; recall .25, .25, .5, .5, .75, .75. The 7 FPPI points below .5 read the
    # first point (miss .75), 10^-0.25 = .56 reads the third (miss .5), 1 reads the fifth (miss .25).
    expected_all = math.exp((7 * math.log(0.75) + math.log(0.5) + math.log(0.25)) / 9)
    # Day (image 1 alone): .9 TP, .8 FP, .4 FP; 2 persons, 1 image: miss .5 at every point.
    # Night (image 2 alone): .7 TP, .6 FP, .5 TP; fppi 0, 1, 1; miss .5 below 1, 0 at 1 (floored at 1e-10).
    expected_night = math.exp((8 * math.log(0.5) + math.log(1e-10)) / 9)
    evaluator = evaluate(ground_truth(MIX_GT), MIX_DETECTIONS)
    stats = evaluator.stats_dict()
    assert stats['all'] == pytest.approx(expected_all, rel=1e-12)
    assert stats['day'] == pytest.approx(0.5, rel=1e-12)
    assert stats['night'] == pytest.approx(expected_night, rel=1e-12)
    rows = {r.name: (r.images, r.persons, r.true_positives, r.false_positives) for r in evaluator.results}
    assert rows == {'all': (2, 4, 3, 3), 'day': (1, 2, 1, 2), 'night': (1, 2, 2, 1)}
    assert f'{100 * expected_all:.2f} %' in evaluator.summarize()
    assert evaluator.selection() == {'name': '1 - MR^-2 (all)', 'value': pytest.approx(1 - expected_all)}


def test_no_operating_point_below_an_fppi_point_reads_miss_rate_one():
    # One image; the first detection is a FP (fppi 1), the second finds the only person.
    evaluator = evaluate(ground_truth([P1], images=((1, 'day'),)),
                         {1: prediction([(400, 300, 440, 400, 0.9), (*xyxy(P1), 0.8)])})
    assert evaluator.stats_dict()['all'] == pytest.approx(math.exp(math.log(1e-10) / 9), rel=1e-12)


def test_log_average_reads_the_last_point_at_or_below_each_fppi_point():
    fppi = np.array([0.01, 0.05, 0.5, 2.0])
    miss = np.array([0.8, 0.6, 0.4, 0.2])
    # points 0.01 0.0178 0.0316 -> 0.8; 0.0562 0.1 0.178 0.316 -> 0.6; 0.562 1.0 -> 0.4
    expected = math.exp((3 * math.log(0.8) + 4 * math.log(0.6) + 2 * math.log(0.4)) / 9)
    assert log_average_miss_rate(fppi, miss) == pytest.approx(expected, rel=1e-12)
    assert log_average_miss_rate(np.array([]), np.array([])) == 1.0


def test_overlap_is_iou_for_persons_and_intersection_over_detection_for_ignore_regions():
    detection = np.array([[0.0, 0.0, 10.0, 10.0]])
    boxes = np.array([[5.0, 0.0, 15.0, 10.0], [-10.0, -10.0, 20.0, 20.0]])
    both_regular = box_overlaps(detection, boxes, np.array([False, False]))
    assert both_regular[0].tolist() == pytest.approx([50 / 150, 100 / 900])
    as_ignore = box_overlaps(detection, boxes, np.array([True, True]))
    assert as_ignore[0].tolist() == pytest.approx([50 / 100, 1.0])


def test_matching_prefers_persons_over_ignore_regions_and_ignore_regions_absorb_many():
    persons_then_region = np.array([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 30.0, 30.0]])
    ignore = np.array([False, True])
    detections = np.array([[1.0, 0.0, 11.0, 20.0],     # IoU .82 with the person: TP, though inside the region
                           [0.0, 0.0, 10.0, 20.0],     # person taken; inside the region: ignored
                           [15.0, 15.0, 25.0, 25.0],   # inside the region: ignored
                           [40.0, 40.0, 50.0, 50.0]])  # nowhere: FP
    outcome = match_image(detections, np.array([0.9, 0.8, 0.7, 0.6]), persons_then_region, ignore)
    assert outcome.tolist() == [TRUE_POSITIVE, IGNORED, IGNORED, FALSE_POSITIVE]


def test_matching_is_greedy_by_score_not_by_input_order():
    gt = np.array([[0.0, 0.0, 10.0, 20.0]])
    detections = np.array([[0.0, 0.0, 10.0, 18.0], [0.0, 0.0, 10.0, 20.0]])
    outcome = match_image(detections, np.array([0.3, 0.9]), gt, np.array([False]))
    assert outcome.tolist() == [FALSE_POSITIVE, TRUE_POSITIVE]


@pytest.mark.parametrize('box, occlusion, reason', [
    ((100, 100, 22, 55), 0, None), ((100, 100, 22, 54.9), 0, 'height'), ((100, 100, 40, 100), 1, None),
    ((100, 100, 40, 100), 2, 'occlusion'), ((4, 100, 40, 100), 0, 'border'), ((5, 5, 630, 502), 0, None),
    ((596, 100, 40, 100), 0, 'border'), ((100, 408, 40, 100), 0, 'border')])
def test_reasonable_setting(box, occlusion, reason):
    assert REASONABLE.exclusion(box, occlusion, W, H) == reason


def test_setting_decides_the_ignored_persons():
    occluded = person(1, 50, 100, 40, 100, occlusion=2)
    detections = {1: prediction([(*xyxy(occluded), 0.9)])}
    reasonable = evaluate(ground_truth([occluded, P2], images=((1, 'day'),)), detections)
    assert [(r.persons, r.true_positives, r.false_positives) for r in reasonable.results] == [(1, 0, 0)] * 2
    every_occlusion = MissRateEvaluator(ground_truth([occluded, P2], images=((1, 'day'),)), 1,
                                        EvalSetting('all', 20, math.inf, (0, 1, 2), 5))
    every_occlusion.update(detections)
    every_occlusion.accumulate()
    assert every_occlusion.results[0].persons == 2 and every_occlusion.results[0].true_positives == 1


def test_other_categories_are_neither_ground_truth_nor_scored():
    car = {**person(1, 50, 100, 40, 100), 'category_id': 2}
    evaluator = evaluate(ground_truth([car, P2], images=((1, 'day'),)),
                         {1: prediction([(*xyxy(car), 0.9), (*xyxy(P2), 0.8, 2)])})
    assert [(r.persons, r.true_positives, r.false_positives) for r in evaluator.results[:1]] == [(1, 0, 1)]


def test_images_without_time_of_day_report_all_only_and_no_persons_is_nan():
    coco = coco_from_dict({'images': [{'id': 7, 'width': W, 'height': H, 'file_name': 'a.jpg'}],
                           'annotations': [], 'categories': [{'id': 1, 'name': 'person'}]})
    evaluator = evaluate(coco, {7: prediction([(1, 1, 50, 50, 0.5)])})
    assert list(evaluator.stats_dict()) == ['all'] and math.isnan(evaluator.stats_dict()['all'])
    assert evaluator.selection()['value'] == float('-inf') and 'n/a' in evaluator.summarize()
    with pytest.raises(ValueError, match='no images were evaluated'):
        MissRateEvaluator(coco).accumulate()
