"""Command-line parsing whose errors are user errors: ``ArgumentParser`` raises ``UsageError`` instead of exiting.

argparse's own ``error()`` prints the usage block and the message, then exits with status 2. Here it raises
``UsageError`` with one line (the program, the message, a pointer to ``--help``), so an entry point reports it
like every other user error (``util/errors.py``: one line on stderr, exit status 2). ``--help`` still prints the
full help and exits 0.
"""
import argparse

from util.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises ``UsageError`` on a bad command line (unknown flag, missing value,
    wrong type, ...)."""

    def error(self, message: str):
        raise UsageError(f'{self.prog}: {message} (see {self.prog} --help)')
