"""Fixtures shared by every test module (the repo root is on sys.path through pytest.ini's `pythonpath = .`)."""
from pathlib import Path

import pytest

from util.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def tiny_cfg():
    """config/DINO/CAFF_tiny.py, loaded fresh for each test (tests may change it)."""
    return load_config(REPO_ROOT / 'config' / 'DINO' / 'CAFF_tiny.py')


@pytest.fixture
def write_file(tmp_path):
    """write_file('name.py', text) -> Path of a file written under the test's tmp_path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write
