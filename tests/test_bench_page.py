"""tools/bench_page.py: the machine line names the threads and the load; the page is printed and written."""
import shlex

from tools import bench_page


def test_machine_line_names_threads_cores_and_load():
    line = bench_page.machine_description(3)
    assert 'torch threads 3' in line and 'cores available' in line and 'load average at start' in line
    assert len(bench_page.load_average().split(',')) == 3


def test_command_line_quotes_what_the_shell_would_split():
    line = bench_page.command_line('tools/x.py', ['--options', 'data_aug_scales=[96, 128]', 'a'])
    assert line == "python tools/x.py --options 'data_aug_scales=[96, 128]' a"
    assert shlex.split(line)[2:] == ['--options', 'data_aug_scales=[96, 128]', 'a']


def test_page_is_printed_and_written(tmp_path, capsys):
    out = tmp_path / 'deep' / 'page.md'
    bench_page.write_page(str(out), 'Title', 'body')
    assert out.read_text() == '# Title\n\nbody\n'
    assert '# Title' in capsys.readouterr().out
    bench_page.write_page(str(out), 'Other', 'text', echo=False)
    assert out.read_text() == '# Other\n\ntext\n' and capsys.readouterr().out == ''
