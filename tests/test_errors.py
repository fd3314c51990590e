"""util/errors.py: the report is one line; an error re-raised from a DataLoader worker reports its own message."""
from torch.utils.data import DataLoader, Dataset

from util.errors import EXIT_USER_ERROR, DataError, UsageError, report_user_error, user_message


class Broken(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise DataError('/data/ir/0001.png: unreadable or corrupt image (truncated)')


def test_report_is_one_line_with_the_exit_status(capsys):
    assert report_user_error(UsageError('bad\nflag  here')) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == 'error: bad flag here\n'


def test_a_worker_error_reports_the_original_message(capsys):
    try:
        next(iter(DataLoader(Broken(), num_workers=1)))
    except DataError as error:
        assert 'Original Traceback' in str(error)
        assert user_message(error) == '/data/ir/0001.png: unreadable or corrupt image (truncated)'
        report_user_error(error)
    assert capsys.readouterr().err == 'error: /data/ir/0001.png: unreadable or corrupt image (truncated)\n'


def test_a_plain_message_is_left_as_it_is():
    assert user_message(DataError('Caught nothing: just a message')) == 'Caught nothing: just a message'
