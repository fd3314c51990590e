"""datasets/annotations.py: COCO JSON quirks normalised, box rules counted, bad entries named, one-line errors."""
import json
import re

import pytest

from datasets.annotations import (clip_xywh, coco_from_dict, load_annotations, map_image_ids, normalise_annotations,
                                  read_annotation_file, same_file_name)
from util.errors import DataError


def coco(images, annotations, categories=({'id': 1, 'name': 'person'},)):
    return {'images': images, 'annotations': annotations, 'categories': list(categories)}


def img(image_id, name=None, **extra):
    return dict(id=image_id, file_name=name or f'{image_id}.png', **extra)


def ann(image_id, bbox, category_id=1, **extra):
    return dict(image_id=image_id, bbox=bbox, category_id=category_id, **extra)


def normalise(data, num_classes=3, image_sizes=None):
    return normalise_annotations(data, 'ann.json', num_classes, same_file_name, image_sizes)


def test_zero_based_ids_and_annotation_ids_renumbered_from_one():
    data = coco([img(0), img(1)], [ann(0, [1, 1, 5, 5], 0, id=0), ann(1, [2, 2, 4, 4], 0, id=1)],
                categories=[{'id': 0, 'name': 'person'}])
    out = normalise(data, num_classes=2)
    assert [a['id'] for a in out.dataset['annotations']] == [1, 2]  # pycocotools treats a gt id of 0 as "no match"
    assert [a['category_id'] for a in out.dataset['annotations']] == [0, 0]
    assert coco_from_dict(out.dataset).getCatIds() == [0]


def test_string_image_ids_map_to_ints_and_back():
    data = coco([img('010001'), img('010002')], [ann('010002', [1, 1, 5, 5], id=1)])
    out = normalise(data)
    assert out.image_id_map == {'010001': 10001, '010002': 10002}
    assert out.original_ids == {10001: '010001', 10002: '010002'}
    assert out.dataset['annotations'][0]['image_id'] == 10002


def test_non_numeric_string_ids_map_to_positions():
    assert map_image_ids(['night_a', 'night_b'], 'f.json') == {'night_a': 1, 'night_b': 2}
    assert map_image_ids(['1', '01'], 'f.json') == {'1': 1, '01': 2}  # same integer value: positional
    assert map_image_ids([3, 5], 'f.json') is None
    with pytest.raises(DataError, match='f.json: duplicate image ids'):
        map_image_ids([3, 3], 'f.json')


def test_clip_xywh_against_a_direct_computation():
    assert clip_xywh([30, 20, 20, 20], 40, 30) == [30, 20, 10, 10]
    assert clip_xywh([-5, -5, 10, 10], 40, 30) == [0, 0, 5, 5]
    assert clip_xywh([50, 5, 10, 10], 40, 30) is None
    assert clip_xywh([50, 5, 10, 10], None, None) == [50, 5, 10, 10]  # size unknown: left as it is


def test_boxes_outside_are_clipped_or_dropped_and_counted_with_ids():
    data = coco([img(1, width=40, height=30), img(2)],
                [ann(1, [30, 20, 20, 20], id=11), ann(1, [50, 5, 10, 10], id=12), ann(1, [5, 5, 0, 10], id=13),
                 ann(1, [5, 5, 10, -3], id=14), ann(1, [1, 1, 8, 8], id=15), ann(2, [-5, -5, 10, 10], id=16)])
    out = normalise(data)
    boxes = {a['id']: a['bbox'] for a in out.dataset['annotations']}
    # image 2 has no size: only the sides at 0 can be clipped
    assert boxes == {1: [30.0, 20.0, 10.0, 10.0], 2: [1.0, 1.0, 8.0, 8.0], 3: [0.0, 0.0, 5.0, 5.0]}
    assert dict(out.problems.counts) == {'box_clipped': 2, 'box_outside': 1, 'box_degenerate': 2}
    assert [e.ref for e in out.problems.examples['box_degenerate']] == ['ann 13 of image 1', 'ann 14 of image 1']
    assert out.problems.summary('box_outside') == \
        '1 boxes entirely outside their image, dropped [box_outside]: ann 12 of image 1'


