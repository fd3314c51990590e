"""Synthetic RGB + thermal detection data sets on disk where fusion matters: LLVIP-style, and KAIST-style.

Not in the reference: a small, seeded stand-in for LLVIP so the whole pipeline (reader, transforms, training,
COCO evaluation) runs in minutes on a CPU without downloads. Written as::

    OUT/visible/{train,test}/NNNNNN.png     RGB frame (uint8, 3 channels)
    OUT/infrared/{train,test}/NNNNNN.png    thermal frame (uint8, 1 channel), same name and size
    OUT/coco_annotations/LLVIP_train.json, LLVIP_test.json

Generative model (per image, from its own generator seeded with (seed, split, index), so a split does not
change when the other split's size changes):
- Background. RGB: a muted ground colour (each channel U[70, 150]) with a linear brightness ramp of +-20 in a
  random direction and pixel noise N(0, 5^2). IR: ambient temperature U[60, 100] with its own ramp of +-12 and
  noise N(0, 3^2). Neither contains anything object-like.
- Objects: K ~ U{1..5}, placed without overlap (4 px apart) and fully inside the frame. Class uniform over
  1 "person" (upright: ellipse body under a round head; height U[50, 90], width 0.40 x height) and 2 "car"
  (wide: body rectangle under a narrower cabin; width U[45, 90], height 0.5 x width). The box is the tight
  extent of the drawn shape (clean, unblurred edges).
- Visibility v ~ {both: 0.6, rgb: 0.2, ir: 0.2}, stored per annotation as "visibility":
  * RGB appearance (v in both/rgb): person = saturated clothing colour (red/orange family) with a skin-tone
    head; car = saturated body colour (blue/yellow family) with a dark cabin window.
  * IR appearance (v in both/ir): person = warm body U[190, 225] with a hotter head (+20); car = engine-warm
    body U[140, 165], cooler cabin (-30), hot wheel strip along the bottom (230).
  * v = "rgb": an ambient-temperature object (a cold parked car, a mannequin): drawn in RGB only, the IR
    frame keeps the ambient background there.
  * v = "ir": a warm object in the dark (unlit pedestrian or running car at night): drawn in IR only, the RGB
    frame keeps its background there.
  So an RGB-only detector misses about a fifth of the objects and an IR-only one another fifth; only a
  detector that uses both images can find them all. Shapes, colours and heat are per-class distinctive so a
  tiny DETR can learn them quickly.
- Categories: 1 person, 2 car; the category id is the class index (num_classes >= 3; 0 is unused).

KAIST-style variant (``generate_synthetic_kaist``; ``--variant kaist``), so that ``kaist_fusion`` and its MR^-2
(``datasets/kaist_eval.py``) run end to end. Written as ``tools/convert.py kaist`` writes the real data set::

    OUT/visible/{train,test}/setXX/V000/I#####.png, OUT/infrared/... (same names), OUT/coco_annotations/{train,val}.json

- Frames alternate day and night: train frames come from set00 (day) and set03 (night), val frames from set06
  (day) and set09 (night); the image entry's ``time_of_day`` says which. Default size 640 x 512, KAIST's.
- By day, RGB is the usual muted ground (U[90, 160] per channel, ramp +-20) and IR a mild ambient U[80, 110]; at
  night, RGB is dark (U[10, 35], ramp +-8) and IR cooler (U[50, 80]). Visibility v ~ {both, rgb, ir} with
  probabilities (0.7, 0.15, 0.15) by day and (0.3, 0.1, 0.6) at night; at night an RGB-visible person is drawn at
  35 % of its colour.
- Objects: K ~ U{1..5}, each labelled ``person`` (p 0.7), ``people`` (0.1: two or three persons side by side,
  one box), ``cyclist`` (0.1: a person over two hot wheels) or ``person?`` (0.1: a person 10-15 grey levels
  above the background in both images). Person height U[30, min(130, H - 12)] px, width 0.41 x height. A
  ``person`` is occluded with probability 0.3 (occlusion 1: a background-coloured bar over its lower 35 %; 2:
  over its lower 70 %, in both images); the box keeps the whole person.
- Boxes are written by ``datasets.kaist.kaist_annotation``: ``person`` boxes that the reasonable setting keeps
  are the targets; the other labels, persons under 55 px, heavily occluded or at the border are ignore regions
  (``ignore`` = ``iscrowd`` = 1). Image ids are the frame names.

`python -m datasets.synthetic --out data/synthetic_llvip --num-train 200 --num-val 50 --seed 0
[--size 320x256] [--format png|jpg] [--variant llvip|kaist]`; the same bytes for the same arguments (PNG; JPEG
with the same libjpeg).
"""
import argparse
import json
import os
import time

