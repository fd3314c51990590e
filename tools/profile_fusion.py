"""Cost of the fusion per feature level: FLOPs and CPU time of conv_corr + redim_corr, and their share of the model.

Usage::

    python -m tools.profile_fusion --config config/DINO/DINO_4scale.py --height 512 --width 640

Builds the model of the config with random weights (no download) and runs one inference forward on a batch of one
image pair. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (nothing is
computed; 2 FLOPs per multiply-accumulate; convolutions, matmuls, linear layers and attention; element-wise ops,
softmax, interpolation and the deformable-attention sampling are not counted). Time is wall time on the CPU,
measured by forward hooks (``PartTimer``, also used by ``tools/benchmark.py e2e``) around each
``conv_corr[l]``/``redim_corr[l]``, both backbones, the transformer and the whole model; the deformable
attention uses the pure-PyTorch path so that nothing is compiled. Prints a Markdown table
(docs/benchmarks/fusion_cost.md holds the measured ones).
"""
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/profile_fusion.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build_model
from util.cli import ArgumentParser, run_command
from util.config import load_config
from util.misc import NestedTensor

GIGA = 1e9


def _pair(height: int, width: int, device: str) -> tuple[NestedTensor, NestedTensor]:
    generator = torch.Generator().manual_seed(0)
    rgb = torch.randn(1, 3, height, width, generator=generator).to(device)
    ir = torch.randn(1, 3, height, width, generator=generator).to(device)
    mask = torch.zeros(1, height, width, dtype=torch.bool, device=device)
    return NestedTensor(rgb, mask), NestedTensor(ir, mask)


def fusion_parts(model) -> dict[str, torch.nn.Module]:
    """Named parts to measure: fusion modules per level, both backbones, the transformer."""
    parts = {'backbone_visible': model.backbone_visible, 'backbone_ir': model.backbone_ir,
             'transformer': model.transformer}
    for level in range(model.num_feature_levels):
        if model.conv_corr is not None:
            parts[f'conv_corr.{level}'] = model.conv_corr[level]
        if model.redim_corr is not None:
            parts[f'redim_corr.{level}'] = model.redim_corr[level]
    return parts


def count_flops(cfg, height: int, width: int) -> tuple[dict[str, float], float, dict[int, tuple[int, int]]]:
    """FLOPs per part and in total, and the (H, W) of each fused level, from a forward on the meta device."""
    with torch.device('meta'):
        model, _, _ = build_model(cfg)
    model.eval().requires_grad_(False)  # FlopCounterMode's module tracker fails under no_grad on leaf inputs
    shapes = {}
    for level in range(model.num_feature_levels):
        fusion = model.redim_corr[level] if model.redim_corr is not None else None
        if fusion is not None:
            fusion.register_forward_hook(
                lambda module, args, out, level=level: shapes.__setitem__(level, tuple(out.shape[-2:])))
    counter = FlopCounterMode(display=False)
    with counter:
        model(*_pair(height, width, 'meta'))
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_part = {name: float(sum(counts.get(f'{root}.{name}', {}).values())) for name in fusion_parts(model)}
    return per_part, float(counter.get_total_flops()), shapes


class PartTimer:
    """Time per forward of groups of sub-modules, measured with forward pre-/post-hooks.

    ``groups``: ``{group: [module, ...]}``. After each forward, ``take()`` returns ``{group: seconds}`` summed
    over the calls of that forward and clears the record. ``remove()`` takes the hooks off the modules.
    ``clock``: seconds as a float, ``time.perf_counter`` (wall) unless given, e.g. ``time.process_time``.
    """

    def __init__(self, groups: dict[str, list[torch.nn.Module]], clock=time.perf_counter):
        self._clock = clock
        self._spent = {group: 0.0 for group in groups}
        self._started = {}
        self._handles = []
        for group, modules in groups.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(module)))
                self._handles.append(module.register_forward_hook(self._post_hook(module, group)))

    def _pre_hook(self, module):
        def hook(_module, _args):
            self._started[id(module)] = self._clock()
        return hook

    def _post_hook(self, module, group):
        def hook(_module, _args, _output):
            self._spent[group] += self._clock() - self._started.pop(id(module))
        return hook

    def take(self) -> dict[str, float]:
        spent = dict(self._spent)
        self._spent = dict.fromkeys(self._spent, 0.0)
        return spent

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def time_parts(cfg, height: int, width: int, repeats: int) -> tuple[dict[str, float], float]:
    """Seconds per part and for the whole forward (minimum over ``repeats`` runs) on the CPU."""
    model, _, _ = build_model(cfg)
    model.eval()
    timer = PartTimer({name: [module] for name, module in fusion_parts(model).items()})
    samples = _pair(height, width, 'cpu')
    spent, totals = defaultdict(list), []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(*samples)
            totals.append(time.perf_counter() - start)
            for name, seconds in timer.take().items():
                spent[name].append(seconds)
    timer.remove()
    return {name: min(values) for name, values in spent.items()}, min(totals)


def markdown_table(per_part_flops, total_flops, shapes, per_part_time, total_time) -> str:
    def row(label, size, names):
        flops = sum(per_part_flops.get(n, 0.0) for n in names)
        seconds = sum(per_part_time.get(n, 0.0) for n in names)
        return (f'| {label} | {size} | {flops / GIGA:,.1f} | {100 * flops / total_flops:.1f} % | '
                f'{1000 * seconds:,.0f} | {100 * seconds / total_time:.1f} % |')

    lines = ['| part | H x W | GFLOPs | share of FLOPs | ms | share of time |', '|---|---|---:|---:|---:|---:|']
    fusion_names = []
    for level, (h, w) in sorted(shapes.items()):
        names = [f'conv_corr.{level}', f'redim_corr.{level}']
        fusion_names += names
        lines.append(row(f'fusion level {level}', f'{h} x {w}', names))
    lines.append(row('**fusion, all levels**', '', fusion_names))
    lines.append(row('backbone_visible + backbone_ir', '', ['backbone_visible', 'backbone_ir']))
    lines.append(row('transformer (incl. heads in the decoder)', '', ['transformer']))
    lines.append(f'| **whole model** | | {total_flops / GIGA:,.1f} | 100 % | {1000 * total_time:,.0f} | 100 % |')
    return '\n'.join(lines)


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser('tools/profile_fusion.py', description=__doc__.splitlines()[0])
    parser.add_argument('--config', required=True, help='model config, e.g. config/DINO/DINO_4scale.py')
    parser.add_argument('--height', type=int, default=512)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--repeats', type=int, default=1, help='timed forwards; the fastest counts')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--options', nargs='*', default=[], help='config overrides key=value')
    return parser


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.options) + ['msda_backend=pytorch'])
    per_part_flops, total_flops, shapes = count_flops(cfg, args.height, args.width)
    per_part_time, total_time = time_parts(cfg, args.height, args.width, args.repeats)
    print(f'{args.config}, input {args.height} x {args.width}, batch 1, inference, CPU threads '
          f'{torch.get_num_threads()}, best of {args.repeats}, load average {os.getloadavg()[0]:.1f} on '
          f'{os.cpu_count()} cores')
    print(markdown_table(per_part_flops, total_flops, shapes, per_part_time, total_time))


def main(argv: list[str] | None = None) -> int:
    return run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
