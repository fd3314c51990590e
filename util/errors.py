"""The user-error hierarchy: every error a user can fix (bad config, data, checkpoint, command line) is a ``UserError``.

A command-line entry point (``main.py``, ``tools/*.py``) catches ``UserError`` and prints it as one line on
stderr with exit status 2 (:func:`report_user_error`); anything else is a programming error and keeps its
traceback. A message names the file, key or value at fault and says what to do.
"""
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of the errors a user can fix; the message is the whole one-line report."""


class UsageError(UserError, ValueError):
    """A command line that cannot run as given (conflicting flags, occupied output dir, bad device name)."""


class DataError(UserError, ValueError):
    """The data set named by the config cannot be used (wrong layout, missing or corrupt file, bad annotations)."""


def one_line(message: str) -> str:
    """``message`` folded onto one line (a user-error report is always a single line)."""
    return ' '.join(str(message).split())


def report_user_error(error: BaseException, file=None) -> int:
    """Print ``error: <message>`` as one line to ``file`` (stderr) and return the exit status for user errors."""
    print(f'error: {one_line(error)}', file=file or sys.stderr)
    return EXIT_USER_ERROR
