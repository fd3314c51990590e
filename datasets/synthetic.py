"""Synthetic RGB + thermal detection data set on disk, in the LLVIP layout, where fusion matters.

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

`python -m datasets.synthetic --out data/synthetic_llvip --num-train 200 --num-val 50 --seed 0
[--size 320x256] [--format png|jpg]`; the same bytes for the same arguments (PNG; JPEG with the same libjpeg).
"""
import argparse
import json
import os
import time

import numpy as np
import PIL.Image

CATEGORIES = ({'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'})
VISIBILITIES = ('both', 'rgb', 'ir')
VISIBILITY_PROBS = (0.6, 0.2, 0.2)
SPLITS = (('train', 'train', 0), ('val', 'test', 1))  # (image_set, LLVIP folder/file suffix, seed stream)

PERSON_CLOTHES = ((205, 35, 40), (225, 110, 25), (190, 30, 120))
PERSON_SKIN = (225, 185, 150)
CAR_BODIES = ((35, 75, 205), (230, 205, 35), (30, 160, 210))
CAR_WINDOW = (35, 45, 60)
MIN_GAP = 4


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
        if w > width or h > height:
            continue
        corner = _place(rng, w, h, width, height, taken)
        if corner is None:
            continue
        x, y = corner
        taken.append((x, y, w, h))
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


def generate_synthetic_dataset(out_dir: str, num_train: int = 200, num_val: int = 50, seed: int = 0,
                               width: int = 320, height: int = 256, image_format: str = 'png') -> dict:
    """Writes the data set (see the module docstring) and returns a summary.

    Returns {'out_dir', 'seed', 'size': [width, height], 'format', 'seconds',
    'splits': {'train'|'val': {'images', 'objects', 'visibility': {'both','rgb','ir': count}, 'annotation_file'}}}.
    Existing files of the same names are overwritten.
    """
    if image_format not in ('png', 'jpg'):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if width < 64 or height < 64:
        raise ValueError(f'image size {width}x{height} is too small; objects need at least 64x64 px')
    if num_train < 0 or num_val < 0:
        raise ValueError(f'num_train ({num_train}) and num_val ({num_val}) must be >= 0')
    start = time.perf_counter()
    counts = {'train': num_train, 'val': num_val}
    splits = {image_set: _write_split(out_dir, folder, stream, counts[image_set], seed, width, height, image_format)
              for image_set, folder, stream in SPLITS}
    return {'out_dir': out_dir, 'seed': seed, 'size': [width, height], 'format': image_format,
            'seconds': round(time.perf_counter() - start, 2), 'splits': splits}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--size must look like 320x256 (WxH), got {text!r}') from None
    return width, height


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description='Write a synthetic RGB+IR detection data set in the LLVIP layout.')
    parser.add_argument('--out', required=True, help='output folder (use it as --coco_path)')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=_parse_size, default=(320, 256), help='WxH, default 320x256')
    parser.add_argument('--format', choices=('png', 'jpg'), default='png')
    args = parser.parse_args(argv)
    summary = generate_synthetic_dataset(args.out, args.num_train, args.num_val, args.seed, *args.size, args.format)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == '__main__':
    main()
