"""Check a whole data set before a long GPU job: the checks main.py runs before training, over every split.

    python tools/check_dataset.py -c config/DINO/DINO_4scale.py --coco_path ./LLVIP [--dataset_file llvip_fusion]
        [--split train val] [--workers N] [--headers-only]

Not in the reference. For each split it resolves the layout of ``dataset_file`` under ``coco_path`` (the config's
values unless given), reads the annotation file and probes every image pair (``datasets/check.py``: files exist
and decode, RGB and IR sizes agree after EXIF orientation, the JSON's width/height agree with the file, boxes
inside the image, category ids below the config's ``num_classes``). It prints one report on stdout: the
annotation files read, then per split the count and first examples of each kind of problem (kinds and what they
mean: ``datasets/problems.py``).

Exit status: 0 when no split has an annotation error or a bad pair (clipped or dropped boxes and notes are
reported but fine), 2 otherwise; arguments that cannot be used (no config, a ``coco_path`` that is not a folder,
an unknown ``dataset_file``) end with one line on stderr and status 2. Results are cached like main.py's check
(``$CAFF_DATA_CHECK_CACHE``), so a second run over unchanged files takes seconds. ``--headers-only`` skips
decoding the pixels: faster on a cold cache, but a file cut short after its header passes.
"""
import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/check_dataset.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.check import SplitCheck, check_split, default_workers
from datasets.images import BitDepthRule
from datasets.layouts import DATASET_FILES, IMAGE_SETS, resolve_layout
from datasets.problems import BAD_PAIR, ERROR
from util.cli import ArgumentParser, run_command
from util.config import load_config
from util.errors import EXIT_USER_ERROR, DataError, UsageError


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('check_dataset.py', description='Check a paired RGB + thermal data set.')
    parser.add_argument('--config_file', '-c', required=True, help='the config the training will use')
    parser.add_argument('--coco_path', help='data set root (default: the config value)')
    parser.add_argument('--dataset_file', help=f'one of {", ".join(DATASET_FILES)} (default: the config value)')
    parser.add_argument('--split', nargs='+', choices=IMAGE_SETS, default=list(IMAGE_SETS), help='splits to check')
    parser.add_argument('--workers', type=int, default=None, help=f'probing threads (default {default_workers()})')
    parser.add_argument('--headers-only', action='store_true', help='read image headers only, do not decode')
    return parser


def check_one_split(cfg, split: str, workers, verify: bool) -> SplitCheck:
    """The check of one split; a missing folder or an unusable annotation file becomes an error in its report."""
    try:
        layout = resolve_layout(cfg.dataset_file, cfg.coco_path, split)
    except (FileNotFoundError, ValueError) as err:
        failed = SplitCheck(split, '', '', '')
        failed.problems.add('layout', str(err))
        return failed
    try:
        return check_split(split, layout.rgb_dir, layout.ir_dir, layout.annotation_file, cfg.num_classes,
                           layout.pair_names, verify=verify, workers=workers)
    except DataError as err:
        failed = SplitCheck(split, layout.annotation_file, layout.rgb_dir, layout.ir_dir)
        failed.problems.add('annotation_file', str(err))
        return failed


def report(cfg, config_file: str, checks: list[SplitCheck]) -> list[str]:
    """The printed report: what was checked, one block per split, the verdict."""
    lines = [f'data check: dataset_file={cfg.dataset_file} coco_path={cfg.coco_path} num_classes={cfg.num_classes} '
             f'(config {config_file})',
             'annotation files read: ' + (', '.join(c.annotation_file for c in checks if c.annotations) or 'none')]
    for check in checks:
        lines += check.report_lines()
    errors = sum(c.problems.total(ERROR) for c in checks)
    bad = sum(c.problems.total(BAD_PAIR) for c in checks)
    verdict = 'clean' if not errors and not bad else f'NOT clean: {errors} annotation error(s), {bad} bad pair(s)'
    lines.append(f'result: {verdict}')
    return lines


def run(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in ('coco_path', 'dataset_file') if getattr(args, k) is not None}
    cfg = load_config(args.config_file, options)
    if cfg.dataset_file not in DATASET_FILES:
        raise UsageError(f'dataset_file {cfg.dataset_file!r} is not one of {DATASET_FILES}')
    if not cfg.coco_path or not os.path.isdir(cfg.coco_path):
        raise UsageError(f'coco_path {cfg.coco_path!r} is not a folder: pass --coco_path DIR (the data set root)')
    if args.workers is not None and args.workers < 1:
        raise UsageError(f'--workers {args.workers}: give at least 1')
    BitDepthRule(cfg.high_bit_depth_rule, cfg.high_bit_depth_limits)  # the config's reading rule must be valid
    checks = [check_one_split(cfg, split, args.workers, not args.headers_only) for split in args.split]
    print('\n'.join(report(cfg, args.config_file, checks)))
    return 0 if all(c.clean for c in checks) else EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    return run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
