"""tools/convert.py and tools/converters/: each source format on a small fixture the test writes; what is written,
what is refused by name and why, idempotence, and that the data loader reads the result."""
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datasets import build_dataset
from tools import convert
from tools.converters.common import seeded_split
from tools.converters.files import place_file
from tools.converters.kaist import frame_name, read_bbgt, read_kaist_xml
from tools.converters.labels import LabelFileError, read_voc, read_yolo
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]


def image(path: Path, size=(64, 48), value=0, mode='RGB', fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3) if mode == 'RGB' else (size[1], size[0]), value, dtype=np.uint8)
    PIL.Image.fromarray(array).save(path, format=fmt)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def voc_xml(objects, size=None) -> str:
    dims = f'<size><width>{size[0]}</width><height>{size[1]}</height></size>' if size else ''
    body = ''.join(f'<object><name>{n}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>'
                   f'<ymax>{y1}</ymax></bndbox></object>' for n, (x0, y0, x1, y1) in objects)
    return f'<annotation>{dims}{body}</annotation>'


def run_cli(*argv) -> int:
    return convert.main([str(a) for a in argv])


def tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob('*')) if p.is_file()}


def cfg_for(root, dataset_file, num_classes):
    return load_config(REPO / 'config/DINO/CAFF_tiny.py',
                       [f'coco_path={str(root)!r}', f'dataset_file={dataset_file!r}', f'num_classes={num_classes}',
                        f'dn_labelbook_size={num_classes}', 'eval_size=96', 'eval_max_size=128'])


# ---------------------------------------------------------------- KAIST

KAIST_SIZE = (640, 512)
BBGT = {
    # person (evaluated), people / cyclist / person? regions, a 40 px person, a heavily occluded one, one at the
    # border, one flagged ign=1, a box without area
    'set00/V000/I00000': ['person 100 100 40 100 0 0 0 0 0 0 0', 'people 300 100 120 110 0 0 0 0 0 0 0',
                          'cyclist 450 100 60 100 1 0 0 0 0 0 0', 'person 520 300 16 40 0 0 0 0 0 0 0'],
    'set00/V000/I00001': ['person 200 100 40 100 2 0 0 0 0 0 0', 'person 2 100 40 100 0 0 0 0 0 0 0',
                          'person? 400 100 40 100 0 0 0 0 0 0 0', 'person 100 300 40 100 0 0 0 0 0 1 0',
                          'person 50 50 0 80 0 0 0 0 0 0 0'],
    'set03/V001/I00002': [],  # a night frame without persons
}
KAIST_XML = {  # the improved test annotations: per-frame XML, xywh
    'set06/V000/I00019': [('person', (100, 100, 40, 100), 0), ('person', (300, 150, 30, 70), 1)],
    'set09/V000/I00039': [('people', (100, 100, 150, 120), 0)],
}


def kaist_xml(objects) -> str:
    body = ''.join(f'<object><name>{n}</name><bndbox><x>{x}</x><y>{y}</y><w>{w}</w><h>{h}</h></bndbox>'
                   f'<pose>unknown</pose><truncated>0</truncated><difficult>0</difficult><occlusion>{occ}</occlusion>'
                   f'</object>' for n, (x, y, w, h), occ in objects)
    return f'<annotation><filename>x</filename>{body}</annotation>'


@pytest.fixture
def kaist_root(tmp_path) -> Path:
    root = tmp_path / 'kaist-cvpr15'
    frames = list(BBGT) + list(KAIST_XML) + ['set01/V000/I00005', 'set01/V000/I00006', 'set07/V000/I00001']
    for n, frame in enumerate(frames):
        s, v, i = frame.split('/')
        image(root / 'images' / s / v / 'visible' / f'{i}.jpg', KAIST_SIZE, 40 + n)
        if frame != 'set01/V000/I00005':  # an RGB frame without its thermal partner
            size = (320, 256) if frame == 'set07/V000/I00001' else KAIST_SIZE  # a pair of two sizes
            image(root / 'images' / s / v / 'lwir' / f'{i}.jpg', size, 90 + n, mode='L')
    for frame, lines in BBGT.items():
        s, v, i = frame.split('/')
        write(root / 'annotations-xml-new-sanitized' / s / v / f'{i}.txt', '\n'.join(['% bbGt version=3', *lines]))
    for frame, objects in KAIST_XML.items():
        s, v, i = frame.split('/')
        write(root / 'annotations-test' / s / v / f'{i}.xml', kaist_xml(objects))
    # set01/V000/I00006 has images but no annotation file.
    write(root / 'imageSets' / 'train-all-02.txt', '\n'.join([*BBGT, 'set01/V000/I00005', 'set01/V000/I00006',
                                                              'not-a-frame', '']))
    write(root / 'imageSets' / 'test-all-20.txt', '\n'.join([*KAIST_XML, 'set07/V000/I00001']))
    return root


