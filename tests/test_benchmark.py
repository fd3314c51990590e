"""tools/benchmark.py: e2e and fusion-study with minimal budgets on tiny models, and the recall bookkeeping."""


import pytest
import torch

from datasets.synthetic import generate_synthetic_dataset
from tools import benchmark

# A CAFF_tiny made smaller still; images of 128 x 96 keep the stride-64 level above 1 x 1 (GroupNorm).
TINY = ['hidden_dim=32', 'nheads=2', 'enc_layers=1', 'dec_layers=1', 'dim_feedforward=32', 'num_queries=8',
        'num_select=8', 'dn_number=2']
TINY_DATA = ['data_aug_scales=[96]', 'data_aug_max_size=128', 'data_aug_scales2_resize=[96]',
             'data_aug_scales2_crop=[64,96]', 'eval_size=96', 'eval_max_size=128', 'batch_size=2']


def _table_rows(page: str) -> list[list[str]]:
    lines = [line for line in page.splitlines() if line.startswith('|')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(',', ''))


def test_measure_model_splits_the_forward(repo_root):
    torch.set_num_threads(1)
    result = benchmark.measure_model('config/DINO/CAFF_tiny.py', 96, 128, warmup=0, repeats=2,
                                     options=['msda_backend=pytorch', *TINY])
    assert len(result['total']) == 2
    for i, total in enumerate(result['total']):
        parts = result['backbones'][i] + result['fusion'][i] + result['transformer'][i]
        assert total == pytest.approx(parts)
        assert min(result['backbones'][i], result['fusion'][i], result['transformer'][i]) > 0
    assert result['params'] > 1e6 and result['rss_built_mb'] > 0 and result['peak_mb'] > 0


def test_e2e_page_has_a_row_per_model_with_positive_numbers(tmp_path, capsys):
    out = tmp_path / 'e2e.md'
    argv = ['e2e', '--models', 'tiny', 'config/DINO/CAFF_tiny.py', '--height', '96', '--width', '128',
            '--warmup', '0', '--repeats', '1', '--threads', '1', '--options', *TINY, '--out', str(out)]
    assert benchmark.main(argv) == 0
    page = out.read_text()
    assert 'torch threads 1' in page and 'python tools/benchmark.py e2e' in page
    rows = _table_rows(page)
    assert len(rows) == 2
    assert rows[0][0].startswith(benchmark.MODEL_LABELS['tiny'])
    for row in rows:
        latency, backbones, fusion, transformer = (_number(c) for c in row[2:6])
        assert latency > 0 and backbones > 0 and fusion > 0 and transformer > 0
        assert all(_number(c) > 0 for c in row[7:9])  # RSS after build, peak RSS


def test_e2e_failure_is_one_line(capsys):
    assert benchmark.main(['e2e', '--models', 'config/DINO/no_such.py', '--repeats', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: e2e: measuring config/DINO/no_such.py')


def test_fusion_study_table_has_every_fusion_type(tmp_path):
    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=2, num_val=2, width=128, height=96)
    out = tmp_path / 'study.md'
    argv = ['fusion-study', '--fusion-types', 'caff', 'ir_only', '--epochs', '1', '--data', str(data),
            '--threads', '1', '--work-dir', str(tmp_path / 'runs'), '--options', *TINY, *TINY_DATA,
            '--out', str(out)]
    assert benchmark.main(argv) == 0
    page = out.read_text()
    rows = _table_rows(page)
    assert [row[0] for row in rows] == ['`caff`', '`ir_only`']
    for row in rows:
        assert all(0 <= _number(c) <= 100 for c in row[1:4])  # AP, AP50, AP75 in %
        assert row[-1].endswith('min')
    assert 'Verdict:' in page
    # a second call reuses the finished runs instead of training again
    assert benchmark.main(argv) == 0
    assert [row[-1] for row in _table_rows(out.read_text())] == ['reused', 'reused']


def _ann(ann_id, image_id, bbox, visibility, category_id=1):
    return {'id': ann_id, 'image_id': image_id, 'bbox': bbox, 'category_id': category_id, 'iscrowd': 0,
            'visibility': visibility}


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
    recall = benchmark.recall_by_visibility(gt, detections, score_threshold=0.3)
    assert recall == {'both': (1, 1), 'rgb': (0, 1), 'ir': (1, 2)}


def test_verdict_names_the_winner():
    def row(name, ap):
        return {'fusion_type': name, 'ap': [ap, ap, ap]}

    assert 'fusion wins' in benchmark.study_verdict([row('caff', 0.5), row('rgb_only', 0.3), row('ir_only', 0.4)])
    assert 'does NOT win' in benchmark.study_verdict([row('caff', 0.2), row('ir_only', 0.4)])


def test_msda_passes_its_arguments_through(monkeypatch):
    import sys

    import tools
    seen = []
    fake = type('FakeBench', (), {'main': staticmethod(lambda argv: seen.append(argv))})
    monkeypatch.setitem(sys.modules, 'tools.bench_msda', fake)
    monkeypatch.setattr(tools, 'bench_msda', fake, raising=False)
    assert benchmark.main(['msda', '--repeats', '2']) == 0
    assert seen == [['--repeats', '2']]
