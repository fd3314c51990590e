"""Run a trained CAFF-DINO on RGB + thermal image pairs: side-by-side pictures with boxes, and a COCO results JSON.

    python tools/predict.py -c CONFIG --checkpoint CKPT --rgb A.png --ir B.png --out DIR
    python tools/predict.py -c CONFIG --checkpoint CKPT --rgb-dir D1 --ir-dir D2 --out DIR [--batch-size 4]
    python tools/predict.py -c CONFIG --checkpoint CKPT --split val --coco_path P [--dataset_file X] --out DIR
    python tools/predict.py --checkpoint CKPT --rgb A.png --out DIR          # thermal image missing

A thin command line over ``tools/detector.py`` (``Detector``), which loads the model and predicts; this file reads
the inputs, draws and writes the results.

Not in the reference (its README: "a proper visualization code should be added"). Written for each pair:
``DIR/<rgb file stem>.png``, the RGB image (left) and the thermal image (right) side by side at their size on
disk, canvas ``(2 W, H)``, with the predicted boxes of score >= ``--threshold`` on both halves (one colour per
class, label ``"<class> <score>"``) and, in ``--split`` mode, the ground truth in green. Once for all pairs:
``DIR/detections.json``, a COCO results list ``[{image_id, category_id, bbox [x, y, w, h] pixels, score}]``
holding every detection of the post-processor (``num_select`` per image, not thresholded, so it can be scored
with pycocotools), and ``DIR/images.json``, a COCO skeleton (``images`` with ids and file names, ``categories``)
that says which pair each ``image_id`` is.

Image ids: the data set's ids in ``--split`` mode (so ``detections.json`` scores against its annotation file;
a file with string ids keeps them: ``PairedCocoDataset.image_id_map`` is undone, as in ``main.py``'s results);
1..N in file-name order for folders; 1 for a single pair. Folders are paired by identical file name.
Class names come from the data set's ``categories`` (the split's annotation file, or else the annotation file of
the config's ``coco_path`` when it exists); otherwise the class id is shown.

Preprocessing is the evaluation transform of ``datasets/transforms.py`` (``eval_size`` / ``eval_max_size`` of
the config); boxes are mapped back to the pixels of the files. The checkpoint is loaded weights-only and must
match the model of the config exactly. Without ``-c`` the config saved in the checkpoint is used (or, for a
checkpoint of the reference code, its saved run arguments).

Missing modality: a pair may lack one image (``--rgb`` without ``--ir`` or the other way round; in folder mode an
image without a partner of the same name; one folder alone). It is predicted with that image replaced by the mean
image (``datasets.transforms.missing_image``), drawn black, and one warning on stderr says how many pairs lacked which
image. A file named on the command line that does not exist is still an error.
Errors (missing partner file, unreadable image, bad checkpoint or config) end the run with one line on stderr
and exit status 2.
"""
import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ''):  # run as ``python tools/predict.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from datasets.coco_eval import CocoEvaluator
from datasets.images import DEFAULT_BIT_DEPTH, BadPairError, BitDepthRule, read_image
from datasets.pairs import boxes_to_target, coco_from_dict
from tools.detector import Detector, MissingModalityWarning, category_names, config_for_checkpoint, missing_summary
from util.checkpoint import load_checkpoint
from util.cli import ArgumentParser, run_command
from util.config import parse_options
from util.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
GT_COLOUR = (0, 220, 0)
# Prediction colours by class id (cycled); none of them is green, which marks the ground truth.
CLASS_COLOURS = ((255, 64, 64), (255, 160, 0), (0, 160, 255), (255, 0, 255), (255, 255, 0), (160, 100, 255),
                 (0, 255, 255), (255, 120, 180))


class PredictError(UserError, ValueError):
    """An input that cannot be predicted on (bad arguments, missing partner, empty folder)."""


@dataclass
class PairItem:
    """One image pair to predict on; a path is None when that image is missing; ``annotations``: its COCO ground
    truth (None when there is none)."""
    image_id: int
    name: str
    rgb_path: Optional[str]
    ir_path: Optional[str]
    annotations: Optional[list[dict]] = None

    @property
    def missing(self) -> Optional[str]:
        """``'rgb'`` or ``'ir'`` when that image is missing, else None."""
        return 'rgb' if self.rgb_path is None else 'ir' if self.ir_path is None else None


