#!/usr/bin/env python
"""End-to-end CPU inference of our CAFF-DINO R50 4-scale next to the reference's, in one process or one each.

The command behind the side-by-side tables of docs/benchmarks/e2e_cpu.md. It lives with the benchmark pages, not
in tools/: nothing in the framework or its tests imports it, so the repository does not depend on the reference.
It fetches nothing: it is given our checkout (--repo) and the reference's CAFF-DINO folder (--ref, a
``git archive`` of kevinhelvig/CAFF-DETR, folder ``CAFF-DINO``).

    python docs/benchmarks/scripts/e2e_vs_reference.py --repo . --ref CAFF-DETR/CAFF-DINO --threads 2 --rounds 3 --clock wall

What it does:
- builds our R50 4-scale from ``config/DINO/DINO_4scale.py`` with our ``util.config.load_config`` and
  ``models.build_model`` (seed 0), one model instance per variant, each with its config overrides;
  every variant of one fusion type gets the weights of the first one built of that type (identical weights);
- builds the reference's model with its own ``build_dino`` from its own ``config/DINO/DINO_4scale.py``
  (its SLConfig), with a stub module for its missing compiled ``MultiScaleDeformableAttention``, its
  ``MSDeformAttnFunction.apply`` replaced by its own ``ms_deform_attn_core_pytorch``, and no weight download
  (its ``is_main_process()`` -> False for ``pretrained=``, and ``torch.hub`` downloads raise while it builds);
  then loads our ``caff`` state_dict into it by name and checks 0 missing / 0 unexpected keys;
- keeps the two repositories' top-level packages (``models``, ``util``, ...) apart in ``sys.modules``: each
  repository's modules are swapped in (with its root first on ``sys.path``) for its build and for every one of
  its forwards, and stashed away after, so lazy imports inside a forward resolve to that model's own code;
- input: one random RGB/IR pair (seed 0), batch 1, no resize, no padding (mask all False); ours is called
  ``model(rgb, ir)`` (its default ``query_modality='ir'`` puts the IR image on the query side), the reference
  ``model(ir, rgb)`` (its first input is its query side, see the reference SPEC §0), each with its own
  ``NestedTensor`` class;
- one warm-up forward per variant, then ``--rounds`` rounds in which the variants run one after the other
  (alternately), under ``torch.inference_mode`` in eval mode, post-processing not included;
- per-part times by forward pre/post hooks with the chosen clock: backbones (``backbone_visible`` and
  ``backbone_ir``, the Joiners with their position encodings), fusion (``conv_corr.{l}`` + ``redim_corr.{l}`` of
  every level), transformer + heads = total - backbones - fusion;
- output check on the warm-up forwards: encoder memory (the encoder's output, before the top-k query selection)
  and final ``pred_logits`` / ``pred_boxes``, max abs difference between the variants named below.

``--isolate`` runs every variant of every round in its own fresh process instead (build, one warm-up, one timed
forward; the rounds still alternate). In one process a model runs in the heap the earlier ones left, and glibc's
malloc returns freed memory to the system and faults it back in at a rate that depends on that history: the
reference measured 3.9 s after our older code and 4.5 s after our newer code in the same minute. Setting
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736`` in the
environment keeps freed memory in the process, which takes the page faults out of both models' times.
"""
import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------- variants

# name -> (label, fusion_type, msda_backend, speedups on)
OUR_VARIANTS = {
    'caff-pytorch': ("ours (`caff`, MSDeformAttn `pytorch`)", 'caff', 'pytorch', True),
    'caff-cpu': ("ours (`caff`, MSDeformAttn `cpu`, compiled)", 'caff', 'cpu', True),
    'caff_dw-pytorch': ("ours (`caff_dw`, MSDeformAttn `pytorch`)", 'caff_dw', 'pytorch', True),
    'caff_dw-cpu': ("ours (`caff_dw`, MSDeformAttn `cpu`, compiled)", 'caff_dw', 'cpu', True),
    'before': ("ours before the speedups (`caff`, `pytorch`, speedups off)", 'caff', 'pytorch', False),
}
REFERENCE = 'reference'
REFERENCE_LABEL = 'reference (kevinhelvig/CAFF-DETR, op replaced by its PyTorch formula)'
DEFAULT_VARIANTS = [REFERENCE, 'caff-pytorch', 'caff-cpu', 'caff_dw-pytorch', 'caff_dw-cpu']
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


