"""tools/benchmark.py: the e2e and train-step tables with minimal budgets on tiny models; moved sub-commands say where
they went."""
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


def test_train_step_table_gives_the_kept_to_flushed_ratio():
    rows = {'fresh': {False: {'steps': [0.6, 0.7, 0.5], 'flushed': False},
                      True: {'steps': [0.6, 0.55, 0.65], 'flushed': True}},
            'trained': {False: {'steps': [1.5, 1.4, 1.3], 'flushed': False},
                        True: {'steps': [0.7, 0.8, 0.6], 'flushed': False}}}
    (fresh, trained) = _table_rows(benchmark.train_step_table(rows))
    assert fresh == ['fresh', '0.600 (0.500)', '0.600 (0.550)', '1.00x']
    assert trained == ['trained', '1.400 (1.300)', '0.700 (0.600) (this CPU cannot flush)', '2.00x']


@pytest.mark.slow
def test_train_step_page_times_fresh_and_checkpointed_weights(tmp_path, tiny_run_options):
    from datasets.synthetic import generate_synthetic_dataset
    from models import build_model
    from util.checkpoint import save_checkpoint
    from util.config import load_config

    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=4, num_val=1, width=128, height=96)
    options = [o for o in tiny_run_options if not o.startswith('msda_backend')]
    model = build_model(load_config(benchmark.REPO_ROOT / benchmark.MODELS['tiny'], options))[0]
    checkpoint = tmp_path / 'trained.pth'
    save_checkpoint({'model': model.state_dict()}, str(checkpoint))
    out = tmp_path / 'step.md'
    argv = ['train-step', '--coco_path', str(data), '--checkpoint', str(checkpoint), '--warmup', '0', '--steps', '2',
            '--threads', '1', '--options', *options, '--out', str(out)]
    assert benchmark.main(argv) == 0
    page = out.read_text()
    assert 'python tools/benchmark.py train-step' in page and 'torch threads 1' in page
    rows = _table_rows(page)
    assert [row[0] for row in rows] == ['fresh (seed 0)', f'`{checkpoint}` (weights and AdamW state)']
    for row in rows:
        assert _number(row[1]) > 0 and _number(row[2]) > 0 and row[3].endswith('x')


def test_train_step_failure_is_one_line(tmp_path, capsys):
    assert benchmark.main(['train-step', '--coco_path', str(tmp_path / 'absent'), '--steps', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: train-step: measuring fresh weights, subnormals kept failed')


@pytest.mark.slow
def test_train_step_with_fewer_pairs_than_a_batch_is_one_line(tmp_path, capsys):
    from datasets.synthetic import generate_synthetic_dataset
    generate_synthetic_dataset(str(tmp_path), num_train=1, num_val=1, width=128, height=96)
    assert benchmark.main(['train-step', '--coco_path', str(tmp_path), '--steps', '1', '--threads', '1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: train-step: measuring fresh weights, subnormals kept failed with exit status 2:')
    assert 'fewer pairs than one batch (batch_size=4)' in err[-1] and 'error: error' not in err[-1]
