"""Convert a multispectral data set as it ships to a layout ``main.py`` reads: one sub-command per source format.

    python tools/convert.py kaist --root kaist-cvpr15 --train-list imageSets/train-all-02.txt \\
        --val-list imageSets/test-all-20.txt --out data/kaist                  # -> --dataset_file kaist_fusion
    python tools/convert.py flir --root FLIR_aligned --out data/flir          # -> --dataset_file flir_fusion
    python tools/convert.py m3fd --root M3FD --out data/m3fd --val-ratio 0.2 --seed 0   # -> llvip_fusion
    python tools/convert.py generic --rgb-dir RGB --ir-dir IR --labels LBL --format yolo --classes person car \\
        --out data/custom                                                      # -> llvip_fusion (or --layout flir)

Each prints what it wrote (pairs and boxes per split and class, ignore regions, skipped entries with the reason,
dropped boxes) and leaves the same report in ``OUT/conversion_report.json``. Unpaired images are refused by
name; a second run with the same inputs rewrites nothing. ``--strict`` makes any skipped entry an error (exit
2). ``--mode hardlink|symlink`` avoids copying the images. The converters live in ``tools/converters/``.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/convert.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.converters import flir, generic, kaist, m3fd
from tools.converters.files import MODES
from util.cli import ArgumentParser
from util.errors import DataError, UserError, report_user_error


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', required=True, help='output data root (then --coco_path OUT)')
    parser.add_argument('--mode', choices=MODES, default='copy', help='how images reach OUT (default copy)')
    parser.add_argument('--strict', action='store_true', help='exit 2 when any entry was skipped')


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--val-list', help='file naming the validation pairs, one per line (the rest train)')
    parser.add_argument('--val-ratio', type=float, default=0.2, help='without --val-list: fraction drawn for val')
    parser.add_argument('--seed', type=int, default=0, help='seed of that draw')
    parser.add_argument('--label-map', help='JSON {class name: category id} replacing the default mapping')


def get_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('convert.py', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser('kaist', help='KAIST (bbGt text or per-frame XML) -> kaist_fusion')
    p.add_argument('--root', required=True, help='release root (holds images/ and an annotations folder)')
    p.add_argument('--train-list', help='e.g. train-all-02.txt')
    p.add_argument('--val-list', help='e.g. test-all-20.txt')
    p.add_argument('--images', help='image folder (default ROOT/images)')
    p.add_argument('--annotations', help='annotation folder (default ROOT/annotations-xml-new-sanitized, '
                                         'ROOT/annotations-xml-new or ROOT/annotations)')
    p.add_argument('--train-annotations', help='annotation folder of the train list (e.g. the sanitized ones)')
    p.add_argument('--val-annotations', help='annotation folder of the val list (e.g. the improved test ones)')
    _common(p)

    p = commands.add_parser('flir', help='FLIR-aligned (JPEGImages, Annotations, align_*.txt) -> flir_fusion')
    p.add_argument('--root', required=True, help='release root (holds JPEGImages/, or align/JPEGImages/)')
    p.add_argument('--label-map', help='JSON {class name: category id}; default person 1, bicycle 2, car 3')
    _common(p)

    p = commands.add_parser('m3fd', help='M3FD (Vis, Ir, Annotation) -> llvip_fusion')
    p.add_argument('--root', required=True, help='release root (holds Vis/, Ir/, Annotation/)')
    _split_options(p)
    _common(p)

    p = commands.add_parser('generic', help='paired folders with VOC or YOLO labels -> llvip_fusion / flir_fusion')
    p.add_argument('--rgb-dir', required=True)
    p.add_argument('--ir-dir', required=True)
    p.add_argument('--labels', required=True, help='folder of KEY.xml (VOC) or KEY.txt (YOLO) files')
    p.add_argument('--format', choices=generic.LABEL_FORMATS, default='voc')
    p.add_argument('--classes', nargs='+', help='class names in order: ids 1..K (YOLO index i -> i + 1)')
    p.add_argument('--layout', choices=('llvip', 'flir'), default='llvip')
    p.add_argument('--rgb-suffix', default='', help='stem suffix of the RGB files, e.g. _rgb')
    p.add_argument('--ir-suffix', default='', help='stem suffix of the thermal files, e.g. _ir')
    _split_options(p)
    _common(p)
    return parser


def run(args: argparse.Namespace):
    """The conversion the parsed ``args`` ask for; returns its ``Report``."""
    if args.command == 'kaist':
        return kaist.convert(args.root, args.out, args.train_list, args.val_list, args.images, args.annotations,
                             args.train_annotations, args.val_annotations, args.mode)
    if args.command == 'flir':
        return flir.convert(args.root, args.out, args.label_map, args.mode)
    if args.command == 'm3fd':
        return m3fd.convert(args.root, args.out, args.val_list, args.val_ratio, args.seed, args.label_map, args.mode)
    return generic.convert(args.rgb_dir, args.ir_dir, args.labels, args.out, args.format, args.classes,
                           args.label_map, args.val_list, args.val_ratio, args.seed, args.layout, args.rgb_suffix,
                           args.ir_suffix, args.mode)


def main(argv: list[str] | None = None) -> int:
    try:
        args = get_parser().parse_args(argv)
        report = run(args)
        print(report.text())
        if args.strict and report.skipped:
            raise DataError(f'{len(report.skipped)} entries were skipped (listed above) and --strict was given; '
                            f'fix them or drop --strict')
    except UserError as e:
        return report_user_error(e)
    return 0


if __name__ == '__main__':
    sys.exit(main())
