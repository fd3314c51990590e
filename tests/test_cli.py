"""util/cli.py: a bad command line is a one-line UsageError; --help still prints the help and exits 0."""
import importlib

import pytest

from util.cli import ArgumentParser
from util.errors import UsageError


def parser() -> ArgumentParser:
    p = ArgumentParser('prog')
    p.add_argument('--count', type=int)
    p.add_argument('--name', required=True)
    return p


@pytest.mark.parametrize('argv,needle', [(['--name', 'x', '--count', 'many'], "--count: invalid int value: 'many'"),
                                         (['--count', '1'], 'the following arguments are required: --name'),
                                         (['--name', 'x', '--colour'], 'unrecognized arguments: --colour')])
def test_errors_are_one_line_usage_errors(argv, needle):
    with pytest.raises(UsageError) as info:
        parser().parse_args(argv)
    message = str(info.value)
    assert needle in message and message.startswith('prog: ') and '(see prog --help)' in message
    assert '\n' not in message


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(['--help'])
    assert info.value.code == 0 and '--count' in capsys.readouterr().out


@pytest.mark.parametrize('tool', ['predict', 'check_dataset', 'convert', 'export_onnx', 'plot_logs'])
def test_every_tool_reports_a_bad_command_line_in_one_line(tool, capsys):
    import importlib
    main = importlib.import_module(f'tools.{tool}').main
    assert main(['--no-such-flag']) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and '--help)' in err, err


TOOLS = ['bench_msda', 'benchmark', 'check_dataset', 'convert', 'export_onnx', 'fusion_study', 'gpu_checks',
         'plot_logs', 'predict', 'profile_fusion']


@pytest.mark.parametrize('tool', TOOLS)
def test_every_tool_reports_a_bad_flag_in_one_line_with_exit_2(tool, capsys):
    module = importlib.import_module(f'tools.{tool}')
    assert module.main(['--no-such-flag']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and tool in err
    assert '--no-such-flag' in err or 'the following arguments are required' in err  # required ones come first


def test_run_command_restores_the_thread_count_and_reports_a_user_error(capsys):
    import torch

    from util.cli import run_command
    before = torch.get_num_threads()

    def run(args):
        torch.set_num_threads(1 if before > 1 else 2)
        raise UsageError(f'bad count {args.count}')

    assert run_command(parser(), run, ['--name', 'x', '--count', '3']) == 2
    assert torch.get_num_threads() == before
    assert capsys.readouterr().err == 'error: bad count 3\n'
    assert run_command(parser(), lambda args: None, ['--name', 'x']) == 0
    assert run_command(parser(), lambda args: 1, ['--name', 'x']) == 1
