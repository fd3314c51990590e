"""Export a CAFF-DINO to ONNX with dynamic height and width, then check the file with onnxruntime against PyTorch.

    python tools/export_onnx.py -c CONFIG --checkpoint CKPT --out model.onnx --height 512 --width 640
        [--postprocess] [--check-size 448x576 ...] [--time N] [--options k=v ...]

Not in the reference (DINO and Deformable-DETR users report that export fails: the autograd op of MSDeformAttn has
no ONNX form, and tracing bakes the input size into the graph). The graph:

- inputs ``rgb`` and ``ir``: float32 ``(1, 3, height, width)``, normalised as the evaluation transform leaves them,
  ``(x / 255 - mean) / std`` per channel with the ImageNet ``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224,
  0.225)``, after resizing the pair as the config's ``eval_size`` / ``eval_max_size`` say (or to any size that
  meets the constraint below); one pair per call, no padding;
- outputs ``pred_logits`` ``(1, Q, num_classes)`` and ``pred_boxes`` ``(1, Q, 4)`` (cxcywh in [0, 1] of the input),
  what ``model(rgb, ir)`` returns in eval mode; with ``--postprocess`` also ``scores`` ``(1, k)``, ``labels``
  ``(1, k)`` int64 and ``boxes`` ``(1, k, 4)`` xyxy in input pixels: the top ``k = num_select`` over queries x
  classes, as ``models/postprocess.py`` computes them (scale the boxes by original / input size to get file
  pixels);
- height and width are dynamic. Constraint: every feature map must be at least as large as the largest CAFF kernel,
  i.e. both sides >= ``(max(caff_kernel_sizes) - 1) * s + 1`` px for the coarsest level's stride ``s``: 385 px for
  the 4-scale configs (stride 64, kernel 7), 769 for the 5-scale Swin config (stride 128). Below that the eager
  model zero-pads the small maps (``models/fusion.py``), a different graph; the tool refuses such sizes. No other
  constraint (no multiple of 32 is needed).

The export goes through ``torch.export`` (``torch.onnx.export(dynamo=True)``, opset 18) on the ``pytorch``
MSDeformAttn path (``grid_sample``), whatever ``msda_backend`` or ``CAFF_MSDA_BACKEND`` say. The check: onnxruntime
(CPU) and PyTorch run on a random normal pair at the export size and at each ``--check-size`` (default: one more
size, 64 px larger on both sides); the two-stage top-k can swap near-tied queries, so the queries are compared as
sets: the matched fraction is the share of PyTorch queries with an ONNX query within 1e-3 in every logit and box
coordinate (with ``--postprocess`` also the share of PyTorch detections with an ONNX detection of the same label
within 1e-3 in score and normalised box). A fraction below 97 % fails the export (exit status 1). ``--time N``
then prints the median CPU latency of N runs at the export size for PyTorch (``pytorch`` path, and the fused
``cpu`` kernel when it builds) and for onnxruntime, on ``torch.get_num_threads()`` threads, measured in interleaved
rounds (one run of each per round) so that the ratios hold on a shared machine.

Without ``--checkpoint`` the model keeps its random initialisation (for timing). The file records the
normalisation, the size constraint and the class names in its metadata (``caff_dino.*`` keys).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ''):  # run as ``python tools/export_onnx.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from tools.detector import Detector
from util.cli import ArgumentParser
from util.config import load_config, parse_options
from util.errors import UsageError, UserError, report_user_error
from util.misc import NestedTensor

OPSET = 18
MATCH_TOLERANCE = 1e-3
REQUIRED_MATCH = 0.97
INPUT_NAMES = ('rgb', 'ir')
OUTPUT_NAMES = ('pred_logits', 'pred_boxes')
POSTPROCESS_NAMES = ('scores', 'labels', 'boxes')


class ExportError(UserError, RuntimeError):
    """An export that cannot be made as asked (size below the constraint, missing onnx packages)."""


class OnnxExportModel(nn.Module):
    """``(rgb, ir) (1, 3, H, W) -> (pred_logits, pred_boxes[, scores, labels, boxes])`` for one unpadded pair.

    The images form NestedTensors with an all-False mask (nothing is padding), which is what ``collate_fn`` gives a
    batch of one. With ``postprocess`` (the detector's ``PostProcess``) the top-k detections follow, their boxes
    in the pixels of the input ``(W, H, W, H)``, each with a leading batch dimension of 1.
    """

    def __init__(self, model: nn.Module, postprocess: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.postprocess = postprocess

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = torch.zeros_like(rgb[:, 0], dtype=torch.bool)
        outputs = self.model(NestedTensor(rgb, mask), NestedTensor(ir, mask))
        logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
        if self.postprocess is None:
            return logits, boxes
        height, width = rgb.shape[-2:]
        size = torch.stack([torch.full((), height, device=rgb.device), torch.full((), width, device=rgb.device)])
        detections = self.postprocess({'pred_logits': logits, 'pred_boxes': boxes}, size[None])[0]
        return logits, boxes, detections['scores'][None], detections['labels'][None], detections['boxes'][None]


def minimum_side(model: nn.Module) -> int:
    """The smallest height / width the exported graph serves: ``(k - 1) * s + 1`` for the largest CAFF kernel k
    and the stride s of the coarsest level (each level of a ``stride``-s map of an ``n``-px side has ``ceil(n /
    s)`` px); 1 for fusion types without CAFF."""
    strides = list(model.backbone_visible.strides)
    coarsest = strides[-1] * 2 ** (model.num_feature_levels - len(strides))
    kernel = max(model.conv_corr[0].kernel_sizes) if model.conv_corr is not None else 1
    return (kernel - 1) * coarsest + 1


def check_size(height: int, width: int, minimum: int, what: str) -> None:
    if min(height, width) < minimum:
        raise ExportError(f'{what} {height}x{width} (HxW) is below the smallest size the exported graph serves, '
                          f'{minimum} px on each side (every feature level at least as large as the largest CAFF '
                          f'kernel); choose a larger size')


def msda_backend(model: nn.Module, name: str):
    """Context manager: every MSDeformAttn of ``model`` asks for backend ``name`` inside the block (its own backend
    is restored afterwards); ``CAFF_MSDA_BACKEND`` only applies when a model is built, so it cannot interfere."""
    from models.ops import use_backend
    return use_backend(model, name)


def export(wrapper: OnnxExportModel, path: str, height: int, width: int, metadata: dict[str, str]) -> None:
    """Write ``wrapper`` as ONNX to ``path``; example input of ``height`` x ``width``; both dims dynamic."""
    names = OUTPUT_NAMES + (POSTPROCESS_NAMES if wrapper.postprocess is not None else ())
    example = tuple(torch.randn(1, 3, height, width) for _ in INPUT_NAMES)
    dims = {2: 'height', 3: 'width'}
    with msda_backend(wrapper, 'pytorch'), torch.no_grad():
        program = torch.onnx.export(wrapper.eval(), example, input_names=list(INPUT_NAMES), output_names=list(names),
                                    dynamic_shapes={name: dims for name in INPUT_NAMES}, dynamo=True,
                                    opset_version=OPSET, verbose=False)
    for key, value in metadata.items():
        program.model.metadata_props[key] = value
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    program.save(path)


def matched_fraction(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float = MATCH_TOLERANCE) -> float:
    """Share of the rows of ``reference`` ``(N, D)`` that have a row of ``candidate`` ``(M, D)`` within
    ``tolerance`` in every coordinate (L-infinity distance): the queries compared as sets."""
    if len(reference) == 0:
        return 1.0
    if len(candidate) == 0:
        return 0.0
    distance = (reference[:, None, :] - candidate[None, :, :]).abs().amax(-1)
    return float((distance.min(1).values <= tolerance).float().mean())


def _query_rows(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[0], boxes[0]], -1).double()


def _detection_rows(scores, labels, boxes, height: int, width: int) -> torch.Tensor:
    """``(k, 6)``: label x 10 (so that different labels never match), score, box normalised by the input size."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    return torch.cat([labels[0, :, None].double() * 10, scores[0, :, None].double(), boxes[0].double() / scale], -1)


def parity(wrapper: OnnxExportModel, session, height: int, width: int, seed: int = 0) -> dict:
    """PyTorch vs onnxruntime on one random normal pair: matched fractions and the largest same-index differences."""
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, 3, height, width, generator=generator) for _ in INPUT_NAMES]
    with msda_backend(wrapper, 'pytorch'), torch.no_grad():
        expected = wrapper(*inputs)
    got = [torch.from_numpy(x) for x in session.run(None, {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs)})]
    result = {'size': f'{height}x{width}',
              'queries': matched_fraction(_query_rows(*expected[:2]), _query_rows(*got[:2])),
              'max_abs_diff': max(float((a - b).abs().max()) for a, b in zip(expected[:2], got[:2]))}
    if len(expected) > 2:
        result['detections'] = matched_fraction(_detection_rows(*expected[2:], height, width),
                                                _detection_rows(*got[2:], height, width))
    return result