def kaist_command(root: Path, out: Path, *extra):
    return ['kaist', '--root', root, '--train-list', root / 'imageSets' / 'train-all-02.txt',
            '--val-list', root / 'imageSets' / 'test-all-20.txt', '--val-annotations', root / 'annotations-test',
            '--out', out, *extra]


def test_kaist_writes_the_kaist_fusion_layout_with_ignore_regions(kaist_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert run_cli(*kaist_command(kaist_root, out)) == 0
    printed = capsys.readouterr().out
    train = json.loads((out / 'coco_annotations' / 'train.json').read_text())
    val = json.loads((out / 'coco_annotations' / 'val.json').read_text())
    assert [im['id'] for im in train['images']] == list(BBGT)
    assert [im['time_of_day'] for im in train['images']] == ['day', 'day', 'night']
    assert train['images'][0] == {'id': 'set00/V000/I00000', 'file_name': 'set00/V000/I00000.jpg',
                                  'width': 640, 'height': 512, 'time_of_day': 'day'}
    assert (out / 'visible' / 'train' / 'set00' / 'V000' / 'I00000.jpg').is_file()
    assert (out / 'infrared' / 'test' / 'set09' / 'V000' / 'I00039.jpg').is_file()
    assert train['categories'] == [{'id': 1, 'name': 'person'}]
    by_box = {(a['image_id'], tuple(a['bbox'])): a for a in train['annotations']}
    first = by_box[('set00/V000/I00000', (100.0, 100.0, 40.0, 100.0))]
    assert first == {'id': 1, 'image_id': 'set00/V000/I00000', 'bbox': [100.0, 100.0, 40.0, 100.0], 'area': 4000.0,
                     'category_id': 1, 'label': 'person', 'height': 100.0, 'occlusion': 0, 'ignore': 0, 'iscrowd': 0}
    ignored = {(a['image_id'][-1], a['label'], a['bbox'][0]): a['ignore'] for a in train['annotations']}
    assert ignored == {('0', 'person', 100.0): 0, ('0', 'people', 300.0): 1, ('0', 'cyclist', 450.0): 1,
                       ('0', 'person', 520.0): 1, ('1', 'person', 200.0): 1, ('1', 'person', 2.0): 1,
                       ('1', 'person?', 400.0): 1, ('1', 'person', 100.0): 1}
    assert all(a['iscrowd'] == a['ignore'] for a in train['annotations'] + val['annotations'])
    assert [a['occlusion'] for a in val['annotations']] == [0, 1, 0]
    assert [a['ignore'] for a in val['annotations']] == [0, 0, 1]
    report = json.loads((out / 'conversion_report.json').read_text())
    assert report['splits']['train'] == {
        'pairs': 3, 'boxes': {'cyclist': 1, 'people': 1, 'person': 5, 'person?': 1},
        'ignored': {'border': 1, 'flagged': 1, 'height': 1, 'label': 3, 'occlusion': 1}}
    assert report['splits']['val']['pairs'] == 2
    skipped = dict(report['skipped'])
    assert set(skipped) == {'set01/V000/I00005', 'set01/V000/I00006', 'not-a-frame', 'set07/V000/I00001'}
    assert skipped['set01/V000/I00005'].startswith('unpaired: no thermal image') and 'lwir/I00005.jpg' in \
        skipped['set01/V000/I00005']
    assert 'no annotation file' in skipped['set01/V000/I00006']
    assert 'RGB is 640x512 but thermal is 320x256' in skipped['set07/V000/I00001']
    assert report['dropped_boxes'] == {'box without area': {'count': 1, 'examples': ['set00/V000/I00001']}}
    assert 'set01/V000/I00005: unpaired: no thermal image' in printed
    assert 'train: 3 pairs; boxes: cyclist 1, people 1, person 5, person? 1; ignore regions: 7' in printed
    assert '--dataset_file kaist_fusion' in printed


def test_kaist_conversion_is_idempotent(kaist_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert run_cli(*kaist_command(kaist_root, out)) == 0
    first = tree_state(out)
    capsys.readouterr()
    assert run_cli(*kaist_command(kaist_root, out)) == 0
    assert tree_state(out) == first, 'a second run rewrites nothing'
    assert 'image files: 0 written, 10 up to date; annotation files written: none' in capsys.readouterr().out


def test_kaist_output_reads_as_kaist_fusion_with_ignore_regions_out_of_the_targets(kaist_root, tmp_path):
    out = tmp_path / 'out'
    run_cli(*kaist_command(kaist_root, out))
    train = build_dataset('train', cfg_for(out, 'kaist_fusion', 3))
    assert train.image_id_map == {frame: n for n, frame in enumerate(BBGT, start=1)}
    train.transforms = None
    targets = [train.load_pair(i)[2] for i in range(len(train))]
    assert [t['boxes'].tolist() for t in targets] == [[[100.0, 100.0, 140.0, 200.0]], [], []]
    val = build_dataset('val', cfg_for(out, 'kaist_fusion', 3))
    evaluator = val.benchmark_evaluator()
    assert type(evaluator).__name__ == 'MissRateEvaluator'


def test_kaist_needs_a_list_and_names_missing_folders(kaist_root, tmp_path, capsys):
    assert run_cli('kaist', '--root', kaist_root, '--out', tmp_path / 'o') == 2
    assert 'give --train-list and/or --val-list' in capsys.readouterr().err
    assert run_cli('kaist', '--root', tmp_path / 'nowhere', '--train-list', 'x.txt', '--out', tmp_path / 'o') == 2
    assert 'KAIST image folder not found' in capsys.readouterr().err


def test_kaist_readers_and_frame_names(tmp_path):
    path = write(tmp_path / 'a.txt', '% bbGt version=3\nperson 1 2 3 4 1 0 0 0 0 0 0\npeople 5 6 7 8 0 0 0 0 0 1 0\n')
    assert read_bbgt(str(path)) == [('person', [1.0, 2.0, 3.0, 4.0], 1, False),
                                    ('people', [5.0, 6.0, 7.0, 8.0], 0, True)]
    with pytest.raises(LabelFileError, match='a.txt:2'):
        read_bbgt(str(write(tmp_path / 'a.txt', '% bbGt version=3\nperson 1 2 x 4\n')))
    xml = write(tmp_path / 'b.xml', kaist_xml([('person', (1, 2, 3, 4), 2)]))
    assert read_kaist_xml(str(xml)) == [('person', [1.0, 2.0, 3.0, 4.0], 2, False)]
    corners = write(tmp_path / 'c.xml', voc_xml([('person', (1, 2, 11, 22))]))
    assert read_kaist_xml(str(corners)) == [('person', [1.0, 2.0, 10.0, 20.0], 0, False)]
    assert frame_name('set06/V000/I00019') == 'set06/V000/I00019'
    assert frame_name('images/set06/V000/I00019.jpg') == 'set06/V000/I00019'
    assert frame_name('set06_V000_I00019') == 'set06/V000/I00019'
    assert frame_name('I00019') is None


# ---------------------------------------------------------------- FLIR-aligned

FLIR_OBJECTS = {1: [('person', (10, 10, 20, 40)), ('car', (30, 20, 60, 40))],
                2: [('bicycle', (5, 5, 25, 30)), ('dog', (40, 30, 50, 40))],
                3: [], 4: [('car', (1, 1, 30, 30))]}


@pytest.fixture
def flir_root(tmp_path) -> Path:
    root = tmp_path / 'FLIR_aligned' / 'align'
    for n, objects in FLIR_OBJECTS.items():
        frame = f'FLIR_{n:05d}'
        if n != 3:  # FLIR_00003 has its thermal image only
            image(root / 'JPEGImages' / f'{frame}_RGB.jpg', value=50 + n, fmt='JPEG')
        image(root / 'JPEGImages' / f'{frame}_PreviewData.jpeg', value=100 + n, mode='L', fmt='JPEG')
        write(root / 'Annotations' / f'{frame}_PreviewData.xml', voc_xml(objects, (64, 48)))
    write(root / 'align_train.txt', 'FLIR_00001\nFLIR_00002_PreviewData\nFLIR_00003\n')
    write(root / 'ImageSets' / 'Main' / 'align_validation.txt', 'FLIR_00004.jpeg\n')
    return root


def test_flir_writes_the_flir_fusion_layout_with_coco_ids(flir_root, tmp_path, capsys):
    out = tmp_path / 'out'
    assert run_cli('flir', '--root', flir_root.parent, '--out', out) == 0
    printed = capsys.readouterr().out
    train = json.loads((out / 'annotations' / 'train.json').read_text())
    assert train['categories'] == [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'bicycle'}, {'id': 3, 'name': 'car'}]
    assert train['images'][0] == {'id': 1, 'file_name_RGB': 'FLIR_00001_RGB.jpg',
                                  'file_name_IR': 'FLIR_00001_PreviewData.jpeg', 'width': 64, 'height': 48}
    assert [(a['image_id'], a['category_id'], a['bbox']) for a in train['annotations']] == [
        (1, 1, [10.0, 10.0, 10.0, 30.0]), (1, 3, [30.0, 20.0, 30.0, 20.0]), (2, 2, [5.0, 5.0, 20.0, 25.0])]
    assert (out / 'train_RGB' / 'FLIR_00002_RGB.jpg').is_file()
    assert (out / 'val_thermal' / 'FLIR_00004_PreviewData.jpeg').is_file()
    report = json.loads((out / 'conversion_report.json').read_text())
    assert report['skipped'][0][0] == 'FLIR_00003' and 'unpaired: no RGB image' in report['skipped'][0][1]
    assert report['dropped_boxes'] == {"class 'dog' not in the label map": {'count': 1, 'examples': ['FLIR_00002']}}
    assert 'category ids: person 1, bicycle 2, car 3' in printed
    ds = build_dataset('val', cfg_for(out, 'flir_fusion', 91))
    ds.transforms = None
    assert ds.load_pair(0)[2]['labels'].tolist() == [3]


def test_flir_label_map_keeps_the_dogs(flir_root, tmp_path):
    label_map = write(tmp_path / 'map.json', json.dumps({'person': 1, 'bicycle': 2, 'car': 3, 'dog': 18}))
    assert run_cli('flir', '--root', flir_root, '--out', tmp_path / 'out', '--label-map', label_map) == 0
    train = json.loads((tmp_path / 'out' / 'annotations' / 'train.json').read_text())
    assert [a['category_id'] for a in train['annotations']] == [1, 3, 2, 18]


def test_strict_makes_a_skipped_entry_an_error(flir_root, tmp_path, capsys):
    assert run_cli('flir', '--root', flir_root, '--out', tmp_path / 'out', '--strict') == 2
    err = capsys.readouterr().err
    assert err.startswith('error: 1 entries were skipped') and err.count('\n') == 1


# ---------------------------------------------------------------- M3FD and generic folders

M3FD_OBJECTS = {f'{n:05d}': [('People', (1, 1, 10, 20)), ('Lamp', (20, 5, 24, 15))] if n % 2 else
                [('Car', (5, 5, 40, 30)), ('Truck', (0, 0, 0, 10))] for n in range(6)}


@pytest.fixture
def m3fd_root(tmp_path) -> Path:
    root = tmp_path / 'M3FD'
    for name, objects in M3FD_OBJECTS.items():
        image(root / 'Vis' / f'{name}.png', value=10)
        image(root / 'Ir' / f'{name}.png', value=200, mode='L')
        write(root / 'Annotation' / f'{name}.xml', voc_xml(objects))
    image(root / 'Ir' / '00099.png', mode='L')  # thermal without RGB
    return root


def test_m3fd_seeded_split_and_coco_aligned_ids(m3fd_root, tmp_path):
    out = tmp_path / 'out'
    assert run_cli('m3fd', '--root', m3fd_root, '--out', out, '--val-ratio', '0.5', '--seed', '3') == 0
    train = json.loads((out / 'coco_annotations' / 'train.json').read_text())
    val = json.loads((out / 'coco_annotations' / 'val.json').read_text())
    names = sorted(M3FD_OBJECTS)
    expected_val = sorted(names[i] for i in np.random.default_rng(3).permutation(6)[:3])
    assert sorted(im['file_name'][:5] for im in val['images']) == expected_val
    assert len(train['images']) == 3 and {im['id'] for im in train['images']} == {int(n) for n in names} - {
        int(n) for n in expected_val}
    assert {a['category_id'] for a in train['annotations'] + val['annotations']} == {1, 3, 10}
    assert [c['id'] for c in train['categories']] == [1, 3, 4, 6, 8, 10]
    report = json.loads((out / 'conversion_report.json').read_text())
    assert report['skipped'] == [['00099', f'unpaired: {m3fd_root / "Ir" / "00099.png"} has no RGB partner in '
                                           f'{m3fd_root / "Vis"}']]
    assert report['dropped_boxes']['box without area']['count'] == 3
    ds = build_dataset('train', cfg_for(out, 'llvip_fusion', 91))
    assert len(ds) == 3


def test_m3fd_val_list_decides_the_split(m3fd_root, tmp_path):
    listed = write(tmp_path / 'val.txt', '00001\n00004.png\n00077\n')
    assert run_cli('m3fd', '--root', m3fd_root, '--out', tmp_path / 'out', '--val-list', listed) == 0
    val = json.loads((tmp_path / 'out' / 'coco_annotations' / 'val.json').read_text())
    assert [im['id'] for im in val['images']] == [1, 4]
    report = json.loads((tmp_path / 'out' / 'conversion_report.json').read_text())
    assert ['00077', f'listed in {listed} but no image pair has this name'] in report['skipped']


def test_generic_yolo_with_suffixes_and_background_images(tmp_path, capsys):
    src = tmp_path / 'custom'
    for key in ('a', 'b', 'c'):
        image(src / 'rgb' / f'{key}_rgb.jpg', (100, 50), fmt='JPEG')
        image(src / 'ir' / f'{key}_ir.jpg', (100, 50), mode='L', fmt='JPEG')
    write(src / 'labels' / 'a.txt', '0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.1 0.2\n')
    write(src / 'labels' / 'b_rgb.txt', '1 0.5 0.5 0.5 0.5\n')  # named after the RGB file
    out = tmp_path / 'out'
    assert run_cli('generic', '--rgb-dir', src / 'rgb', '--ir-dir', src / 'ir', '--labels', src / 'labels',
                   '--format', 'yolo', '--classes', 'person', 'car', '--rgb-suffix', '_rgb', '--ir-suffix', '_ir',
                   '--val-ratio', '0', '--out', out) == 0
    printed = capsys.readouterr().out
    assert 'pairs without a label file (kept without boxes): 1' in printed
    assert 'val: no pairs, no annotation file written' in printed
    assert not (out / 'coco_annotations' / 'val.json').exists()
    train = json.loads((out / 'coco_annotations' / 'train.json').read_text())
    assert [im['file_name'] for im in train['images']] == ['a.jpg', 'b.jpg', 'c.jpg']
    assert [(a['image_id'], a['category_id'], a['bbox']) for a in train['annotations']] == [
        ('a', 1, [40.0, 15.0, 20.0, 20.0]), ('a', 2, [20.0, 20.0, 10.0, 10.0]), ('b', 2, [25.0, 12.5, 50.0, 25.0])]
    assert train['categories'] == [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'}]
    assert (out / 'infrared' / 'train' / 'c.jpg').is_file()
    assert len(build_dataset('train', cfg_for(out, 'llvip_fusion', 3))) == 3


def test_generic_voc_layouts_and_refusals(tmp_path):
    src = tmp_path / 'custom'
    image(src / 'rgb' / '1.jpg', fmt='JPEG')
    image(src / 'ir' / '1.png', mode='L')
    image(src / 'rgb' / '2.jpg', fmt='JPEG')
    image(src / 'ir' / '2.jpg', (32, 32), mode='L', fmt='JPEG')
    write(src / 'voc' / '1.xml', voc_xml([('truck', (1, 1, 9, 9)), ('bus', (2, 2, 8, 8))]))
    write(src / 'voc' / '2.xml', '<annotation><object>')
    base = ['generic', '--rgb-dir', src / 'rgb', '--ir-dir', src / 'ir', '--labels', src / 'voc', '--val-ratio', '0']
    assert run_cli(*base, '--out', tmp_path / 'llvip') == 0
    report = json.loads((tmp_path / 'llvip' / 'conversion_report.json').read_text())
    assert [entry for entry, _ in report['skipped']] == ['1', '2']
    assert 'use --layout flir' in report['skipped'][0][1] and 'RGB is 64x48 but thermal is 32x32' in \
        report['skipped'][1][1]
    assert run_cli(*base, '--layout', 'flir', '--out', tmp_path / 'flir') == 0
    train = json.loads((tmp_path / 'flir' / 'annotations' / 'train.json').read_text())
    assert train['categories'] == [{'id': 1, 'name': 'bus'}, {'id': 2, 'name': 'truck'}]  # sorted names found
    assert train['images'][0]['file_name_IR'] == '1.png' and len(train['annotations']) == 2


def test_yolo_without_classes_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / 'x').mkdir()
    assert run_cli('generic', '--rgb-dir', tmp_path / 'x', '--ir-dir', tmp_path / 'x', '--labels', tmp_path / 'x',
                   '--format', 'yolo', '--out', tmp_path / 'o') == 2
    assert 'needs --classes' in capsys.readouterr().err


# ---------------------------------------------------------------- shared pieces

def test_label_readers(tmp_path):
    xml = write(tmp_path / 'a.xml', voc_xml([('car', (1, 2, 3, 4))], (10, 20)))
    assert read_voc(str(xml)) == ((10, 20), [('car', (1.0, 2.0, 3.0, 4.0))])
    with pytest.raises(LabelFileError, match='not readable XML'):
        read_voc(str(write(tmp_path / 'b.xml', '<annotation>')))
    yolo = write(tmp_path / 'a.txt', '1 0.5 0.5 1 1\n\n')
    assert read_yolo(str(yolo), 10, 20, ['a', 'b']) == [('b', (0.0, 0.0, 10.0, 20.0))]
    with pytest.raises(LabelFileError, match='class index 2'):
        read_yolo(str(write(tmp_path / 'c.txt', '2 0.5 0.5 1 1')), 10, 20, ['a', 'b'])
    with pytest.raises(LabelFileError, match='5 fields'):
        read_yolo(str(write(tmp_path / 'd.txt', '0 0.5 0.5')), 10, 20, ['a'])


def test_seeded_split_depends_only_on_names_ratio_and_seed():
    names = [f'{i:03d}' for i in range(20)]
    split = seeded_split(names, 0.25, 7)
    assert split == seeded_split(list(reversed(names)), 0.25, 7)
    assert sum(v == 'val' for v in split.values()) == 5
    assert split != seeded_split(names, 0.25, 8)


@pytest.mark.parametrize('mode', ['copy', 'hardlink', 'symlink'])
def test_place_file_is_idempotent_in_every_mode(tmp_path, mode):
    src = write(tmp_path / 'src.bin', 'data')
    dst = tmp_path / 'out' / 'dst.bin'
    assert place_file(str(src), str(dst), mode) is True
    assert dst.read_text() == 'data' and place_file(str(src), str(dst), mode) is False
    if mode == 'symlink':
        assert os.readlink(dst) == str(src)
    src.write_text('changed!')
    if mode == 'copy':
        assert place_file(str(src), str(dst), mode) is True and dst.read_text() == 'changed!'