# ---------------------------------------------------------------------------------------------------- inputs

def _image_names(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise PredictError(f'{folder}: not a folder')
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))


def single_pair(rgb_path: Optional[str], ir_path: Optional[str]) -> list[PairItem]:
    """The pair ``(--rgb, --ir)`` as image id 1 (one of them may be None: missing); a named file that does not
    exist is an error naming it."""
    for path, partner in ((rgb_path, ir_path), (ir_path, rgb_path)):
        if path is not None and not os.path.isfile(path):
            raise PredictError(f'{path}: file not found' + (f' (partner of {partner})' if partner else ''))
    return [PairItem(1, Path(rgb_path or ir_path).stem, rgb_path, ir_path)]


def folder_pairs(rgb_dir: Optional[str], ir_dir: Optional[str]) -> list[PairItem]:
    """Pairs of ``rgb_dir`` and ``ir_dir`` by identical file name, ids 1..N in name order.

    An image without a partner of its name gives a pair with the partner missing; a folder that is None gives
    pairs without that modality.
    """
    rgb_names = set(_image_names(rgb_dir)) if rgb_dir else set()
    ir_names = set(_image_names(ir_dir)) if ir_dir else set()
    names = sorted(rgb_names | ir_names)
    if not names:
        folders = ' and '.join(d for d in (rgb_dir, ir_dir) if d)
        raise PredictError(f'{folders}: no images ({", ".join(IMAGE_EXTENSIONS)})')
    return [PairItem(i, Path(name).stem, os.path.join(rgb_dir, name) if name in rgb_names else None,
                     os.path.join(ir_dir, name) if name in ir_names else None)
            for i, name in enumerate(names, start=1)]


def split_pairs(dataset) -> list[PairItem]:
    """Every pair of a ``PairedCocoDataset``, in item order, with its annotations."""
    items = []
    for image_id in dataset.ids:
        rgb_name, ir_name = dataset.pair_names(dataset.coco.imgs[image_id])
        rgb_path = os.path.join(dataset.rgb_dir, rgb_name)
        items.append(PairItem(int(image_id), Path(rgb_path).stem, rgb_path, os.path.join(dataset.ir_dir, ir_name),
                              list(dataset.coco.imgToAnns.get(image_id, []))))
    return items


def read_pair(item: PairItem, bit_depth: BitDepthRule = DEFAULT_BIT_DEPTH
              ) -> tuple[Optional[PIL.Image.Image], Optional[PIL.Image.Image]]:
    """The two images of ``item`` (None where missing), read by the data sets' rule (``datasets/images.py``); a
    size mismatch is an error naming both files."""
    rgb = read_image(item.rgb_path, bit_depth) if item.rgb_path is not None else None
    ir = read_image(item.ir_path, bit_depth) if item.ir_path is not None else None
    if rgb is not None and ir is not None and rgb.size != ir.size:
        raise BadPairError(f'{item.rgb_path} is {rgb.width}x{rgb.height} but its partner {item.ir_path} is '
                           f'{ir.width}x{ir.height} (WxH); the pair must be registered to one size')
    return rgb, ir


# --------------------------------------------------------------------------------------------------- drawing