# ------------------------------------------------------------------------------------ module isolation

def top_level_names(*roots: Path) -> set[str]:
    """Importable top-level names (packages, namespace folders, modules) at the root of each repository."""
    names = set()
    for root in roots:
        for path in root.iterdir():
            name = path.stem if path.suffix == '.py' else path.name
            if (path.is_dir() or path.suffix == '.py') and name.isidentifier() and not name.startswith(('.', '_')):
                names.add(name)
    return names


class RepoModules:
    """The ``sys.modules`` entries of one repository, swapped in while it runs and stashed away after.

    ``names``: the top-level names both repositories may define; while this repository is active, every
    ``sys.modules`` entry under those names is this repository's (the other's are held aside) and its root is
    first on ``sys.path``.
    """

    def __init__(self, label: str, root: Path, names: set[str]):
        self.label, self.root, self.names = label, str(root), names
        self.stash: dict[str, types.ModuleType] = {}
        self._active = False

    def _shared_keys(self) -> list[str]:
        return [key for key in sys.modules if key.split('.')[0] in self.names]

    @contextlib.contextmanager
    def active(self):
        if self._active:  # re-entrant use inside its own forward
            yield
            return
        held = {key: sys.modules.pop(key) for key in self._shared_keys()}
        sys.modules.update(self.stash)
        sys.path.insert(0, self.root)
        importlib.invalidate_caches()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            sys.path.remove(self.root)
            self.stash = {key: sys.modules.pop(key) for key in self._shared_keys()}
            sys.modules.update(held)

    def check_own(self) -> None:
        """Every stashed module under the shared names comes from this repository's root."""
        root = os.path.realpath(self.root)
        for key, module in self.stash.items():
            origin = getattr(module, '__file__', None)
            if origin and not os.path.realpath(origin).startswith(root + os.sep):
                raise RuntimeError(f'{self.label}: module {key} comes from {origin}, outside {root}')


# --------------------------------------------------------------------------------------------- timing

def load_part_timer(repo: RepoModules):
    """Our ``tools.profile_fusion.PartTimer`` (forward hooks per group of sub-modules, any clock), imported in
    our module space; the class keeps working after the space is stashed away."""
    with repo.active():
        return importlib.import_module('tools.profile_fusion').PartTimer


def part_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """Backbones (both Joiners) and fusion (conv_corr.l, redim_corr.l) by state-dict name, same in both models."""
    groups = {'backbones': [], 'fusion': []}
    for name, module in model.named_modules():
        parts = name.split('.')
        if name in ('backbone_visible', 'backbone_ir'):
            groups['backbones'].append(module)
        elif len(parts) == 2 and parts[0] in ('conv_corr', 'redim_corr') and parts[1].isdigit():
            groups['fusion'].append(module)
    if not all(groups.values()):
        raise RuntimeError(f'no module found for the parts {[k for k, v in groups.items() if not v]}')
    return groups


class Variant:
    """One model to time: how to call it, in which repository's module space, with which patches."""

    def __init__(self, name, label, model, repo: RepoModules, inputs, clock, part_timer, patches=None):
        self.name, self.label, self.model, self.repo, self.inputs = name, label, model, repo, inputs
        self.patches = patches or contextlib.nullcontext
        self.timer = part_timer(part_groups(model), clock)
        self.clock = clock
        self.runs: list[dict[str, float]] = []
        self.memory = None
        self.encoder_hook = None

    def capture_encoder(self, encoder: torch.nn.Module):
        def hook(_module, _args, out):
            self.memory = (out[0] if isinstance(out, tuple) else out).detach().clone()
        self.encoder_hook = encoder.register_forward_hook(hook)

    def forward(self, record: bool):
        with self.repo.active(), self.patches(), torch.inference_mode():
            start = self.clock()
            out = self.model(*self.inputs)
            total = self.clock() - start
        parts = self.timer.take()
        if record:
            self.runs.append({'total': total, **parts,
                              'transformer': total - parts['backbones'] - parts['fusion']})
        return out, total


# ----------------------------------------------------------------------------------------- our model