def _interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable in ``runs`` over ``repeats`` rounds; each round calls every one once, in
    turn, so that a change of machine load during the measurement hits them alike. One warm-up call each first."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def latency(wrapper: OnnxExportModel, session, height: int, width: int, repeats: int) -> dict[str, float]:
    """Median seconds per pair at ``height`` x ``width``: PyTorch (pytorch MSDeformAttn path; fused cpu kernel when
    it builds) and onnxruntime, measured in interleaved rounds."""
    from models.ops import resolve_backend
    inputs = [torch.randn(1, 3, height, width) for _ in INPUT_NAMES]
    feeds = {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs)}

    def torch_run(backend):
        def run():
            with msda_backend(wrapper, backend), torch.no_grad():
                wrapper(*inputs)
        return run

    runs = {'pytorch (pytorch MSDeformAttn)': torch_run('pytorch')}
    if resolve_backend('cpu', torch.device('cpu')) == 'cpu':
        runs['pytorch (fused cpu MSDeformAttn)'] = torch_run('cpu')
    runs['onnxruntime'] = lambda: session.run(None, feeds)
    return _interleaved_medians(runs, repeats)


def ort_session(path: str):
    """An onnxruntime CPU session on ``torch.get_num_threads()`` threads."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError('onnxruntime is not installed: pip install -r requirements-extra.txt') from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not HEIGHTxWIDTH, e.g. 448x576') from None
    return height, width


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('tools/export_onnx.py', description=__doc__.splitlines()[0])
    parser.add_argument('--config_file', '-c', help='model config; default: the config saved in the checkpoint')
    parser.add_argument('--checkpoint', help='checkpoint of main.py (or of the reference); default: random weights')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--height', type=int, required=True, help='height of the example input (export size)')
    parser.add_argument('--width', type=int, required=True, help='width of the example input')
    parser.add_argument('--postprocess', action='store_true',
                        help='also output the top-k scores, labels and boxes (xyxy, input pixels)')
    parser.add_argument('--check-size', type=_parse_size, action='append', metavar='HxW',
                        help='another size for the onnxruntime check (repeatable); default: export size + 64 px')
    parser.add_argument('--time', type=int, default=0, metavar='N', help='time N runs of PyTorch and onnxruntime')
    parser.add_argument('--threads', type=int, help='torch and onnxruntime threads (default: torch default)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights and check inputs')
    parser.add_argument('--options', nargs='+', metavar='KEY=VALUE', default=[], help='override config keys')
    parser.add_argument('--allow_unsafe_checkpoint', action='store_true',
                        help='unpickle checkpoints beyond tensors and plain values (only for files you trust)')
    return parser


def load_detector(args: argparse.Namespace) -> Detector:
    options = parse_options(args.options)
    if args.checkpoint:
        return Detector.from_checkpoint(args.checkpoint, args.config_file, 'cpu', options,
                                        allow_unsafe=args.allow_unsafe_checkpoint)
    if not args.config_file:
        raise UsageError('give a config (-c CONFIG), a checkpoint (--checkpoint CKPT), or both')
    torch.manual_seed(args.seed)
    return Detector.from_config(load_config(args.config_file, options), None, 'cpu')


def run(args: argparse.Namespace) -> dict:
    """Export, check and (with --time) time; returns ``{'min_side', 'parity': [...], 'latency': {...}}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail early with a clear message)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f'{e.name} is not installed: pip install -r requirements-extra.txt') from None
    detector = load_detector(args)
    minimum = minimum_side(detector.model)
    check_size(args.height, args.width, minimum, '--height/--width')
    sizes = [(args.height, args.width)] + (args.check_size or [(args.height + 64, args.width + 64)])
    for height, width in sizes[1:]:
        check_size(height, width, minimum, '--check-size')
    wrapper = OnnxExportModel(detector.model, detector.postprocess if args.postprocess else None).eval()
    metadata = {'caff_dino.inputs': 'rgb, ir: float32 (1, 3, H, W), (x / 255 - mean) / std',
                'caff_dino.mean': json.dumps(list(IMAGENET_MEAN)), 'caff_dino.std': json.dumps(list(IMAGENET_STD)),
                'caff_dino.min_side': str(minimum),
                'caff_dino.class_names': json.dumps({str(k): v for k, v in detector.class_names.items()}),
                'caff_dino.eval_size': f'{detector.config.eval_size}, max {detector.config.eval_max_size}'}
    start = time.perf_counter()
    export(wrapper, args.out, args.height, args.width, metadata)
    print(f'export: wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MiB) in '
          f'{time.perf_counter() - start:.0f} s; inputs rgb, ir (1, 3, H, W) with H, W >= {minimum}')
    session = ort_session(args.out)
    report = {'min_side': minimum, 'parity': [parity(wrapper, session, h, w, args.seed) for h, w in sizes]}
    for row in report['parity']:
        line = f"check {row['size']}: {100 * row['queries']:.1f} % of the queries matched"
        if 'detections' in row:
            line += f", {100 * row['detections']:.1f} % of the detections"
        print(line + f" (largest same-index difference {row['max_abs_diff']:.2e})")
    if args.time:
        report['latency'] = latency(wrapper, session, args.height, args.width, args.time)
        for name, seconds in report['latency'].items():
            print(f'latency {args.height}x{args.width}, {torch.get_num_threads()} threads, {name}: '
                  f'{1000 * seconds:.0f} ms')
    return report


def passed(report: dict) -> bool:
    return all(min(v for k, v in row.items() if k in ('queries', 'detections')) >= REQUIRED_MATCH
               for row in report['parity'])


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
        report = run(args)
    except UserError as e:
        return report_user_error(e)
    if not passed(report):
        print(f'error: onnxruntime disagrees with PyTorch (fewer than {100 * REQUIRED_MATCH:.0f} % matched); '
              f'do not use {args.out}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
