"""tools/fusion_study.py: rows, recall by visibility, the ceiling with one image missing (against COCOeval), the
summary and the issue-11 targets; and a whole study on a minuscule budget, resumed after a kill and written from
the finished runs only (``--finished-only``)."""
import json
import os
import statistics

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from datasets.coco_eval import CocoEvaluator
from datasets.synthetic import generate_synthetic_dataset
from models.fusion import FUSION_TYPES
from tools import fusion_study
from tools.fusion_study import Row
from util.errors import UsageError

# A CAFF_tiny made smaller still; images of 128 x 96 keep the stride-64 level above 1 x 1 (GroupNorm).
TINY = ['hidden_dim=32', 'nheads=2', 'enc_layers=1', 'dec_layers=1', 'dim_feedforward=32', 'num_queries=8',
        'num_select=8', 'dn_number=2', 'data_aug_scales=[96]', 'data_aug_max_size=128',
        'data_aug_scales2_resize=[96]', 'data_aug_scales2_crop=[64,96]', 'eval_size=96', 'eval_max_size=128',
        'batch_size=2', "msda_backend='pytorch'"]


def test_rows_accept_every_fusion_type_with_an_optional_dropout():
    assert [fusion_study.parse_row(t) for t in FUSION_TYPES] == [Row(t, 0.0) for t in FUSION_TYPES]
    assert fusion_study.parse_row('concat:0.3') == Row('concat', 0.3)
    assert Row('caff', 0.3).label == '`caff`, dropout 0.3' and Row('caff').label == '`caff`'
    with pytest.raises(UsageError, match="unknown fusion type 'cat'; models/fusion.py has caff"):
        fusion_study.parse_row('cat')
    for text in ('caff:1.5', 'caff:x'):
        with pytest.raises(UsageError, match=r'must be a number in \[0, 1\]'):
            fusion_study.parse_row(text)


def _ann(ann_id, image_id, bbox, visibility, category_id=1):
    return {'id': ann_id, 'image_id': image_id, 'bbox': bbox, 'category_id': category_id, 'iscrowd': 0,
            'area': bbox[2] * bbox[3], 'visibility': visibility}


def test_recall_by_visibility_matches_one_to_one_per_class():
    gt = {'annotations': [_ann(1, 1, [0, 0, 10, 10], 'both'), _ann(2, 1, [50, 50, 10, 10], 'rgb'),
                          _ann(3, 2, [0, 0, 20, 20], 'ir'), _ann(4, 2, [40, 0, 20, 20], 'ir', category_id=2)]}
    detections = [
        {'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 10, 10], 'score': 0.9},   # finds gt 1
        {'image_id': 1, 'category_id': 1, 'bbox': [1, 0, 10, 10], 'score': 0.8},   # duplicate: gt 1 is taken
        {'image_id': 1, 'category_id': 1, 'bbox': [50, 50, 10, 10], 'score': 0.1},  # below the threshold
        {'image_id': 2, 'category_id': 1, 'bbox': [40, 0, 20, 20], 'score': 0.9},  # wrong class for gt 4
        {'image_id': 2, 'category_id': 1, 'bbox': [0, 0, 20, 30], 'score': 0.7},   # IoU 2/3 with gt 3
    ]
    recall = fusion_study.recall_by_visibility(gt, detections, score_threshold=0.3)
    assert recall == {'both': (1, 1), 'rgb': (0, 1), 'ir': (1, 2)}


def test_both_images_result_is_the_training_runs_own_last_evaluation(tmp_path):
    gt = {'annotations': [_ann(1, 1, [0, 0, 10, 10], 'both'), _ann(2, 1, [50, 50, 10, 10], 'ir')]}
    run = tmp_path / 'run'
    run.mkdir()
    assert fusion_study.training_evaluation(run, gt, 0.3) is None, 'no log.txt'
    detections = [{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 10, 10], 'score': 0.9}]
    (run / 'detections_bbox.json').write_text(json.dumps(detections))
    record = {'epoch': 4, 'test_coco_eval_bbox': [0.4, 0.5, 0.3] + [0.0] * 9, 'test_missing_modality': 'none'}
    (run / 'log.txt').write_text(json.dumps({'epoch': 3}) + '\n' + json.dumps(record) + '\n')
    assert fusion_study.training_evaluation(run, gt, 0.3) == {
        'ap': [0.4, 0.5, 0.3], 'epoch': 4, 'recall': {'both': [1, 1], 'rgb': [0, 0], 'ir': [0, 1]}}
    assert fusion_study.training_evaluation(run, gt, 0.95)['recall']['both'] == [0, 1]
    (run / 'log.txt').write_text(json.dumps({**record, 'test_missing_modality': 'ir'}) + '\n')
    assert fusion_study.training_evaluation(run, gt, 0.3) is None, 'the training run evaluated with IR missing'
    (run / 'log.txt').write_text(json.dumps(record) + '\n')
    stamp = (run / 'log.txt').stat().st_mtime
    os.utime(run / 'detections_bbox.json', (stamp + 10, stamp + 10))
    assert fusion_study.training_evaluation(run, gt, 0.3) is None, 'detections of a later --eval run'


