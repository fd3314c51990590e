"""CocoEvaluator: perfect / partly wrong detections give the expected COCO numbers, per-class table, results JSON."""
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from datasets.coco_eval import STAT_NAMES, CocoEvaluator


def make_gt() -> COCO:
    """Two 100x100 images; image 1 has a person and a car, image 2 a bicycle (xywh boxes)."""
    dataset = {
        'images': [{'id': 1, 'width': 100, 'height': 100}, {'id': 2, 'width': 100, 'height': 100}],
        'categories': [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'bicycle'}, {'id': 3, 'name': 'car'}],
        'annotations': [
            {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 20, 40], 'area': 800, 'iscrowd': 0},
            {'id': 2, 'image_id': 1, 'category_id': 3, 'bbox': [50, 50, 40, 30], 'area': 1200, 'iscrowd': 0},
            {'id': 3, 'image_id': 2, 'category_id': 2, 'bbox': [20, 30, 30, 30], 'area': 900, 'iscrowd': 0},
        ],
    }
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def xyxy(x, y, w, h):
    return [x, y, x + w, y + h]


def prediction(boxes, labels, scores):
    return {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.tensor(labels),
            'scores': torch.tensor(scores)}


def run(evaluator):
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator.summarize()


def test_perfect_detections_score_one():
    evaluator = CocoEvaluator(make_gt())
    evaluator.update({1: prediction([xyxy(10, 10, 20, 40), xyxy(50, 50, 40, 30)], [1, 3], [0.9, 0.8])})
    evaluator.update({2: prediction([xyxy(20, 30, 30, 30)], [2], [0.7])})
    text = run(evaluator)
    stats = evaluator.stats_dict()
    assert stats['AP'] == pytest.approx(1.0)
    assert stats['AP50'] == pytest.approx(1.0)
    assert [row[0] for row in evaluator.per_class] == ['person', 'bicycle', 'car']
    assert all(ap == pytest.approx(1.0) for _, ap, _ in evaluator.per_class)
    assert 'Average Precision' in text and 'bicycle' in text
    assert len(evaluator.stats) == len(STAT_NAMES)


def test_wrong_class_and_missing_image_lower_ap():
    evaluator = CocoEvaluator(make_gt())
    # person right, car labelled as person, bicycle image has no detection
    evaluator.update({1: prediction([xyxy(10, 10, 20, 40), xyxy(50, 50, 40, 30)], [1, 1], [0.9, 0.8])})
    evaluator.update({2: prediction(np.zeros((0, 4)).tolist(), [], [])})
    run(evaluator)
    per_class = {name: (ap, ap50) for name, ap, ap50 in evaluator.per_class}
    assert per_class['person'][1] == pytest.approx(1.0)
    assert per_class['car'][1] == pytest.approx(0.0)
    assert per_class['bicycle'][1] == pytest.approx(0.0)
    assert evaluator.stats[1] == pytest.approx(1.0 / 3.0, abs=1e-3)


def test_duplicate_images_from_padding_sampler_are_dropped():
    evaluator = CocoEvaluator(make_gt())
    det = prediction([xyxy(10, 10, 20, 40)], [1], [0.9])
    evaluator.update({1: det})
    evaluator.update({1: det})
    evaluator.synchronize_between_processes()
    assert evaluator.img_ids == [1]
    assert len(evaluator.results) == 1


def test_no_detections_at_all_gives_zero_not_crash():
    evaluator = CocoEvaluator(make_gt())
    evaluator.update({1: prediction(np.zeros((0, 4)).tolist(), [], []),
                      2: prediction(np.zeros((0, 4)).tolist(), [], [])})
    run(evaluator)
    assert evaluator.stats[0] <= 0.0


def test_accumulate_without_images_is_an_error():
    with pytest.raises(ValueError, match='no images'):
        CocoEvaluator(make_gt()).accumulate()


def test_results_json_is_loadable_by_coco(tmp_path):
    gt = make_gt()
    evaluator = CocoEvaluator(gt)
    evaluator.update({1: prediction([xyxy(10, 10, 20, 40)], [1], [0.9])})
    path = tmp_path / 'sub' / 'detections.json'
    evaluator.write_results(str(path))
    rows = json.loads(path.read_text())
    assert rows == [{'image_id': 1, 'category_id': 1, 'bbox': [10.0, 10.0, 20.0, 40.0], 'score': pytest.approx(0.9)}]
    assert len(gt.loadRes(str(path)).anns) == 1


def test_results_carry_the_annotation_files_own_ids_and_only_the_result_fields(tmp_path):
    # the data set read 'img-b' as 1 and '0002' as 2 (PairedCocoDataset.image_id_map: original -> int)
    evaluator = CocoEvaluator(make_gt(), image_id_map={'img-b': 1, '0002': 2})
    evaluator.update({1: prediction([xyxy(10, 10, 20, 40), xyxy(50, 50, 40, 30)], [1, 3], [0.9, 0.8]),
                      2: prediction([xyxy(20, 30, 30, 30)], [2], [0.7])})
    path = tmp_path / 'detections.json'
    evaluator.write_results(str(path))
    rows = json.loads(path.read_text())
    assert [row['image_id'] for row in rows] == ['img-b', 'img-b', '0002']
    assert all(list(row) == ['image_id', 'category_id', 'bbox', 'score'] for row in rows)
    run(evaluator)
    assert evaluator.stats[0] == pytest.approx(1.0), 'the evaluation itself still runs on the int ids'
