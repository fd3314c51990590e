"""tools/bench_msda.py: best and median times, the error against float64, the traffic model behind the GB/s
column, and the page it writes."""
import pytest
import torch

from tools import bench_msda


def test_traffic_counts_four_taps_per_sample_and_the_output():
    value = torch.zeros(2, 10, 8, 32)
    locations = torch.zeros(2, 5, 8, 4, 4, 2)
    samples = 2 * 5 * 8 * 4 * 4
    assert bench_msda.traffic_bytes(value, locations) == samples * (4 * 32 + 3) * 4 + 2 * 5 * 8 * 32 * 4


def test_measure_reports_best_below_median_and_a_float32_sized_error():
    row = bench_msda.measure('pytorch', 'decoder', torch.device('cpu'), repeats=3, image_hw=(32, 40))
    assert 0 < row['fwd_best_ms'] <= row['fwd_ms'] and 0 < row['fwd_bwd_best_ms'] <= row['fwd_bwd_ms']
    assert 0 < row['float64_error'] < 1e-5 and row['gb_per_s'] > 0
    assert row['queries'] == sum(max(1, 32 // s) * max(1, 40 // s) for s in bench_msda.STRIDES)  # capped at S


def test_float64_error_sees_a_wrong_output(monkeypatch):
    inputs = bench_msda.make_case('encoder', torch.device('cpu'), image_hw=(16, 16))
    shapes = [tuple(hw) for hw in inputs[1].tolist()]
    right = bench_msda.float64_error('pytorch', inputs, shapes)
    monkeypatch.setattr(bench_msda, 'ms_deform_attn', lambda *a, **k: torch.zeros(1))
    assert right < 1e-5 < bench_msda.float64_error('pytorch', inputs, shapes)


@pytest.mark.parametrize('text', ['512', '4x4', 'axb'])
def test_a_bad_image_size_is_one_line_and_exit_2(text, capsys):
    assert bench_msda.main(['--image-size', text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: tools/bench_msda.py: argument --image-size') and '\n' not in err


@pytest.mark.slow
def test_page_has_a_row_per_backend_and_case_and_the_copy_bandwidth(tmp_path):
    out = tmp_path / 'msda.md'
    assert bench_msda.main(['--image-size', '32x40', '--repeats', '2', '--threads', '1', '--output', str(out)]) == 0
    page = out.read_text()
    rows = [line for line in page.splitlines() if line.startswith(('| pytorch', '| cpu'))]
    assert len(rows) == 4 and all(cells.count('|') == 13 for cells in rows)
    assert 'Written by `python tools/bench_msda.py --image-size 32x40' in page and 'memory (512 MiB tensor)' in page
    assert all(float(row.split('|')[7].strip().rstrip('x')) > 0 for row in rows)
