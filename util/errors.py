"""The user-error hierarchy: every error a user can fix (bad config, data, checkpoint, command line) is a ``UserError``.

A command-line entry point (``main.py``, ``tools/*.py``) catches ``UserError`` and prints it as one line on
stderr with exit status 2 (:func:`report_user_error`); anything else is a programming error and keeps its
traceback. A message names the file, key or value at fault and says what to do.

A ``UserError`` raised inside a DataLoader worker reaches the main process re-raised by torch with the worker's
traceback in its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); the report
gives the original one-line message (:func:`user_message`).
"""
import sys

_WORKER_PREFIX = 'Caught '
_WORKER_TRACEBACK = '\nOriginal Traceback (most recent call last):\n'

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of the errors a user can fix; the message is the whole one-line report."""


class UsageError(UserError, ValueError):
    """A command line that cannot run as given (conflicting flags, occupied output dir, bad device name)."""


class DataError(UserError, ValueError):
    """The data set named by the config cannot be used (wrong layout, missing or corrupt file, bad annotations)."""


class InputSizeError(UserError, ValueError):
    """An image too small for the model as configured (image-size keys, num_queries, hidden_dim decide it)."""


def one_line(message: str) -> str:
    """``message`` folded onto one line (a user-error report is always a single line)."""
    return ' '.join(str(message).split())


def user_message(error: BaseException) -> str:
    """The message of ``error``, or, for an error torch re-raised from a DataLoader worker, the original message.

    torch formats the worker's exception with ``traceback.format_exception``, whose last entry is
    ``<module>.<Class>: <message>``; that entry (minus the class name) is the original message.
    """
    message = str(error)
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in message):
        return message
    lines = message.rstrip('\n').splitlines()
    names = {type(error).__qualname__, f'{type(error).__module__}.{type(error).__qualname__}'}
    for n in range(len(lines) - 1, 0, -1):
        name, sep, rest = lines[n].partition(': ')
        if sep and name in names:
            return '\n'.join([rest, *lines[n + 1:]])
    return lines[-1]


def report_user_error(error: BaseException, file=None) -> int:
    """Print ``error: <message>`` as one line to ``file`` (stderr) and return the exit status for user errors."""
    print(f'error: {one_line(user_message(error))}', file=file or sys.stderr)
    return EXIT_USER_ERROR
