"""KAIST (datasets/kaist.py) end to end: conventions, the kaist_fusion data set and its MR^-2 evaluator, and a
synthetic KAIST-style release written in the original layout that converts, trains and evaluates through main.py."""
import json
import math
from pathlib import Path

import pytest

import main
from datasets import build_benchmark_evaluator, build_dataset
from datasets.kaist import KaistDataset, ignore_reason, kaist_annotation, time_of_day
from datasets.kaist_eval import MissRateEvaluator
from datasets.synthetic import generate_synthetic_dataset, generate_synthetic_kaist
from tools import convert
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = 'config/DINO/CAFF_tiny.py'


@pytest.mark.parametrize('frame, expected', [('set00/V000/I00000', 'day'), ('set05/V001/I00010', 'night'),
                                             ('set08/V002/I00100', 'day'), ('set11/V000/I01219', 'night'),
                                             ('set12/V000/I00000', None)])
def test_time_of_day_follows_the_set_number(frame, expected):
    assert time_of_day(frame) == expected


def test_time_of_day_refuses_other_names():
    with pytest.raises(ValueError, match='not a KAIST frame name'):
        time_of_day('FLIR_00001')


def test_kaist_annotation_marks_ignore_regions_as_crowd():
    person, reason = kaist_annotation('person', [100, 100, 40, 100], 1, 640, 512)
    assert reason is None and (person['ignore'], person['iscrowd'], person['category_id']) == (0, 0, 1)
    assert (person['height'], person['occlusion'], person['area']) == (100.0, 1, 4000.0)
    for label in ('people', 'cyclist', 'person?'):
        region, reason = kaist_annotation(label, [100, 100, 40, 100], 0, 640, 512)
        assert reason == 'label' and region['ignore'] == region['iscrowd'] == 1 and region['label'] == label
    assert ignore_reason('person', [100, 100, 20, 50], 0, 640, 512) == 'height'
    assert ignore_reason('person', [601, 100, 40, 100], 0, 640, 512) == 'border'


def write_release(synthetic: Path, release: Path) -> None:
    """Rewrite a synthetic KAIST-style data set as the original release: images/setXX/VYYY/{visible,lwir}/,
    bbGt text annotations, and the two split lists."""
    for image_set, folder, list_name in (('train', 'train', 'train-all-02.txt'), ('val', 'test', 'test-all-20.txt')):
        data = json.loads((synthetic / 'coco_annotations' / f'{image_set}.json').read_text())
        frames = []
        for image in data['images']:
            frame = image['id']
            frames.append(frame)
            set_name, video, name = frame.split('/')
            for modality, source in (('visible', 'visible'), ('lwir', 'infrared')):
                target = release / 'images' / set_name / video / modality / f'{name}.png'
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((synthetic / source / folder / image['file_name']).read_bytes())
            lines = ['% bbGt version=3']
            for ann in (a for a in data['annotations'] if a['image_id'] == frame):
                x, y, w, h = (int(v) for v in ann['bbox'])
                lines.append(f'{ann["label"]} {x} {y} {w} {h} {ann["occlusion"]} 0 0 0 0 0 0')
            target = release / 'annotations' / set_name / video / f'{name}.txt'
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text('\n'.join(lines) + '\n')
        (release / 'imageSets').mkdir(exist_ok=True)
        (release / 'imageSets' / list_name).write_text('\n'.join(frames) + '\n')


@pytest.fixture(scope='module')
def converted(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp('kaist')
    generate_synthetic_kaist(str(base / 'synthetic'), num_train=4, num_val=6, seed=3, width=192, height=160)
    write_release(base / 'synthetic', base / 'release')
    release = base / 'release'
    assert convert.main(['kaist', '--root', str(release), '--train-list', str(release / 'imageSets/train-all-02.txt'),
                         '--val-list', str(release / 'imageSets/test-all-20.txt'), '--out', str(base / 'data')]) == 0
    return base


def kaist_config(root):
    return load_config(REPO / TINY, [f'coco_path={str(root)!r}', "dataset_file='kaist_fusion'"])


def test_conversion_of_the_release_reproduces_the_synthetic_annotations(converted):
    for image_set in ('train', 'val'):
        original = json.loads((converted / 'synthetic' / 'coco_annotations' / f'{image_set}.json').read_text())
        written = json.loads((converted / 'data' / 'coco_annotations' / f'{image_set}.json').read_text())
        assert sorted((im['id'], im['time_of_day']) for im in written['images']) == \
            sorted((im['id'], im['time_of_day']) for im in original['images'])
        fields = ('image_id', 'bbox', 'label', 'occlusion', 'ignore', 'iscrowd', 'category_id', 'height')
        assert sorted(tuple(a[k] for k in fields) for a in written['annotations']) == \
            sorted(tuple(a[k] for k in fields) for a in original['annotations'])


def test_kaist_fusion_builds_the_kaist_dataset_and_its_evaluator(converted, tmp_path):
    val = build_dataset('val', kaist_config(converted / 'data'))
    assert isinstance(val, KaistDataset) and isinstance(build_benchmark_evaluator(val), MissRateEvaluator)
    written = json.loads((converted / 'data' / 'coco_annotations' / 'val.json').read_text())
    assert sorted(val.image_id_map) == sorted(im['id'] for im in written['images'])
    generate_synthetic_dataset(str(tmp_path), 2, 1, width=96, height=80)
    llvip = build_dataset('val', load_config(REPO / TINY, [f'coco_path={str(tmp_path)!r}']))
    assert build_benchmark_evaluator(llvip) is None and build_benchmark_evaluator(None) is None


@pytest.mark.slow
def test_train_once_then_eval_reports_miss_rate_all_day_night(converted, tmp_path, tiny_run_options):
    out = tmp_path / 'run'
    common = ['-c', str(REPO / TINY), '--dataset_file', 'kaist_fusion', '--coco_path', str(converted / 'data'),
              '--output_dir', str(out), '--num_workers', '0']
    assert main.main([*common, '--options', *tiny_run_options, 'epochs=1']) == 0
    (record,) = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    miss_rate = record['test_miss_rate']
    assert set(miss_rate) == {'all', 'day', 'night'} and all(0 < v <= 1 for v in miss_rate.values())
    assert record['test_selection'] == {'name': '1 - MR^-2 (all)', 'value': pytest.approx(1 - miss_rate['all'])}
    assert record['best_res'] == pytest.approx(1 - miss_rate['all'])
    assert len(record['test_coco_eval_bbox']) == 12, 'COCO AP is reported beside MR^-2'
    assert (out / 'checkpoint_best_regular.pth').is_file()
    info = (out / 'info.txt').read_text()
    assert 'log-average miss rate MR^-2' in info and 'best 1 - MR^-2 (all)' in info
    val_json = json.loads((converted / 'data' / 'coco_annotations' / 'val.json').read_text())
    frames = {im['id'] for im in val_json['images']}
    detections = json.loads((out / 'detections_bbox.json').read_text())
    assert detections and {d['image_id'] for d in detections} <= frames, "the frame names, not the internal ints"
    assert all(isinstance(d['image_id'], str) for d in detections)

    assert main.main([*common, '--eval', '--resume', str(out / 'checkpoint.pth'), '--options', *tiny_run_options]) == 0
    evaluated = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert evaluated['mode'] == 'eval'
    assert evaluated['test_miss_rate'] == pytest.approx(miss_rate, abs=1e-9)
    night_rows = [line for line in (out / 'info.txt').read_text().splitlines() if line.strip().startswith('night')]
    assert len(night_rows) == 2 and all(not math.isnan(float(r.split()[-2])) for r in night_rows)
