"""models/pretrained.py: a DINO COCO checkpoint fills both branches; a CAFF-DINO checkpoint with another head is
loaded without it; a checkpoint given to the wrong flag, or one that fits nothing, is a one-line error."""
from pathlib import Path

import pytest
import torch

from models import build_model
from models.checkpoint_keys import checkpoint_kind
from models.pretrained import load_pretrained_caff, load_pretrained_coco
from util.checkpoint import CheckpointError, save_checkpoint
from util.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config(tiny_run_options):
    """tiny_config(key=value, ...) -> the tiny run config with these keys changed."""

    def load(**overrides):
        return load_config(REPO / 'config/DINO/CAFF_tiny.py',
                           [*tiny_run_options, *(f'{k}={v!r}' for k, v in overrides.items())])

    return load


def dino_state_of(model) -> dict:
    """A mono-spectral DINO state dict written by hand from a CAFF-DINO one: one backbone, one input projection,
    the rest (with its aliased heads) as it is."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith('backbone_visible.'):
            state['backbone.' + key[len('backbone_visible.'):]] = value
        elif not key.startswith(('backbone_ir.', 'input_proj_ir.', 'conv_corr.', 'redim_corr.')):
            state[key] = value
    return state


@pytest.mark.slow
def test_pretrain_model_coco_fills_both_branches_equally(tmp_path, tiny_config):
    cfg = tiny_config()
    model, _, _ = build_model(cfg)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_()  # random values, so that every copied tensor is recognisable
    dino_state = dino_state_of(model)
    path = str(tmp_path / 'dino_coco.pth')
    save_checkpoint({'model': dino_state}, path)

    fresh, _, _ = build_model(cfg)
    report = load_pretrained_coco(fresh, path)
    state = fresh.state_dict()
    for key, value in dino_state.items():
        if key.startswith('backbone.'):
            rest = key[len('backbone.'):]
            assert torch.equal(state['backbone_visible.' + rest], value)
            assert torch.equal(state['backbone_ir.' + rest], value)
        elif key.startswith('input_proj.'):
            assert torch.equal(state[key], value) and torch.equal(state['input_proj_ir.' + key[11:]], value)
        else:
            assert torch.equal(state[key], value), key
    assert {k.split('.')[0] for k in report.new} == {'conv_corr', 'redim_corr'}
    assert not report.skipped_shape and not report.unexpected
    assert 'newly initialised' in report.summary()


def test_pretrain_model_path_with_other_num_classes_skips_the_heads(tmp_path, tiny_config):
    source, _, _ = build_model(tiny_config(num_classes=5, dn_labelbook_size=5))
    path = str(tmp_path / 'caff5.pth')
    save_checkpoint({'model': source.state_dict(), 'epoch': 3}, path)
    target, _, _ = build_model(tiny_config())
    report = load_pretrained_caff(target, path)
    skipped = {k for k, _, _ in report.skipped_shape}
    assert 'label_enc.weight' in skipped and any('class_embed' in k for k in skipped)
    assert all('class_embed' in k or k == 'label_enc.weight' for k in skipped)
    assert torch.equal(target.state_dict()['transformer.level_embed'], source.state_dict()['transformer.level_embed'])
    assert 'skipped, shape mismatch' in report.summary()


def test_checkpoint_kind_tells_caff_from_dino(tiny_config):
    model, _, _ = build_model(tiny_config())
    assert checkpoint_kind(model.state_dict()) == 'caff'
    assert checkpoint_kind({f'module.{k}': v for k, v in model.state_dict().items()}) == 'caff'
    assert checkpoint_kind(dino_state_of(model)) == 'dino'
    assert checkpoint_kind({'transformer.level_embed': torch.zeros(1)}) == 'unknown'


def test_a_checkpoint_given_to_the_wrong_flag_says_which_flag_fits(tmp_path, tiny_config):
    model, _, _ = build_model(tiny_config())
    caff, dino = str(tmp_path / 'caff.pth'), str(tmp_path / 'dino.pth')
    save_checkpoint({'model': model.state_dict()}, caff)
    save_checkpoint({'model': dino_state_of(model)}, dino)
    with pytest.raises(CheckpointError, match=r'is a CAFF-DINO checkpoint.*--pretrain_model_path') as info:
        load_pretrained_coco(model, caff)
    assert caff in str(info.value) and '\n' not in str(info.value)
    with pytest.raises(CheckpointError, match=r'is a mono-spectral DINO checkpoint.*--pretrain_model_coco'):
        load_pretrained_caff(model, dino)


def test_a_checkpoint_of_which_nothing_fits_is_an_error(tmp_path, tiny_config):
    model, _, _ = build_model(tiny_config())
    path = str(tmp_path / 'other.pth')
    save_checkpoint({'model': {'conv_corr.0.weight': torch.zeros(1), 'something.else': torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r'no tensor of it fits this model \(0 of another shape, 2 unknown '
                                              r'keys, 0 left out by --finetune_ignore\)'):
        load_pretrained_caff(model, path)