def _label_box(draw: PIL.ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
    draw.text(xy, text, fill=(0, 0, 0), font=font)


def draw_pair(rgb: Optional[PIL.Image.Image], ir: Optional[PIL.Image.Image], detections: dict,
              names: dict[int, str], threshold: float, gt: Optional[dict] = None) -> PIL.Image.Image:
    """RGB left, IR right on a ``(2 W, H)`` canvas; each box drawn on both halves.

    A missing image (None) leaves its half black, marked ``"<modality> missing"``. Ground truth (green, thin)
    first, then detections with score >= ``threshold`` (class colour, labelled ``"<name> <score>"``, label above
    the box or inside it at the top edge of the image).
    """
    width, height = (ir if ir is not None else rgb).size
    canvas = PIL.Image.new('RGB', (2 * width, height))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default()
    for image, left, label in ((rgb, 0, 'RGB'), (ir, width, 'thermal')):
        if image is not None:
            canvas.paste(image, (left, 0))
        else:
            draw.text((left + 4, 4), f'{label} missing', fill=(255, 255, 255), font=font)
    offsets = (0, width)
    if gt is not None:
        for box in gt['boxes'].tolist():
            for dx in offsets:
                draw.rectangle((box[0] + dx, box[1], box[2] + dx, box[3]), outline=GT_COLOUR, width=1)
    keep = detections['scores'] >= threshold
    for box, label, score in zip(detections['boxes'][keep].tolist(), detections['labels'][keep].tolist(),
                                 detections['scores'][keep].tolist()):
        colour = CLASS_COLOURS[label % len(CLASS_COLOURS)]
        text = f'{names.get(label, str(label))} {score:.2f}'
        for dx in offsets:
            x0, y0, x1, y1 = box[0] + dx, box[1], box[2] + dx, box[3]
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
            text_height = draw.textbbox((0, 0), text, font=font)[3]
            _label_box(draw, (x0 + 2, y0 - text_height - 2 if y0 > text_height + 2 else y0 + 2), text, colour, font)
    return canvas


# ------------------------------------------------------------------------------------------------------- run

def predict(detector: Detector, items: list[PairItem], out_dir: str, names: dict[int, str], threshold: float,
            batch_size: int, coco_gt=None, progress=None, image_id_map: Optional[dict] = None) -> CocoEvaluator:
    """Predict on ``items`` in batches; write one PNG per pair and the two JSON files into ``out_dir``.

    Returns a ``CocoEvaluator`` over ``coco_gt`` (an empty skeleton when None) holding every detection; call its
    ``accumulate()`` / ``summarize()`` to score them. ``progress(done, total)`` is called after each batch.
    Pairs with a missing image are predicted without it; the caller says so (the detector's per-batch warnings
    are silenced here).
    """
    os.makedirs(out_dir, exist_ok=True)
    images, taken = [], set()
    for item in items:
        if item.name in taken:
            raise PredictError(f'two pairs would both be drawn to {item.name}.png ({item.rgb_path or item.ir_path}); '
                               'rename one of them')
        taken.add(item.name)
    evaluator = CocoEvaluator(coco_gt if coco_gt is not None else
                              coco_from_dict({'images': [], 'annotations': [], 'categories': []}), image_id_map)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        pairs = [read_pair(item, detector.bit_depth) for item in batch]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', MissingModalityWarning)
            results = detector.predict([rgb for rgb, _ in pairs], [ir for _, ir in pairs], score_threshold=0.0,
                                       batch_size=batch_size)
        for item, (rgb, ir), detections in zip(batch, pairs, results):
            width, height = (ir if ir is not None else rgb).size
            gt = None
            if item.annotations is not None:
                gt = boxes_to_target(item.annotations, item.image_id, width, height)
            draw_pair(rgb, ir, detections, names, threshold, gt).save(os.path.join(out_dir, f'{item.name}.png'))
            images.append({'id': evaluator.original_id(item.image_id),
                           'file_name': os.path.basename(item.rgb_path) if item.rgb_path else None,
                           'file_name_IR': os.path.basename(item.ir_path) if item.ir_path else None,
                           'width': width, 'height': height})
            evaluator.update({item.image_id: {k: detections[k] for k in ('scores', 'labels', 'boxes')}})
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    evaluator.write_results(os.path.join(out_dir, 'detections.json'))
    categories = [{'id': i, 'name': n} for i, n in sorted(names.items())]
    with open(os.path.join(out_dir, 'images.json'), 'w', encoding='utf-8') as f:
        json.dump({'images': images, 'categories': categories}, f, indent=1)
    return evaluator


def _print_progress(done: int, total: int) -> None:
    end = '\n' if done == total or not sys.stderr.isatty() else ''
    print(f'\rpredict: {done}/{total} pairs', end=end, file=sys.stderr, flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('tools/predict.py', description=__doc__.splitlines()[0])
    parser.add_argument('--config_file', '-c', help="model config; default: the config saved in the checkpoint")
    parser.add_argument('--checkpoint', required=True, help='checkpoint written by main.py (needs a "model" entry)')
    source = parser.add_argument_group('input (one of)')
    source.add_argument('--rgb', help='one RGB image (with --ir; alone: the thermal image is missing)')
    source.add_argument('--ir', help='its thermal partner (with --rgb; alone: the RGB image is missing)')
    source.add_argument('--rgb-dir', help='folder of RGB images (with --ir-dir); pairs share the file name')
    source.add_argument('--ir-dir', help='folder of thermal images (with --rgb-dir); an image without a partner '
                                         'is predicted with the partner missing')
    source.add_argument('--split', choices=('train', 'val'), help="a split of the config's data set, with ground truth")
    source.add_argument('--coco_path', help='data root for --split (default: the config value)')
    source.add_argument('--dataset_file', help='llvip_fusion, flir_fusion or synthetic (default: the config value)')
    parser.add_argument('--out', required=True, help='output folder for the PNGs and detections.json')
    parser.add_argument('--threshold', type=float, default=0.3, help='lowest score drawn (default 0.3)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: the config's device)")
    parser.add_argument('--options', nargs='+', metavar='KEY=VALUE', default=[], help='override config keys')
    parser.add_argument('--allow_unsafe_checkpoint', action='store_true',
                        help='unpickle checkpoints beyond tensors and plain values (only for files you trust)')
    return parser


def _check_source(args: argparse.Namespace) -> str:
    modes = {'pair': bool(args.rgb or args.ir), 'folders': bool(args.rgb_dir or args.ir_dir),
             'split': bool(args.split)}
    chosen = [m for m, on in modes.items() if on]
    if len(chosen) != 1:
        raise PredictError('give exactly one input: --rgb A --ir B, --rgb-dir D1 --ir-dir D2, or --split val')
    mode = chosen[0]
    if args.batch_size < 1:
        raise PredictError(f'--batch-size must be >= 1, got {args.batch_size}')
    return mode


def run(args: argparse.Namespace) -> CocoEvaluator:
    """Everything after parsing; returns the evaluator with the detections (scored in ``--split`` mode)."""
    mode = _check_source(args)
    image_id_map = None
    options = parse_options(args.options)
    options.update({k: getattr(args, k) for k in ('coco_path', 'dataset_file') if getattr(args, k)})
    checkpoint = load_checkpoint(args.checkpoint, args.allow_unsafe_checkpoint)
    cfg = config_for_checkpoint(checkpoint, args.checkpoint, args.config_file, options)

    # Inputs are checked before the model is built, so a wrong path fails at once.
    if mode == 'split':
        from datasets import build_dataset
        try:
            dataset = build_dataset(args.split, cfg)
        except (ValueError, KeyError, FileNotFoundError) as e:  # messages name the file or key at fault
            raise PredictError(e.args[0] if e.args else repr(e)) from None
        items, names, gt_coco = split_pairs(dataset), category_names(dataset.coco.dataset), dataset.coco
        image_id_map = dataset.image_id_map
    elif mode == 'pair':
        items, gt_coco = single_pair(args.rgb, args.ir), None
        read_pair(items[0], BitDepthRule(cfg.high_bit_depth_rule, cfg.high_bit_depth_limits))
    else:
        items, gt_coco = folder_pairs(args.rgb_dir, args.ir_dir), None
    detector = Detector.from_config(cfg, checkpoint['model'], args.device or cfg.device,
                                    names if mode == 'split' else None, source=args.checkpoint)
    if mode != 'split':
        names = detector.class_names
    warning = missing_summary([item.missing for item in items])
    if warning is not None:
        print(f'warning: {warning}', file=sys.stderr)
    evaluator = predict(detector, items, args.out, names, args.threshold, args.batch_size, gt_coco,
                        _print_progress if mode != 'pair' else None, image_id_map)
    print(f'predict: {len(items)} pair(s) drawn to {args.out}/, detections in {args.out}/detections.json')
    if gt_coco is not None:
        evaluator.accumulate()
        print(evaluator.summarize(), end='')
    return evaluator


def main(argv: list[str] | None = None) -> int:
    def predict(args) -> None:  # run() returns the evaluator (for the Python API); the exit status is 0
        run(args)

    return run_command(get_args_parser(), predict, argv)


if __name__ == '__main__':
    sys.exit(main())