def test_file_sizes_replace_missing_json_sizes_and_clip_the_ground_truth():
    data = coco([img(1), img(2, width=40, height=30)], [ann(1, [-5, -5, 10, 10], id=1), ann(2, [30, 0, 20, 5], id=2)])
    out = normalise(data, image_sizes={1: (64, 48), 2: (40, 30)})
    assert [a['bbox'] for a in out.dataset['annotations']] == [[0.0, 0.0, 5.0, 5.0], [30.0, 0.0, 10.0, 5.0]]
    assert [(im['width'], im['height']) for im in out.dataset['images']] == [(64, 48), (40, 30)]
    assert out.problems.counts['size_from_file'] == 1 and out.problems.counts['box_clipped'] == 2


def test_crowd_kept_area_computed_and_extra_fields_kept():
    data = coco([img(1, width=40, height=30)], [ann(1, [1, 1, 8, 8], iscrowd=1, id=1),
                                                ann(1, [10, 10, 5, 4], visibility='ir', id=2)])
    out = normalise(data)
    first, second = out.dataset['annotations']
    assert first['iscrowd'] == 1 and second['iscrowd'] == 0
    assert second['area'] == 20.0 and second['visibility'] == 'ir'


@pytest.mark.parametrize('value, crowd', [(0, 0), (1, 1), (True, 1), (False, 0), ('0', 0), ('1', 1), (1.0, 1)])
def test_iscrowd_spellings_are_read_by_value_not_truthiness(value, crowd):
    out = normalise(coco([img(1)], [ann(1, [1, 1, 5, 5], iscrowd=value)]))
    assert out.dataset['annotations'][0]['iscrowd'] == crowd and not out.problems.counts


def test_category_names_missing_or_not_text_are_named_for_the_evaluator():
    listed = [{'id': 1}, {'id': 2, 'name': 7}, {'id': 0, 'name': ''}]
    out = normalise(coco([img(1)], [ann(1, [1, 1, 5, 5], 1)], categories=listed))
    assert [(c['id'], c['name']) for c in out.dataset['categories']] == [(1, '1'), (2, '7'), (0, '0')]
    assert sum('has name' in note for note in out.notes) == 3