def build_ours(repo: RepoModules, repo_root: Path, names: list[str], height: int, width: int, clock,
               part_timer):
    with repo.active():
        from models import build_model
        from util.config import load_config
        from util.misc import NestedTensor
        fused_layers = importlib.import_module('models.fused_layers')
        msda_func = importlib.import_module('models.ops.ms_deform_attn_func')
        generator = torch.Generator().manual_seed(0)
        rgb = torch.randn(1, 3, height, width, generator=generator)
        ir = torch.randn(1, 3, height, width, generator=generator)
        mask = torch.zeros(1, height, width, dtype=torch.bool)
        inputs = (NestedTensor(rgb, mask), NestedTensor(ir, mask))
        config = repo_root / 'config' / 'DINO' / 'DINO_4scale.py'
        first_of_type: dict[str, torch.nn.Module] = {}
        variants = {}
        for name in names:
            label, fusion_type, backend, speedups = OUR_VARIANTS[name]
            cfg = load_config(config, [f'msda_backend={backend}', f'fusion_type={fusion_type}'])
            torch.manual_seed(0)
            model = build_model(cfg)[0].eval()
            if fusion_type in first_of_type:
                model.load_state_dict(first_of_type[fusion_type].state_dict(), strict=True)
            else:
                first_of_type[fusion_type] = model
            patches = None if speedups else speedups_off(model, fused_layers)
            variant = Variant(name, label, model, repo, inputs, clock, part_timer, patches)
            variant.capture_encoder(model.transformer.encoder)
            variant.msda_asked = backend
            variants[name] = variant
    return variants, (rgb, ir), msda_func


def speedups_off(model: torch.nn.Module, fused_layers: types.ModuleType):
    """Our model with the inference speedups switched off (optional 'before' variant): plain PyTorch ops
    instead of the oneDNN fused conv/linear kernels, the torchvision ResNet body instead of the folded
    channels-last one, the CAFF q/k/v convolutions one by one. Returns the context manager for the
    module-level switch; the per-instance parts are set here."""
    for joiner in (model.backbone_visible, model.backbone_ir):
        body_owner = joiner[0]
        if not hasattr(body_owner, '_forward_folded'):
            raise RuntimeError('before: the backbone has no _forward_folded to switch off')
        body_owner._forward_folded = lambda images, body=body_owner.body: list(body(images).values())
    for caff in model.conv_corr:
        if not hasattr(caff, '_projections'):
            raise RuntimeError('before: the fusion has no _projections to switch off')
        caff._projections = lambda name, convs, x1, x2: [convs[0](x1), convs[1](x2), convs[2](x2)]
    if not hasattr(fused_layers, '_ONEDNN'):
        raise RuntimeError('before: models.fused_layers has no _ONEDNN switch')

    @contextlib.contextmanager
    def onednn_off():
        saved = fused_layers._ONEDNN
        fused_layers._ONEDNN = False
        try:
            yield
        finally:
            fused_layers._ONEDNN = saved
    return onednn_off


# ------------------------------------------------------------------------------------ reference model

def _msda_stub() -> types.ModuleType:
    stub = types.ModuleType('MultiScaleDeformableAttention')
    stub.__doc__ = 'stub for the reference compiled op (not built here); its Python formula is used instead'

    def missing(*_args, **_kwargs):
        raise RuntimeError('MultiScaleDeformableAttention stub: the compiled op is not available')
    stub.ms_deform_attn_forward = stub.ms_deform_attn_backward = missing
    return stub


