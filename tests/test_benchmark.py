"""tools/benchmark.py: the e2e table with minimal budgets on tiny models; moved sub-commands say where they went."""
import pytest
import torch

from tools import benchmark

# A CAFF_tiny made smaller still; images of 128 x 96 keep the stride-64 level above 1 x 1 (GroupNorm).
TINY = ['hidden_dim=32', 'nheads=2', 'enc_layers=1', 'dec_layers=1', 'dim_feedforward=32', 'num_queries=8',
        'num_select=8', 'dn_number=2']


def _table_rows(page: str) -> list[list[str]]:
    lines = [line for line in page.splitlines() if line.startswith('|')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(',', ''))


def test_measure_model_splits_the_forward(repo_root):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.measure_model('config/DINO/CAFF_tiny.py', 96, 128, warmup=0, repeats=2,
                                         options=['msda_backend=pytorch', *TINY])
    finally:
        torch.set_num_threads(previous)
    assert len(result['total']) == 2
    for i, total in enumerate(result['total']):
        parts = result['backbones'][i] + result['fusion'][i] + result['transformer'][i]
        assert total == pytest.approx(parts)
        assert min(result['backbones'][i], result['fusion'][i], result['transformer'][i]) > 0
    assert result['params'] > 1e6 and result['rss_built_mb'] > 0 and result['peak_mb'] > 0


@pytest.mark.slow
def test_e2e_page_has_a_row_per_model_with_positive_numbers(tmp_path, capsys):
    out = tmp_path / 'e2e.md'
    argv = ['e2e', '--models', 'tiny', 'config/DINO/CAFF_tiny.py', '--height', '96', '--width', '128',
            '--warmup', '0', '--repeats', '1', '--threads', '1', '--options', *TINY, '--out', str(out)]
    assert benchmark.main(argv) == 0
    page = out.read_text()
    assert 'torch threads 1' in page and 'python tools/benchmark.py e2e' in page
    rows = _table_rows(page)
    assert len(rows) == 2
    assert rows[0][0].startswith(benchmark.MODEL_LABELS['tiny'])
    for row in rows:
        latency, backbones, fusion, transformer = (_number(c) for c in row[2:6])
        assert latency > 0 and backbones > 0 and fusion > 0 and transformer > 0
        assert all(_number(c) > 0 for c in row[7:9])  # RSS after build, peak RSS


@pytest.mark.slow
def test_e2e_failure_is_one_line(capsys):
    assert benchmark.main(['e2e', '--models', 'config/DINO/no_such.py', '--repeats', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: e2e: measuring config/DINO/no_such.py')


@pytest.mark.parametrize('command, tool', [('msda', 'tools/bench_msda.py'),
                                           ('fusion-study', 'tools/fusion_study.py')])
def test_moved_sub_commands_name_their_tool(command, tool, capsys):
    assert benchmark.main([command, '--repeats', '2']) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f'error: `tools/benchmark.py {command}` is now `python {tool} ')


@pytest.mark.slow
def test_e2e_restores_the_thread_count(tmp_path):
    previous = torch.get_num_threads()
    argv = ['e2e', '--models', 'config/DINO/no_such.py', '--repeats', '1', '--threads', str(previous + 1)]
    assert benchmark.main(argv) == 2
    assert torch.get_num_threads() == previous
