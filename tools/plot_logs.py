"""Plot training curves from one or more ``log.txt`` files (JSON lines written by main.py) to a PNG.

Each line of ``log.txt`` is one epoch: ``{"epoch": e, "train_loss": ..., "train_loss_ce": ..., "test_coco_eval_bbox":
[12 COCO stats], ...}``. The figure has three panels: the total training loss, the weighted main loss terms
(``train_loss_ce``, ``train_loss_bbox``, ``train_loss_giou`` of the last decoder layer), and AP / AP50 / AP75 of
the evaluation after each epoch. Several runs can be overlaid (``--labels`` names them).

matplotlib is an optional dependency: only this tool imports it.

    python tools/plot_logs.py outputs/caff_demo/log.txt --out outputs/caff_demo/curves.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as ``python tools/plot_logs.py``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import ArgumentParser
from util.errors import DataError, UsageError, UserError, report_user_error

LOSS_TERMS = ("train_loss_ce", "train_loss_bbox", "train_loss_giou")
AP_NAMES = {0: "AP", 1: "AP50", 2: "AP75"}


def read_log(path: Path) -> list[dict]:
    """Read the JSON lines of a log.txt; a malformed line is an error naming the file and line number."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such log file (main.py writes OUTPUT_DIR/log.txt)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    if not records:
        raise ValueError(f"{path}: the log holds no epochs yet")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one scalar key, skipping epochs that lack it (e.g. eval-only lines)."""
    points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def ap_series(records: list[dict], index: int) -> tuple[list[int], list[float]]:
    """(epochs, value) of entry ``index`` of ``test_coco_eval_bbox``."""
    points = [(r.get("epoch", i), r["test_coco_eval_bbox"][index]) for i, r in enumerate(records)
              if isinstance(r.get("test_coco_eval_bbox"), list) and len(r["test_coco_eval_bbox"]) > index]
    return [p[0] for p in points], [p[1] for p in points]


def plot_logs(log_paths: list[Path], out_path: Path, labels: list[str] | None = None) -> Path:
    """Draw the curves of every log into one PNG at ``out_path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [p.parent.name or str(p) for p in log_paths]
    if len(labels) != len(log_paths):
        raise ValueError(f"--labels gives {len(labels)} names for {len(log_paths)} logs")
    fig, (ax_loss, ax_terms, ax_ap) = plt.subplots(1, 3, figsize=(15, 4.2))
    for path, label in zip(log_paths, labels):
        records = read_log(path)
        ax_loss.plot(*series(records, "train_loss"), marker="o", label=label)
        for term in LOSS_TERMS:
            epochs, values = series(records, term)
            if values:
                ax_terms.plot(epochs, values, marker=".", label=f"{label}: {term[len('train_'):]}")
        for index, name in AP_NAMES.items():
            epochs, values = ap_series(records, index)
            if values:
                ax_ap.plot(epochs, values, marker="o", label=f"{label}: {name}")
    for axis, title in ((ax_loss, "total training loss"), (ax_terms, "loss terms (weighted)"),
                        (ax_ap, "validation COCO AP")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser("tools/plot_logs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="log.txt files written by main.py")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: curves.png beside the first log)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend name per log")
    try:
        args = parser.parse_args(argv)
        out = args.out or args.logs[0].with_name("curves.png")
        try:
            plot_logs(args.logs, out, args.labels)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"plot_logs: {err}") from None
        except ImportError:
            raise UsageError("plot_logs: matplotlib is not installed; `pip install matplotlib` (optional "
                             "dependency)") from None
    except UserError as err:
        return report_user_error(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