def build_reference(repo: RepoModules, ref_root: Path, state_dict: dict, rgb, ir, clock, part_timer):
    sys.modules.setdefault('MultiScaleDeformableAttention', _msda_stub())
    with repo.active():
        from util.slconfig import SLConfig
        from util.misc import NestedTensor
        msda = importlib.import_module('models.dino.ops.functions.ms_deform_attn_func')

        def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
            return msda.ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        msda.MSDeformAttnFunction.apply = staticmethod(apply)

        backbone_module = importlib.import_module('models.dino.backbone')
        backbone_module.is_main_process = lambda: False  # pretrained=is_main_process(): no ImageNet download
        from models.registry import MODULE_BUILD_FUNCS
        importlib.import_module('models.dino')  # registers 'dino'

        cfg = SLConfig.fromfile(str(ref_root / 'config' / 'DINO' / 'DINO_4scale.py'))
        args = argparse.Namespace(**cfg._cfg_dict.to_dict())
        args.device = 'cpu'  # main.py's --device (default 'cuda'); only the criterion's .to(device) reads it

        def no_download(*_args, **_kwargs):
            raise RuntimeError('reference build: weight download attempted (disabled)')
        saved_hub = torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file
        torch.hub.load_state_dict_from_url = torch.hub.download_url_to_file = no_download
        try:
            torch.manual_seed(0)
            model = MODULE_BUILD_FUNCS.get(args.modelname)(args)[0]
        finally:
            torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file = saved_hub
        result = model.load_state_dict(state_dict, strict=False)
        model.eval()
        mask = torch.zeros(rgb.shape[0], *rgb.shape[-2:], dtype=torch.bool)
        # Its first input is the query side ("visible" branch): the IR image (reference SPEC §0).
        inputs = (NestedTensor(ir, mask), NestedTensor(rgb, mask))
        variant = Variant(REFERENCE, REFERENCE_LABEL, model, repo, inputs, clock, part_timer)
        variant.capture_encoder(model.transformer.encoder)
    return variant, result


# ------------------------------------------------------------------------------------------- reporting

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return f'{cpu}; nproc {usable} (cpu_count {os.cpu_count()})'


def load_average() -> str:
    try:
        return ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'n/a'


def max_abs(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f'shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}'
    return f'{(a.double() - b.double()).abs().max().item():.3g}'


def matched_queries(a: dict, b: dict) -> str:
    """Queries as sets: each query of ``a`` (logits and box concatenated) to its nearest in ``b``, max-abs
    distance; median and how many have no counterpart within 1e-3."""
    qa = torch.cat([a['pred_logits'][0], a['pred_boxes'][0]], -1).double()
    qb = torch.cat([b['pred_logits'][0], b['pred_boxes'][0]], -1).double()
    nearest = torch.cdist(qa, qb, p=float('inf')).min(dim=1).values
    return (f'as sets: nearest-query distance median {nearest.median().item():.2g}, '
            f'{int((nearest > 1e-3).sum())} of {len(nearest)} without a counterpart within 1e-3')


def table(variants: list[Variant], unit: str) -> str:
    med = lambda v, key: statistics.median(run[key] for run in v.runs)
    reference = next((v for v in variants if v.name == REFERENCE), None)
    lines = [f'| variant | total {unit}, median (min) | backbones | fusion | transformer + heads | vs reference |',
             '|---|---:|---:|---:|---:|---:|']
    for v in variants:
        total = med(v, 'total')
        ratio = f'{med(reference, "total") / total:.2f}x' if reference is not None else 'n/a'
        lines.append(f'| {v.label} | {total:.2f} ({min(r["total"] for r in v.runs):.2f}) | {med(v, "backbones"):.2f} '
                     f'| {med(v, "fusion"):.2f} | {med(v, "transformer"):.2f} | {ratio} |')
    return '\n'.join(lines)


def print_run_facts(threads: int, started: datetime.datetime, ended: datetime.datetime, load_start: str) -> None:
    """The machine, software, thread count, time span and load lines under every table."""
    print(f'Machine: {machine()}; torch {torch.__version__}, Python {platform.python_version()}; '
          f'torch threads {threads}')
    print(f'Date: {started:%Y-%m-%d %H:%M:%S} - {ended:%H:%M:%S} UTC; load average at start {load_start}, '
          f'at end {load_average()}')


# ------------------------------------------------------------------------------------- isolated rounds

CHILD_PREFIX = 'RUNS '


def isolated(args, argv: list[str]) -> int:
    """``--isolate``: every (round, variant) in a fresh child process of this script, so that no model runs
    in a heap shaped by another (glibc's malloc returns freed memory to the system and takes it back with
    page faults, and how often depends on what ran before in the process). The children alternate like the
    in-process rounds, so the variants still share the load of the moment."""
    child_argv = [a for a in argv if a != '--isolate']
    for flag in ('--variants', '--rounds'):
        while flag in child_argv:  # drop the flag and its values
            i = child_argv.index(flag)
            j = i + 1
            while j < len(child_argv) and not child_argv[j].startswith('--'):
                j += 1
            del child_argv[i:j]
    names = list(dict.fromkeys(args.variants))
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    print(f'# e2e CPU inference, ours vs reference, isolated processes, {started:%Y-%m-%d %H:%M:%S} UTC',
          flush=True)
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, *child_argv, '--variants', name, '--rounds', '1', '--json']
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_PREFIX)]
            if done.returncode != 0 or not lines:
                print(done.stdout[-2000:], done.stderr[-2000:], sep='\n')
                raise SystemExit(f'isolated run of {name} failed (exit {done.returncode})')
            run = json.loads(lines[-1][len(CHILD_PREFIX):])[name][0]
            runs[name].append(run)
            print(f'  round {r + 1} {name}: {run["total"]:.2f} s (own process)', flush=True)
    ended = datetime.datetime.now(datetime.timezone.utc)
    labels = {REFERENCE: REFERENCE_LABEL, **{n: v[0] for n, v in OUR_VARIANTS.items()}}
    timed = [types.SimpleNamespace(name=n, label=labels[n], runs=runs[n]) for n in names]
    print()
    print_run_facts(args.threads, started, ended, load_start)
    print(f'Each variant and round in its own process: build, 1 warm-up, 1 timed forward; {args.rounds} round(s); '
          f'clock {args.clock}')
    print()
    print(table(timed, 'CPU s' if args.clock == 'cpu' else 's'))
    return 0