def test_categories_derived_added_or_left_out():
    out = normalise({'images': [img(1)], 'annotations': [ann(1, [1, 1, 5, 5], 2)]})
    assert out.dataset['categories'] == [{'id': 2, 'name': '2'}]
    listed = [{'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}, {'id': 90, 'name': 'toothbrush'}]
    out = normalise(coco([img(1)], [ann(1, [1, 1, 5, 5], 1)], categories=listed), num_classes=4)
    assert [c['id'] for c in out.dataset['categories']] == [1, 3]
    assert any('category 90' in note for note in out.notes)


@pytest.mark.parametrize('annotation, kind, message', [
    ({'image_id': 1, 'category_id': 1}, 'annotation_missing_keys', r"annotations\[0\] lacks key\(s\) \['bbox'\]"),
    (ann(1, [1, 1, 5]), 'bad_bbox', r'annotations\[0\] has bbox \[1, 1, 5\]'),
    (ann(1, [1, float('nan'), 5, 5]), 'bad_bbox', 'has bbox'),
    (ann(1, ['1', 1, 5, 5]), 'bad_bbox', 'has bbox'),
    (ann(9, [1, 1, 5, 5]), 'unknown_image_id', 'image_id 9, which is not in "images"'),
    (ann([1], [1, 1, 5, 5]), 'unknown_image_id', r'image_id \[1\]'),
    (ann(1, [1, 1, 5, 5], 'person'), 'bad_category_id', "category_id 'person'"),
    (ann(1, [1, 1, 5, 5], 1.5), 'bad_category_id', 'category_id 1.5'),
    (ann(1, [1, 1, 5, 5], 3), 'category_out_of_range', r'category_id 3, outside \[0, 2\] for num_classes=3'),
    (ann(1, [1, 1, 5, 5], -1), 'category_out_of_range', 'category_id -1, outside'),
    (ann(1, [1, 1, 5, 5], iscrowd='yes'), 'bad_iscrowd', "iscrowd 'yes'; it must be 0 or 1"),
    (ann(1, [1, 1, 5, 5], iscrowd=2), 'bad_iscrowd', 'iscrowd 2'),
])
def test_bad_annotations_are_collected_and_raise_one_line_naming_file_and_entry(tmp_path, annotation, kind, message):
    data = coco([img(1)], [annotation])
    out = normalise(data)
    assert dict(out.problems.counts) == {kind: 1} and out.dataset['annotations'] == []
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match='ann.json') as info:
        load_annotations(str(path), num_classes=3)
    assert re.search(message, str(info.value)) and '\n' not in str(info.value), str(info.value)


def test_every_out_of_range_id_is_counted_and_the_error_says_how_many():
    data = coco([img(1)], [ann(1, [1, 1, 5, 5], c, id=n) for n, c in enumerate([1, 91, 95, 2, 120])])
    out = normalise(data, num_classes=91)
    assert out.problems.counts['category_out_of_range'] == 3
    with pytest.raises(DataError, match=r'annotations\[1\] \(id 1\) has category_id 91.*\(2 more problem'):
        out.raise_errors()


@pytest.mark.parametrize('data, message', [
    ({'annotations': []}, r"missing top-level key\(s\) \['images'\]"),
    ([], 'top level is a list'),
    ({'images': {}, 'annotations': []}, '"images" is a dict; expected a list'),
    ({'images': [{'file_name': 'a.png'}], 'annotations': []}, r"images\[0\] lacks key\(s\) \['id'\]"),
    ({'images': [{'id': 1}], 'annotations': []}, r"images\[0\] \(id 1\).*'file_name'"),
    ({'images': [img(1), img(1, 'b.png')], 'annotations': []}, 'duplicate image ids'),
    ({'images': [img([1])], 'annotations': []}, r'images\[0\] has id \[1\]; an image id must be an integer or a '
                                                'string'),
    ({'images': [img({'n': 1})], 'annotations': []}, r"images\[0\] has id \{'n': 1\}"),
    ({'images': [img(1)], 'annotations': [], 'categories': [{'name': 'x'}]}, r"categories\[0\] lacks key 'id'"),
])
def test_malformed_files_raise_naming_the_file(tmp_path, data, message):
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match='bad.json') as info:
        load_annotations(str(path), num_classes=3)
    assert re.search(message, str(info.value)), str(info.value)


@pytest.mark.parametrize('width, height', [(0, 30), (-40, 30), ('40', 30), (40, None)])
def test_bad_image_size_entries_are_errors(width, height):
    out = normalise(coco([img(1, width=width, height=height)], []))
    assert out.problems.counts['bad_image_entry'] == 1
    with pytest.raises(DataError, match="ann.json: image 1 has width="):
        out.raise_errors()


@pytest.mark.parametrize('content, message', [
    (b'{"images": [', 'not valid JSON'),
    (b'', 'not valid JSON'),
    ('{"images": [], "annotations": [], "info": "caf\xe9"}'.encode('latin-1'), 'not UTF-8 text'),
])
def test_unreadable_json_names_the_file(tmp_path, content, message):
    path = tmp_path / 'broken.json'
    path.write_bytes(content)
    with pytest.raises(DataError, match=f'broken.json: {message}'):
        read_annotation_file(str(path))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / 'bom.json'
    path.write_bytes(b'\xef\xbb\xbf' + json.dumps(coco([img(1)], [])).encode())
    assert load_annotations(str(path), num_classes=3).dataset['images'][0]['id'] == 1


def test_missing_annotation_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match='nothere.json: annotation file not found'):
        load_annotations(str(tmp_path / 'nothere.json'), num_classes=3)
