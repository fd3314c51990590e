"""Rank-aware logging: a coloured console and a plain-text file `info.txt` in the output directory.

Follows the logger of DINO / detectron2 (util/logger.py there) with termcolor. What differs: only the main
process writes the console and the file; other ranks only print errors (to stderr), instead of keeping one log
file per rank.
"""
import logging
import os
import sys
from typing import Optional

from termcolor import colored

_LEVEL_COLOURS = {logging.WARNING: 'yellow', logging.ERROR: 'red', logging.CRITICAL: 'red'}


class _ColourFormatter(logging.Formatter):
    """Green logger name and time; warnings and errors get a coloured level tag."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = colored(f'[{self.formatTime(record, "%m/%d %H:%M:%S")} {record.name}]:', 'green')
        colour = _LEVEL_COLOURS.get(record.levelno)
        if colour is not None:
            prefix += ' ' + colored(record.levelname, colour, attrs=['bold'])
        return f'{prefix} {text}'


def setup_logger(output_dir: Optional[str] = None, distributed_rank: int = 0,
                 name: str = 'caff_dino') -> logging.Logger:
    """Configures and returns the logger `name`; calling it again replaces the handlers (no duplicate lines).

    Rank 0: INFO and above to stdout (coloured) and, when `output_dir` is given, to `output_dir/info.txt`
    (appended, plain). Other ranks: ERROR and above to stderr, nothing else.
    """
    logger = logging.getLogger(name)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if distributed_rank != 0:
        logger.setLevel(logging.ERROR)
        errors = logging.StreamHandler(stream=sys.stderr)
        errors.setFormatter(logging.Formatter(f'[rank {distributed_rank}] %(name)s %(levelname)s: %(message)s'))
        logger.addHandler(errors)
        return logger

    logger.setLevel(logging.DEBUG)
    console = logging.StreamHandler(stream=sys.stdout)
    console.setLevel(logging.INFO)
    console.setFormatter(_ColourFormatter('%(message)s'))
    logger.addHandler(console)

    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, 'info.txt'), mode='a')
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter('[%(asctime)s] %(name)s %(levelname)s: %(message)s',
                                                    datefmt='%m/%d %H:%M:%S'))
        logger.addHandler(file_handler)
    return logger
