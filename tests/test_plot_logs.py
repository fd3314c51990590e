"""tools/plot_logs.py: curves from log.txt JSON lines to a PNG."""
import json

import pytest
from PIL import Image

from tools.plot_logs import ap_series, main, read_log, series


def write_log(path, epochs):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        lines.append(json.dumps({
            "epoch": epoch,
            "train_loss": 10.0 / (epoch + 1),
            "train_loss_ce": 1.0 / (epoch + 1),
            "train_loss_bbox": 0.5 / (epoch + 1),
            "train_loss_giou": 0.7 / (epoch + 1),
            "test_coco_eval_bbox": [0.1 * epoch, 0.2 * epoch, 0.15 * epoch] + [0.0] * 9,
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_series_read_the_values(tmp_path):
    records = read_log(write_log(tmp_path / "log.txt", 3))
    assert series(records, "train_loss") == ([0, 1, 2], [10.0, 5.0, 10.0 / 3])
    assert ap_series(records, 1) == ([0, 1, 2], [0.0, 0.2, 0.4])
    assert series(records, "missing_key") == ([], [])


@pytest.mark.slow
def test_writes_a_png_with_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    first = write_log(tmp_path / "a" / "log.txt", 3)
    second = write_log(tmp_path / "b" / "log.txt", 4)
    out = tmp_path / "curves.png"
    assert main([str(first), str(second), "--out", str(out), "--labels", "caff", "rgb_only"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 1000 and image.height > 300
        assert len(image.convert("RGB").getcolors(1 << 24)) > 10  # curves were drawn, not a blank canvas


def test_malformed_line_is_reported_with_its_line_number(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text('{"epoch": 0, "train_loss": 1.0}\nnot json\n')
    assert main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: not a JSON line" in err and len(err.splitlines()) == 1


def test_missing_log_is_reported(tmp_path, capsys):
    assert main([str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert "no such log file" in err and len(err.splitlines()) == 1


def test_bad_command_line_is_one_line(capsys):
    assert main(["--labels"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tools/plot_logs.py:") and len(err.splitlines()) == 1