# ------------------------------------------------------------------------------------------------ main

def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(x) for x in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--image-size {text!r}: expected HxW, e.g. 512x640')
    return height, width


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repo', type=Path, required=True, help='our CAFF-DINO checkout')
    parser.add_argument('--ref', type=Path, required=True, help="the reference's CAFF-DINO folder")
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch.set_num_threads')
    parser.add_argument('--rounds', type=int, default=3, help='timed rounds after one warm-up per variant')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                        help='wall: time.perf_counter; cpu: time.process_time (CPU time of the process)')
    parser.add_argument('--variants', nargs='+', default=DEFAULT_VARIANTS,
                        choices=[REFERENCE, *OUR_VARIANTS], help='run in this order in every round')
    parser.add_argument('--image-size', type=parse_size, default=(512, 640), metavar='HxW',
                        help='input height x width (default 512x640, i.e. a 640 x 512 W x H frame)')
    parser.add_argument('--isolate', action='store_true',
                        help='each variant in each round in its own fresh process (build, one warm-up, one timed '
                             'forward), alternating as in-process rounds do; no output check')
    parser.add_argument('--json', action='store_true', help=argparse.SUPPRESS)  # a child of --isolate
    args = parser.parse_args(argv)

    repo_root, ref_root = args.repo.resolve(), args.ref.resolve()
    for root, what in ((repo_root, 'config/DINO/DINO_4scale.py'), (ref_root, 'models/dino/dino.py')):
        if not (root / what).is_file():
            parser.error(f'{root} has no {what}')
    if args.isolate:
        return isolated(args, argv if argv is not None else sys.argv[1:])
    if os.environ.pop('CAFF_MSDA_BACKEND', None) is not None:
        print('note: CAFF_MSDA_BACKEND was set; unset here so that each variant gets its own backend')
    if 'TORCH_EXTENSIONS_DIR' not in os.environ and (repo_root / '.torch_extensions').is_dir():
        os.environ['TORCH_EXTENSIONS_DIR'] = str(repo_root / '.torch_extensions')
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    height, width = args.image_size
    names = list(dict.fromkeys(args.variants))

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    print(f'# e2e CPU inference, ours vs reference, {started:%Y-%m-%d %H:%M:%S} UTC', flush=True)

    shared = top_level_names(repo_root, ref_root)
    ours_repo = RepoModules('ours', repo_root, shared)
    ref_repo = RepoModules('reference', ref_root, shared)

    ours_names = [n for n in names if n != REFERENCE]
    build_names = list(ours_names)
    if REFERENCE in names and not any(OUR_VARIANTS[n][1] == 'caff' for n in ours_names):
        build_names.insert(0, 'caff-pytorch')  # the reference takes the weights of a caff model: built, untimed
    t0 = time.perf_counter()
    part_timer = load_part_timer(ours_repo)
    ours, (rgb, ir), msda_func = build_ours(ours_repo, repo_root, build_names, height, width, clock,
                                            part_timer)
    print(f'built ours ({", ".join(build_names)}) in {time.perf_counter() - t0:.0f} s', flush=True)

    variants = dict(ours)
    key_report = None
    if REFERENCE in names:
        caff = next(v for v in ours.values() if OUR_VARIANTS[v.name][1] == 'caff')
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # torchvision on the reference's pretrained=False ("deprecated since 0.13 ... equivalent to
            # weights=None") and timm's deprecated import path (its swin_transformer.py): known, harmless here.
            warnings.filterwarnings('ignore', category=UserWarning, module='torchvision')
            warnings.filterwarnings('ignore', category=FutureWarning, module='timm')
            variants[REFERENCE], result = build_reference(ref_repo, ref_root, caff.model.state_dict(), rgb, ir,
                                                          clock, part_timer)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        key_report = (f'reference loads our `{caff.name}` state_dict by name: {len(missing)} missing, '
                      f'{len(unexpected)} unexpected keys')
        print(f'built the reference in {time.perf_counter() - t0:.0f} s; {key_report}', flush=True)
        if missing or unexpected:
            print(f'  missing: {missing[:20]}\n  unexpected: {unexpected[:20]}')
            raise SystemExit('state_dict keys do not match; not timing different weights')
    ours_repo.check_own()
    ref_repo.check_own()
    timed = [variants[n] for n in names]

    print(f'threads {args.threads}; clock {args.clock}; input {width} x {height} (W x H), batch 1; '
          f'{args.rounds} round(s) after 1 warm-up each; order: {", ".join(names)}', flush=True)
    warm = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        # untimed builds too: their outputs serve the equality check (which a child of --isolate does not make)
        for v in (timed if args.json else variants.values()):
            out, seconds = v.forward(record=False)
            warm[v.name] = {'pred_logits': out['pred_logits'].clone(), 'pred_boxes': out['pred_boxes'].clone(),
                            'memory': v.memory}
            print(f'  warm-up {v.name}: {seconds:.2f} s', flush=True)
    for w in caught:
        if 'MSDeformAttn' in str(w.message):
            print(f'  warning: {w.message}')
    with ours_repo.active():
        resolved = {v.name: msda_func.resolve_backend(v.msda_asked, torch.device('cpu'), torch.float32)
                    for v in ours.values()}
    for v in variants.values():  # the hook was for the warm-up
        v.encoder_hook.remove()

    for r in range(args.rounds):
        for v in timed:
            _, seconds = v.forward(record=True)
            print(f'  round {r + 1} {v.name}: {seconds:.2f} s', flush=True)
    if args.json:
        print(CHILD_PREFIX + json.dumps({v.name: v.runs for v in timed}))
        return 0

    ended = datetime.datetime.now(datetime.timezone.utc)
    unit = 'CPU s' if args.clock == 'cpu' else 's'
    print()
    print_run_facts(torch.get_num_threads(), started, ended, load_start)
    print(f'Input: {width} x {height} (W x H), batch 1, no resize, no padding; clock: {args.clock} '
          f'({CLOCKS[args.clock].__module__}.{CLOCKS[args.clock].__name__}); {args.rounds} round(s), '
          f'1 warm-up each; MSDeformAttn resolved: '
          + (', '.join(f'{n} -> {b}' for n, b in resolved.items() if n in names) or 'n/a'))
    if key_report:
        print(key_report)
    print()
    print(table(timed, unit))
    print()
    print('Output check (warm-up forwards, max abs difference):')
    pairs = [('caff-pytorch', REFERENCE, ('memory',)),
             ('caff-pytorch', REFERENCE, ('pred_logits', 'pred_boxes')),
             ('caff-cpu', 'caff-pytorch', ('memory', 'pred_logits', 'pred_boxes')),
             ('caff_dw-cpu', 'caff_dw-pytorch', ('memory', 'pred_logits', 'pred_boxes')),
             ('before', 'caff-pytorch', ('memory', 'pred_logits', 'pred_boxes'))]
    for a, b, keys in pairs:
        if a in warm and b in warm:
            diffs = ', '.join(f'{k} {max_abs(warm[a][k], warm[b][k])}' for k in keys)
            note = (' (final queries: top-k of near-tied random-weight proposals may reorder; the encoder memory '
                    'is the like-for-like check)') if b == REFERENCE and 'pred_logits' in keys else ''
            print(f'- {a} vs {b}: {diffs}{note}')
            if 'pred_logits' in keys:
                print(f'  {a} vs {b} {matched_queries(warm[a], warm[b])}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
