"""Fixtures shared by every test module (the repo root is on sys.path through pytest.ini's `pythonpath = .`)."""
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors only through the interpreter; its mode is fixed
    os.environ.setdefault('TRITON_INTERPRET', '1')  # when a module first decorates a kernel, whichever test imports it

from util.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / 'tests' / 'data' / 'reference_manifests'


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session', autouse=True)
def data_check_cache(tmp_path_factory):
    """The data check's cache (datasets/check.py, $CAFF_DATA_CHECK_CACHE) lives in the session's tmp dir, never in
    ~/.cache; subprocesses inherit it. Tests of the cache itself point the variable at their own tmp_path."""
    previous = os.environ.get('CAFF_DATA_CHECK_CACHE')
    os.environ['CAFF_DATA_CHECK_CACHE'] = str(tmp_path_factory.mktemp('data_check_cache'))
    yield
    if previous is None:
        os.environ.pop('CAFF_DATA_CHECK_CACHE', None)
    else:
        os.environ['CAFF_DATA_CHECK_CACHE'] = previous


@pytest.fixture
def tiny_cfg():
    """config/DINO/CAFF_tiny.py, loaded fresh for each test (tests may change it)."""
    return load_config(REPO_ROOT / 'config' / 'DINO' / 'CAFF_tiny.py')


@pytest.fixture(scope='session')
def tiny_run_options() -> list[str]:
    """--options for main.py that make CAFF_tiny.py train and evaluate in seconds on a CPU (96 px, 1 encoder layer)."""
    return ['data_aug_scales=[96]', 'data_aug_scales2_resize=[96]', 'data_aug_scales2_crop=[64,96]',
            'data_aug_max_size=128', 'eval_size=96', 'eval_max_size=128', 'enc_layers=1', 'dec_layers=2',
            'num_queries=20', 'num_select=20', 'dn_number=4', 'hidden_dim=32', 'dim_feedforward=64',
            'batch_size=2', 'print_freq=100', 'save_checkpoint_interval=0', "msda_backend='pytorch'"]


@pytest.fixture(scope='session')
def tiny_model_options() -> dict:
    """Config overrides of CAFF_tiny.py for a model that builds and predicts in a fraction of a second (d=32, one
    layer each, 8 queries, 96 px evaluation): the Python API and predict tests."""
    return {'hidden_dim': 32, 'nheads': 2, 'enc_layers': 1, 'dec_layers': 1, 'dim_feedforward': 32,
            'num_queries': 8, 'num_select': 8, 'dn_number': 2, 'eval_size': 96, 'eval_max_size': 160,
            'device': 'cpu'}


@pytest.fixture(scope='session')
def string_image_ids():
    """string_image_ids(root, template) -> rewrite the validation annotation file of the synthetic data set at
    `root` so that image n is named `template.format(n)` (e.g. 'frame-{}'), as community files do."""

    def rewrite(root, template: str) -> None:
        path = Path(root) / 'coco_annotations' / 'LLVIP_test.json'
        coco = json.loads(path.read_text())
        for image in coco['images']:
            image['id'] = template.format(image['id'])
        for annotation in coco['annotations']:
            annotation['image_id'] = template.format(annotation['image_id'])
        path.write_text(json.dumps(coco))

    return rewrite


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
    """reference_manifest('name.json', prefix='') -> the JSON of tests/data/reference_manifests/name.json.

    With a prefix, only the keys under it, prefix cut off, in file order (a state-dict manifest maps key -> shape).
    The manifests are the reference models' state-dict key -> shape tables (data, copied into the repository), so
    no test skips for lack of them.
    """

    def load(name: str, prefix: str = '') -> dict:
        manifest = json.loads((MANIFESTS / name).read_text())
        return {key[len(prefix):]: value for key, value in manifest.items() if key.startswith(prefix)}

    return load


@pytest.fixture
def fresh_msda_dispatch(monkeypatch):
    """The MSDeformAttn dispatcher with no environment override, its own warn-once, log-once and self-check
    caches, and a copy of the loaded kernels (tests/test_ms_deform_attn*.py use it for every test)."""
    from models.ops import ms_deform_attn_func
    monkeypatch.delenv(ms_deform_attn_func.ENV_VAR, raising=False)
    monkeypatch.setattr(ms_deform_attn_func, '_modules', dict(ms_deform_attn_func._modules))  # keeps built ones
    monkeypatch.setattr(ms_deform_attn_func, '_unavailable', dict(ms_deform_attn_func._unavailable))
    for name in ('_warned', '_logged'):
        monkeypatch.setattr(ms_deform_attn_func, name, set())
    for name in ('_trusted', 'self_check_seconds'):
        monkeypatch.setattr(ms_deform_attn_func, name, {})


@pytest.fixture(scope='session')
def msda_inputs():
    """msda_inputs(n=2, m=3, d=5, lq=7, p=2, dtype=float64, seed=0, device='cpu') -> random MSDeformAttn inputs
    (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    The levels are (3, 5), (1, 4), (6, 1), (2, 2): a single row and a single column among them. Locations span
    [-0.3, 1.3], so points fall inside, on the border and outside the maps.
    """

    def make(n=2, m=3, d=5, lq=7, p=2, dtype=torch.float64, seed=0, device='cpu'):
        gen = torch.Generator().manual_seed(seed)
        spatial_shapes = torch.tensor([(3, 5), (1, 4), (6, 1), (2, 2)], dtype=torch.long)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        levels, s = len(spatial_shapes), int(spatial_shapes.prod(1).sum())
        value = torch.randn(n, s, m, d, generator=gen, dtype=dtype)
        locations = torch.rand(n, lq, m, levels, p, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
        weights = torch.rand(n, lq, m, levels, p, generator=gen, dtype=dtype)
        return tuple(t.to(device) for t in (value, spatial_shapes, level_start_index, locations, weights))

    return make