import numpy as np
import PIL.Image

from datasets.kaist import CATEGORIES as KAIST_CATEGORIES
from datasets.kaist import IGNORE_LABELS, PERSON, kaist_annotation, time_of_day

CATEGORIES = ({'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'})
VISIBILITIES = ('both', 'rgb', 'ir')
VISIBILITY_PROBS = (0.6, 0.2, 0.2)
SPLITS = (('train', 'train', 0), ('val', 'test', 1))  # (image_set, LLVIP folder/file suffix, seed stream)

PERSON_CLOTHES = ((205, 35, 40), (225, 110, 25), (190, 30, 120))
PERSON_SKIN = (225, 185, 150)
CAR_BODIES = ((35, 75, 205), (230, 205, 35), (30, 160, 210))
CAR_WINDOW = (35, 45, 60)
MIN_GAP = 4

KAIST_LABELS = (PERSON, *IGNORE_LABELS)  # person, people, cyclist, person?
KAIST_LABEL_PROBS = (0.7, 0.1, 0.1, 0.1)
KAIST_VISIBILITY_PROBS = {'day': (0.7, 0.15, 0.15), 'night': (0.3, 0.1, 0.6)}
KAIST_OCCLUSION_PROBS = (0.7, 0.2, 0.1)  # none, partial, heavy
KAIST_OCCLUDED_FRACTION = (0.0, 0.35, 0.7)
KAIST_SPLITS = (('train', 'train', 2, ('set00', 'set03')), ('val', 'test', 3, ('set06', 'set09')))


def _ramp(rng: np.random.Generator, height: int, width: int, amplitude: float) -> np.ndarray:
    """(H, W) linear ramp from -amplitude to +amplitude along a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = (xs / max(width - 1, 1) - 0.5) * np.cos(angle) + (ys / max(height - 1, 1) - 0.5) * np.sin(angle)
    return (2 * amplitude * proj).astype(np.float32)


def _person_parts(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (h, w) masks of a person's head (circle on top) and body (ellipse below)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    r = 0.32 * w
    head = (xs - w / 2) ** 2 + (ys - r) ** 2 <= r ** 2
    top, bottom = 1.6 * r, float(h)
    cy, ry = (top + bottom) / 2, (bottom - top) / 2
    body = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return head, body & ~head


def _car_parts(w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean (h, w) masks of a car's cabin (top 40%, inset 20%), body and wheel strip (bottom 15%)."""
    ys, xs = np.mgrid[0:h, 0:w]
    cabin = (ys < 0.4 * h) & (xs >= 0.2 * w) & (xs < 0.8 * w)
    body = ys >= 0.4 * h
    wheels = body & (ys >= 0.85 * h)
    return cabin, body & ~wheels, wheels


def _place(rng: np.random.Generator, w: int, h: int, width: int, height: int, taken: list) -> tuple[int, int] | None:
    """Top-left corner for a w x h box inside the frame, MIN_GAP px away from the `taken` boxes; None if none."""
    for _ in range(50):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w + MIN_GAP <= tx or tx + tw + MIN_GAP <= x or y + h + MIN_GAP <= ty or ty + th + MIN_GAP <= y
               for tx, ty, tw, th in taken):
            return x, y
    return None


def _claim(rng: np.random.Generator, w: int, h: int, width: int, height: int, taken: list) -> tuple[int, int] | None:
    """Top-left corner of a w x h box that fits the frame and keeps clear of ``taken`` (then added to it), or None."""
    if w > width or h > height:
        return None
    corner = _place(rng, w, h, width, height, taken)
    if corner is not None:
        taken.append((*corner, w, h))
    return corner


def _paint(image: np.ndarray, x: int, y: int, mask: np.ndarray, value) -> None:
    region = image[y:y + mask.shape[0], x:x + mask.shape[1]]
    region[mask] = value


