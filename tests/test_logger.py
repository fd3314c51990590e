import logging

from util.logger import setup_logger


def test_main_rank_logs_to_console_and_file(tmp_path, capsys):
    logger = setup_logger(str(tmp_path / 'run'), distributed_rank=0, name='caff_dino_test_main')
    logger.info('epoch 0 done')
    logger.warning('low memory')
    logger.debug('details')
    for handler in logger.handlers:
        handler.flush()
    console = capsys.readouterr().out
    assert 'epoch 0 done' in console and 'low memory' in console and 'WARNING' in console
    assert 'details' not in console  # the console shows INFO and above
    text = (tmp_path / 'run' / 'info.txt').read_text()
    assert 'epoch 0 done' in text and 'details' in text and '\x1b[' not in text  # plain file, no colour codes


def test_setup_twice_does_not_duplicate_lines(tmp_path, capsys):
    setup_logger(str(tmp_path), 0, name='caff_dino_test_twice')
    logger = setup_logger(str(tmp_path), 0, name='caff_dino_test_twice')
    logger.info('once')
    assert capsys.readouterr().out.count('once') == 1
    assert len([h for h in logger.handlers if isinstance(h, logging.FileHandler)]) == 1


def test_other_ranks_are_quiet_except_errors(tmp_path, capsys):
    logger = setup_logger(str(tmp_path), distributed_rank=1, name='caff_dino_test_rank1')
    logger.info('hidden')
    logger.warning('hidden too')
    logger.error('broken pair')
    captured = capsys.readouterr()
    assert 'hidden' not in captured.out + captured.err
    assert '[rank 1]' in captured.err and 'broken pair' in captured.err
    assert not (tmp_path / 'info.txt').exists()


def test_no_output_dir_means_console_only(capsys):
    logger = setup_logger(None, 0, name='caff_dino_test_console')
    logger.info('console only')
    assert 'console only' in capsys.readouterr().out
    assert not any(isinstance(h, logging.FileHandler) for h in logger.handlers)
