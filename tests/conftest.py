"""Fixtures shared by every test module (the repo root is on sys.path through pytest.ini's `pythonpath = .`)."""
import json
from pathlib import Path

import pytest

from util.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT.parent / 'shared' / 'reference' / 'manifests'


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


@pytest.fixture(scope='session')
def reference_manifest():
    """reference_manifest('name.json', prefix='') -> the JSON of ../shared/reference/manifests/name.json.

    With a prefix, only the keys under it, prefix cut off, in file order (a state-dict manifest maps key -> shape).
    Skips the test when the file is not there (the manifests live outside the repository).
    """

    def load(name: str, prefix: str = '') -> dict:
        path = MANIFESTS / name
        if not path.exists():
            pytest.skip(f'reference manifest {path} not available')
        manifest = json.loads(path.read_text())
        return {key[len(prefix):]: value for key, value in manifest.items() if key.startswith(prefix)}

    return load