def render_pair(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: RGB (H, W, 3) uint8, IR (H, W) uint8 and its objects [{bbox xywh, category_id, visibility}]."""
    ground = rng.uniform(70, 150, size=3).astype(np.float32)
    rgb = ground[None, None, :] + _ramp(rng, height, width, 20)[..., None]
    ir = rng.uniform(60, 100) + _ramp(rng, height, width, 12)
    objects, taken = [], []
    for _ in range(int(rng.integers(1, 6))):
        category = int(rng.integers(1, 3))
        visibility = VISIBILITIES[int(rng.choice(3, p=VISIBILITY_PROBS))]
        if category == 1:
            h = int(rng.integers(50, 91))
            w = max(8, int(round(0.4 * h)))
        else:
            w = int(rng.integers(45, 91))
            h = int(round(0.5 * w))
        corner = _claim(rng, w, h, width, height, taken)
        if corner is None:
            continue
        x, y = corner
        if category == 1:
            head, body = _person_parts(w, h)
            parts_rgb = [(head, PERSON_SKIN), (body, PERSON_CLOTHES[int(rng.integers(len(PERSON_CLOTHES)))])]
            warm = rng.uniform(190, 225)
            parts_ir = [(head, warm + 20), (body, warm)]
            shape = head | body
        else:
            cabin, body, wheels = _car_parts(w, h)
            colour = CAR_BODIES[int(rng.integers(len(CAR_BODIES)))]
            parts_rgb = [(cabin, CAR_WINDOW), (body, colour), (wheels, (25, 25, 25))]
            warm = rng.uniform(140, 165)
            parts_ir = [(cabin, warm - 30), (body, warm), (wheels, 230)]
            shape = cabin | body | wheels
        if visibility in ('both', 'rgb'):
            for mask, value in parts_rgb:
                _paint(rgb, x, y, mask, value)
        if visibility in ('both', 'ir'):
            for mask, value in parts_ir:
                _paint(ir, x, y, mask, value)
        rows, cols = np.nonzero(shape)
        x0, y0 = x + int(cols.min()), y + int(rows.min())
        bw, bh = int(cols.max()) - int(cols.min()) + 1, int(rows.max()) - int(rows.min()) + 1
        objects.append({'bbox': [x0, y0, bw, bh], 'category_id': category, 'visibility': visibility})
    rgb = rgb + 5 * rng.standard_normal(rgb.shape, dtype=np.float32)
    ir = ir + 3 * rng.standard_normal(ir.shape, dtype=np.float32)
    return (np.clip(np.rint(rgb), 0, 255).astype(np.uint8), np.clip(np.rint(ir), 0, 255).astype(np.uint8),
            objects)


def _save(array: np.ndarray, path: str, image_format: str) -> None:
    image = PIL.Image.fromarray(array)
    if image_format == 'png':
        image.save(path, format='PNG', compress_level=1)
    else:
        image.save(path, format='JPEG', quality=95)


def _write_split(out_dir: str, folder: str, stream: int, count: int, seed: int, width: int, height: int,
                 image_format: str) -> dict:
    rgb_dir = os.path.join(out_dir, 'visible', folder)
    ir_dir = os.path.join(out_dir, 'infrared', folder)
    os.makedirs(rgb_dir, exist_ok=True)
    os.makedirs(ir_dir, exist_ok=True)
    images, annotations = [], []
    ext = 'png' if image_format == 'png' else 'jpg'
    for index in range(count):
        rng = np.random.default_rng([seed, stream, index])
        rgb, ir, objects = render_pair(rng, width, height)
        image_id = index + 1
        name = f'{image_id:06d}.{ext}'
        _save(rgb, os.path.join(rgb_dir, name), image_format)
        _save(ir, os.path.join(ir_dir, name), image_format)
        images.append({'id': image_id, 'file_name': name, 'width': width, 'height': height})
        for obj in objects:
            annotations.append(dict(obj, id=len(annotations) + 1, image_id=image_id, iscrowd=0,
                                    area=obj['bbox'][2] * obj['bbox'][3]))
    ann_dir = os.path.join(out_dir, 'coco_annotations')
    os.makedirs(ann_dir, exist_ok=True)
    ann_file = os.path.join(ann_dir, f'LLVIP_{folder}.json')
    coco = {'info': {'description': f'synthetic RGB+IR pairs, seed {seed}, {width}x{height}'},
            'images': images, 'annotations': annotations, 'categories': [dict(c) for c in CATEGORIES]}
    with open(ann_file, 'w', encoding='utf-8') as f:
        json.dump(coco, f, indent=1, sort_keys=True)
    visibility = {v: sum(a['visibility'] == v for a in annotations) for v in VISIBILITIES}
    return {'images': count, 'objects': len(annotations), 'visibility': visibility, 'annotation_file': ann_file}


def _check_arguments(num_train: int, num_val: int, width: int, height: int, image_format: str) -> None:
    if image_format not in ('png', 'jpg'):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if width < 64 or height < 64:
        raise ValueError(f'image size {width}x{height} is too small; objects need at least 64x64 px')
    if num_train < 0 or num_val < 0:
        raise ValueError(f'num_train ({num_train}) and num_val ({num_val}) must be >= 0')


def generate_synthetic_dataset(out_dir: str, num_train: int = 200, num_val: int = 50, seed: int = 0,
                               width: int = 320, height: int = 256, image_format: str = 'png') -> dict:
    """Writes the data set (see the module docstring) and returns a summary.

    Returns {'out_dir', 'seed', 'size': [width, height], 'format', 'seconds',
    'splits': {'train'|'val': {'images', 'objects', 'visibility': {'both','rgb','ir': count}, 'annotation_file'}}}.
    Existing files of the same names are overwritten.
    """
    _check_arguments(num_train, num_val, width, height, image_format)
    start = time.perf_counter()
    counts = {'train': num_train, 'val': num_val}
    splits = {image_set: _write_split(out_dir, folder, stream, counts[image_set], seed, width, height, image_format)
              for image_set, folder, stream in SPLITS}
    return {'out_dir': out_dir, 'seed': seed, 'size': [width, height], 'format': image_format,
            'seconds': round(time.perf_counter() - start, 2), 'splits': splits}


def _kaist_figures(rng: np.random.Generator, label: str, h: int) -> list[tuple[int, int, int]]:
    """The persons (x offset, width, height) a KAIST-style object is drawn from, in its own box coordinates."""
    w = max(8, int(round(0.41 * h)))
    if label == 'people':
        count = int(rng.integers(2, 4))
        return [(int(round(0.7 * w * k)), w, h - int(rng.integers(0, max(1, h // 8)))) for k in range(count)]
    return [(0, w, h)]


def render_kaist_pair(rng: np.random.Generator, width: int, height: int,
                      daytime: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One KAIST-style scene: RGB (H, W, 3), IR (H, W) uint8 and its boxes [{bbox xywh, label, occlusion}]."""
    night = daytime == 'night'
    ground = rng.uniform(10, 35, size=3) if night else rng.uniform(90, 160, size=3)
    rgb = ground.astype(np.float32)[None, None, :] + _ramp(rng, height, width, 8 if night else 20)[..., None]
    ambient = rng.uniform(50, 80) if night else rng.uniform(80, 110)
    ir = ambient + _ramp(rng, height, width, 12)
    objects, taken = [], []
    for _ in range(int(rng.integers(1, 6))):
        label = KAIST_LABELS[int(rng.choice(len(KAIST_LABELS), p=KAIST_LABEL_PROBS))]
        visibility = VISIBILITIES[int(rng.choice(3, p=KAIST_VISIBILITY_PROBS[daytime]))]
        h = int(rng.integers(30, max(31, min(130, height - 12) + 1)))
        figures = _kaist_figures(rng, label, h)
        w = max(x + fw for x, fw, _ in figures)
        wheel = max(6, h // 4) if label == 'cyclist' else 0
        box_w, box_h = max(w, 2 * wheel + 4), h + wheel // 2
        corner = _claim(rng, box_w, box_h, width, height, taken)
        if corner is None:
            continue
        x, y = corner
        faint = label == 'person?'
        clothes = np.asarray(PERSON_CLOTHES[int(rng.integers(len(PERSON_CLOTHES)))], dtype=np.float32)
        skin = np.asarray(PERSON_SKIN, dtype=np.float32)
        if faint:
            clothes = skin = ground + rng.uniform(10, 15)
        elif night:
            clothes, skin = 0.35 * clothes, 0.35 * skin
        warm = ambient + rng.uniform(10, 15) if faint else rng.uniform(190, 225)
        top = y + box_h - wheel // 2 - h
        for fx, fw, fh in figures:
            head, body = _person_parts(fw, fh)
            fy = top + h - fh
            if visibility in ('both', 'rgb'):
                _paint(rgb, x + fx, fy, head, skin)
                _paint(rgb, x + fx, fy, body, clothes)
            if visibility in ('both', 'ir'):
                _paint(ir, x + fx, fy, head, warm + (0 if faint else 20))
                _paint(ir, x + fx, fy, body, warm)
        if wheel:
            ys, xs = np.mgrid[0:wheel, 0:wheel] + 0.5
            disc = (xs - wheel / 2) ** 2 + (ys - wheel / 2) ** 2 <= (wheel / 2) ** 2
            for wx in (x, x + box_w - wheel):
                _paint(rgb, wx, y + box_h - wheel, disc, (25, 25, 25))
                _paint(ir, wx, y + box_h - wheel, disc, 230)
        occlusion = int(rng.choice(3, p=KAIST_OCCLUSION_PROBS)) if label == PERSON else 0
        if occlusion:
            bar = int(round(KAIST_OCCLUDED_FRACTION[occlusion] * box_h))
            rgb[y + box_h - bar:y + box_h, x:x + box_w] = ground + 25
            ir[y + box_h - bar:y + box_h, x:x + box_w] = ambient
        objects.append({'bbox': [x, y, box_w, box_h], 'label': label, 'occlusion': occlusion})
    rgb = rgb + 5 * rng.standard_normal(rgb.shape, dtype=np.float32)
    ir = ir + 3 * rng.standard_normal(ir.shape, dtype=np.float32)
    return (np.clip(np.rint(rgb), 0, 255).astype(np.uint8), np.clip(np.rint(ir), 0, 255).astype(np.uint8),
            objects)


def _write_kaist_split(out_dir: str, image_set: str, folder: str, stream: int, sets: tuple[str, str], count: int,
                       seed: int, width: int, height: int, image_format: str) -> dict:
    images, annotations, labels, ignored = [], [], {}, {}
    ext = 'png' if image_format == 'png' else 'jpg'
    for index in range(count):
        frame = f'{sets[index % 2]}/V000/I{index // 2:05d}'
        daytime = time_of_day(frame)
        rgb, ir, objects = render_kaist_pair(np.random.default_rng([seed, stream, index]), width, height, daytime)
        name = f'{frame}.{ext}'
        for modality, array in (('visible', rgb), ('infrared', ir)):
            path = os.path.join(out_dir, modality, folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save(array, path, image_format)
        images.append({'id': frame, 'file_name': name, 'width': width, 'height': height, 'time_of_day': daytime})
        for obj in objects:
            ann, reason = kaist_annotation(obj['label'], obj['bbox'], obj['occlusion'], width, height)
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=frame))
            labels[obj['label']] = labels.get(obj['label'], 0) + 1
            if reason:
                ignored[reason] = ignored.get(reason, 0) + 1
    ann_file = os.path.join(out_dir, 'coco_annotations', f'{image_set}.json')
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    coco = {'info': {'description': f'synthetic KAIST-style RGB+IR pairs, seed {seed}, {width}x{height}'},
            'images': images, 'annotations': annotations, 'categories': [dict(c) for c in KAIST_CATEGORIES]}
    with open(ann_file, 'w', encoding='utf-8') as f:
        json.dump(coco, f, indent=1, sort_keys=True)
    return {'images': count, 'objects': len(annotations), 'labels': labels, 'ignored': ignored,
            'targets': sum(1 for a in annotations if not a['ignore']),
            'time_of_day': {t: sum(im['time_of_day'] == t for im in images) for t in ('day', 'night')},
            'annotation_file': ann_file}


def generate_synthetic_kaist(out_dir: str, num_train: int = 200, num_val: int = 50, seed: int = 0,
                             width: int = 640, height: int = 512, image_format: str = 'png') -> dict:
    """Writes the KAIST-style variant (see the module docstring) and returns a summary.

    Returns {'out_dir', 'seed', 'size', 'format', 'seconds', 'splits': {'train'|'val': {'images', 'objects',
    'labels': {label: count}, 'ignored': {reason: count}, 'targets', 'time_of_day': {'day', 'night'},
    'annotation_file'}}}. Existing files of the same names are overwritten.
    """
    _check_arguments(num_train, num_val, width, height, image_format)
    start = time.perf_counter()
    counts = {'train': num_train, 'val': num_val}
    splits = {image_set: _write_kaist_split(out_dir, image_set, folder, stream, sets, counts[image_set], seed, width,
                                            height, image_format)
              for image_set, folder, stream, sets in KAIST_SPLITS}
    return {'out_dir': out_dir, 'seed': seed, 'size': [width, height], 'format': image_format,
            'seconds': round(time.perf_counter() - start, 2), 'splits': splits}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--size must look like 320x256 (WxH), got {text!r}') from None
    return width, height


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description='Write a synthetic RGB+IR detection data set (LLVIP or KAIST style).')
    parser.add_argument('--out', required=True, help='output folder (use it as --coco_path)')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=_parse_size, help='WxH, default 320x256 (llvip) or 640x512 (kaist)')
    parser.add_argument('--format', choices=('png', 'jpg'), default='png')
    parser.add_argument('--variant', choices=('llvip', 'kaist'), default='llvip',
                        help='llvip: persons and cars, --dataset_file synthetic; kaist: KAIST-style persons with '
                             'ignore regions and day/night frames, --dataset_file kaist_fusion')
    args = parser.parse_args(argv)
    if args.variant == 'kaist':
        summary = generate_synthetic_kaist(args.out, args.num_train, args.num_val, args.seed,
                                           *(args.size or (640, 512)), args.format)
    else:
        summary = generate_synthetic_dataset(args.out, args.num_train, args.num_val, args.seed,
                                             *(args.size or (320, 256)), args.format)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == '__main__':
    main()