@pytest.mark.parametrize('missing', ['none', 'rgb', 'ir'])
def test_ceiling_is_the_coco_ap_of_a_perfect_detector_of_what_is_left(tmp_path, missing):
    generate_synthetic_dataset(str(tmp_path), num_train=1, num_val=12, width=160, height=128)
    gt = json.loads((tmp_path / 'coco_annotations' / 'LLVIP_test.json').read_text())
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    evaluator = CocoEvaluator(coco)
    for image in gt['images']:
        anns = [a for a in gt['annotations'] if a['image_id'] == image['id']
                and a['visibility'] in {'none': ('both', 'rgb', 'ir'), 'rgb': ('both', 'ir'),
                                        'ir': ('both', 'rgb')}[missing]]
        xywh = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        evaluator.update({image['id']: {'boxes': torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                        'scores': torch.ones(len(anns)),
                                        'labels': torch.tensor([a['category_id'] for a in anns])}})
    evaluator.accumulate()
    evaluator.summarize()
    ceiling = fusion_study.ceiling_ap(gt, missing)
    assert evaluator.stats[0] == pytest.approx(ceiling, abs=1e-9)
    assert evaluator.stats[1] == pytest.approx(ceiling, abs=1e-9)
    assert (ceiling == 1.0) == (missing == 'none')


def _runs(ap50s: dict[str, list[float]]) -> list[dict]:
    """Per-seed results from AP50 lists per condition (AP = AP50 / 2, recall fixed)."""
    seeds = len(next(iter(ap50s.values())))
    return [{c: {'ap': [v[i] / 200, v[i] / 100, 0.0], 'recall': {'both': [9, 10], 'rgb': [1, 2], 'ir': [0, 2]}}
             for c, v in ap50s.items()} for i in range(seeds)]


