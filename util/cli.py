"""Command-line parsing whose errors are user errors: ``ArgumentParser`` raises ``UsageError`` instead of exiting.

argparse's own ``error()`` prints the usage block and the message, then exits with status 2. Here it raises
``UsageError`` with one line (the program, the message, a pointer to ``--help``), so an entry point reports it
like every other user error (``util/errors.py``: one line on stderr, exit status 2). ``--help`` still prints the
full help and exits 0. ``run_command`` is the body of a tool's ``main``: parse, run, report a user error, and
leave torch's thread count as it was (tools set it from ``--threads``; tests call ``main`` in their own process).
"""
import argparse
from typing import Callable, Optional

import torch

from util.errors import UsageError, UserError, report_user_error


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises ``UsageError`` on a bad command line (unknown flag, missing value,
    wrong type, ...)."""

    def error(self, message: str):
        raise UsageError(f'{self.prog}: {message} (see {self.prog} --help)')


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Optional[int]],
                argv: Optional[list[str]] = None) -> int:
    """``run(parser.parse_args(argv))``; its return value is the exit status (None: 0). A ``UserError`` from
    either (a bad flag, a bad file, a bad value) is one line on stderr and exit status 2. Torch's CPU thread
    count is restored afterwards, whatever ``run`` set it to."""
    threads = torch.get_num_threads()
    try:
        status = run(parser.parse_args(argv))
    except UserError as e:
        return report_user_error(e)
    finally:
        torch.set_num_threads(threads)
    return 0 if status is None else status