def test_summary_means_spreads_and_the_targets():
    rows = [Row('caff'), Row('caff', 0.3), Row('rgb_only'), Row('ir_only')]
    results = {
        Row('caff'): _runs({'none': [90, 92, 94], 'rgb': [20, 30, 40], 'ir': [10, 20, 30]}),
        Row('caff', 0.3): _runs({'none': [89, 91, 92], 'rgb': [70, 72, 74], 'ir': [60, 61, 65]}),
        Row('rgb_only'): _runs({'none': [70, 71, 72], 'rgb': [0, 0, 0], 'ir': [70, 71, 72]}),
        Row('ir_only'): _runs({'none': [74, 75, 76], 'rgb': [74, 75, 76], 'ir': [0, 0, 0]}),
    }
    summary = fusion_study.summarise(rows, results, ['none', 'rgb', 'ir'])
    cell = summary[Row('caff', 0.3)]['ir']
    assert cell['ap50'] == pytest.approx((np.mean([60, 61, 65]), np.std([60, 61, 65], ddof=1)))
    assert cell['ap'][0] == pytest.approx(np.mean([30, 30.5, 32.5])) and cell['n'] == 3
    assert cell['recall'] == {'both': (27, 30), 'rgb': (3, 6), 'ir': (0, 6)}
    (line,) = fusion_study.target_lines(summary)
    # RGB missing: 72 / ir_only 75 = 96 % (met); IR missing: 62 / rgb_only 71 = 87 % (not met);
    # both images: 90.67 vs 92.0 = -1.3 (not met).
    assert 'RGB missing: AP50 72.0 vs `ir_only` 75.0 (96 %, met' in line
    assert 'IR missing: AP50 62.0 vs `rgb_only` 71.0 (87 %, NOT met' in line
    assert 'both images: AP50 90.7 vs 92.0 without dropout (-1.3; NOT met' in line
    table = fusion_study.ap_table(summary, ['none', 'rgb', 'ir'], seeds=3)
    sd = statistics.stdev([60, 61, 65])
    expected = f'45.3 ± 0.8 | 90.7 ± 1.5 | 36.0 ± 1.0 | 72.0 ± 2.0 | 31.0 ± 1.3 | 62.0 ± {sd:.1f}'
    assert f'| `caff`, dropout 0.3 | {expected} |' in table


def _page_rows(page: str, header_start: str) -> list[list[str]]:
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


@pytest.mark.slow
def test_minuscule_study_end_to_end_and_resumed_after_a_kill(tmp_path, capsys):
    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=2, num_val=2, width=128, height=96)
    out = tmp_path / 'page.md'
    argv = ['--rows', 'caff:0.5', 'ir_only', '--seeds', '1', '2', '--epochs', '1', '--data', str(data),
            '--threads', '1', '--jobs', '2', '--work-dir', str(tmp_path / 'runs'), '--options', *TINY,
            '--out', str(out)]
    previous = torch.get_num_threads()
    assert fusion_study.main(argv) == 0
    assert torch.get_num_threads() == previous
    page = out.read_text()
    rows = _page_rows(page, '| row | AP, both images')
    assert [r[0] for r in rows] == ['`caff`, dropout 0.5', '`ir_only`']
    for row in rows:
        assert len(row) == 7 and all('±' in c and 0 <= float(c.split()[0]) <= 100 for c in row[1:])
    assert 'Ceiling' in page and 'python tools/fusion_study.py --rows caff:0.5 ir_only' in page

    run_dirs = sorted(p for p in (tmp_path / 'runs').iterdir() if p.is_dir())
    assert len(run_dirs) == 4
    for run in run_dirs:
        assert {p.name for p in run.glob('eval_*.json')} == {'eval_none.json', 'eval_rgb.json', 'eval_ir.json'}
        # with both images the result is main.py's own evaluation of the last epoch, not a second one
        last = [json.loads(line) for line in (run / 'log.txt').read_text().splitlines()][-1]
        cached = json.loads((run / 'eval_none.json').read_text())
        assert cached['ap'] == pytest.approx(last['test_coco_eval_bbox'][:3], abs=1e-9)

    # A killed study: the last run is gone; running again trains only that one and keeps the rest.
    killed = next(p for p in run_dirs if p.name.startswith('ir_only') and 'seed2' in p.name)
    for path in sorted(killed.iterdir()):
        path.unlink()
    killed.rmdir()
    capsys.readouterr()
    # --finished-only trains nothing and writes the page from the three runs left, naming the missing one.
    assert fusion_study.main(argv + ['--finished-only']) == 0
    assert ': training' not in capsys.readouterr().err and not killed.exists()
    partial = out.read_text()
    assert '**Partial: 3 of 4 runs finished (not trained: `ir_only` seed 2)' in partial
    assert _page_rows(partial, '| row | AP, both images')[0] == rows[0]
    assert all('(n=1)' in cell for cell in _page_rows(partial, '| row | AP, both images')[1][1:])
    assert fusion_study.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count(': training') == 1 and f'{killed.name}: training' in err and err.count('reused') == 3
    assert _page_rows(out.read_text(), '| row | AP, both images')[0] == rows[0]
