"""Tests for models/__init__.py build_model: reference manifests (built on the meta device), config validation."""
import functools
from pathlib import Path

import pytest
import torch

from models import build_model
from models.criterion import SetCriterion
from models.postprocess import PostProcess
from util.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / 'config' / 'DINO'


def build_on_meta(cfg):
    with torch.device('meta'):
        return build_model(cfg)


@functools.lru_cache(maxsize=None)
def reference_model(config):
    """The model of a full-size config, built once per test session (meta device: no memory)."""
    return build_on_meta(load_config(CONFIGS / config))[0]


@pytest.mark.parametrize('config,manifest', [('DINO_4scale.py', 'caff_dino_4scale_r50_llvip'),
                                             ('DINO_5scale_swin.py', 'caff_dino_5scale_swinL_llvip')])
def test_state_dict_equals_reference_manifest(reference_manifest, config, manifest):
    expected = reference_manifest(f'{manifest}.json')
    info = reference_manifest(f'{manifest}.info.json')
    model = reference_model(config)
    got = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert list(got) == list(expected)  # names and order
    assert got == expected  # shapes
    assert sum(p.numel() for p in model.parameters()) == info['n_parameters_unique']
    for name, count in info['params_by_top_module'].items():
        assert sum(p.numel() for p in getattr(model, name).parameters()) == count, name


@pytest.mark.parametrize('config,trainable', [('DINO_4scale.py', 149_294_270), ('DINO_5scale_swin.py', 176_926_590)])
def test_frozen_backbones_leave_the_reference_trainable_count(config, trainable):
    model = reference_model(config)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert not any(p.requires_grad for p in model.backbone_visible.parameters())
    assert not any(p.requires_grad for p in model.backbone_ir.parameters())


def test_shared_heads_are_aliases_as_in_dino():
    model = reference_model('DINO_4scale.py')
    assert model.transformer.decoder.bbox_embed is model.bbox_embed
    assert model.transformer.decoder.class_embed is model.class_embed
    assert all(head is model.bbox_embed[0] for head in model.bbox_embed)
    assert model.transformer.enc_out_bbox_embed is not model.bbox_embed[0]
    assert model.transformer.enc_out_class_embed is not model.class_embed[0]


def test_criterion_and_postprocessor_follow_the_config(tiny_cfg):
    tiny_cfg.num_select = 7
    model, criterion, postprocessors = build_on_meta(tiny_cfg)
    assert isinstance(criterion, SetCriterion) and criterion.num_classes == tiny_cfg.num_classes
    weights = criterion.weight_dict
    assert weights['loss_bbox'] == tiny_cfg.bbox_loss_coef and weights['loss_giou_dn'] == tiny_cfg.giou_loss_coef
    assert f'loss_ce_{tiny_cfg.dec_layers - 2}' in weights and 'loss_ce_interm' in weights
    assert set(postprocessors) == {'bbox'} and isinstance(postprocessors['bbox'], PostProcess)
    assert postprocessors['bbox'].num_select == 7
    assert model.label_enc.num_embeddings == tiny_cfg.dn_labelbook_size + 1
    assert model.class_embed[0].out_features == tiny_cfg.num_classes


def test_dn_labelbook_smaller_than_num_classes_is_a_clear_error(tiny_cfg):
    tiny_cfg.dn_labelbook_size = tiny_cfg.num_classes - 1
    with pytest.raises(ValueError, match='dn_labelbook_size=2 is smaller than num_classes=3'):
        build_on_meta(tiny_cfg)
    tiny_cfg.use_dn = False
    model, criterion, _ = build_on_meta(tiny_cfg)
    assert model.dn_number == 0 and 'loss_ce_dn' not in criterion.weight_dict


@pytest.mark.parametrize('fusion_type,has_conv_corr,has_redim_corr',
                         [('caff', True, True), ('concat', False, True), ('add', False, False),
                          ('rgb_only', False, False), ('ir_only', False, False)])
def test_fusion_type_selects_the_fusion_layers(tiny_cfg, fusion_type, has_conv_corr, has_redim_corr):
    tiny_cfg.fusion_type = fusion_type
    model, _, _ = build_on_meta(tiny_cfg)
    keys = model.state_dict().keys()
    assert any(k.startswith('conv_corr.') for k in keys) == has_conv_corr
    assert any(k.startswith('redim_corr.') for k in keys) == has_redim_corr


def test_caff_options_reach_the_fusion_modules(tiny_cfg):
    tiny_cfg.caff_num_stages, tiny_cfg.caff_kernel_sizes, tiny_cfg.caff_proj_dim = 1, [1, 3, 5], 32
    model, _, _ = build_on_meta(tiny_cfg)
    caff = model.conv_corr[0]
    assert caff.num_stages == 1 and caff.kernel_sizes == (1, 3, 5) and caff.proj.out_channels == 32
    assert model.redim_corr[0][0].in_channels == 2 * tiny_cfg.hidden_dim + 32


def test_backbone_ir_defaults_to_backbone_and_may_differ_in_channels(tiny_cfg):
    model, _, _ = build_on_meta(tiny_cfg)
    assert model.backbone_ir.num_channels == model.backbone_visible.num_channels
    tiny_cfg.backbone_ir = 'resnet50'
    model, _, _ = build_on_meta(tiny_cfg)
    assert model.backbone_ir.num_channels == [512, 1024, 2048]
    assert model.input_proj_ir[0][0].in_channels == 512 and model.input_proj[0][0].in_channels == 128
    assert model.input_proj_ir[3][0].in_channels == 2048


def test_unknown_query_modality_names_the_choices(tiny_cfg):
    tiny_cfg.query_modality = 'thermal'
    with pytest.raises(ValueError, match="query_modality='thermal'.*'ir'"):
        build_on_meta(tiny_cfg)


def test_msda_backend_reaches_every_layer_and_the_environment_overrides_it(tiny_cfg, monkeypatch):
    from models.ops import MSDeformAttn, ms_deform_attn_func
    monkeypatch.delenv(ms_deform_attn_func.ENV_VAR, raising=False)
    tiny_cfg.msda_backend = 'triton'
    for env, expected in ((None, 'triton'), ('pytorch', 'pytorch')):
        if env:
            monkeypatch.setenv(ms_deform_attn_func.ENV_VAR, env)
        model = build_on_meta(tiny_cfg)[0]
        layers = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
        assert len(layers) == tiny_cfg.enc_layers + tiny_cfg.dec_layers
        assert {layer.backend for layer in layers} == {expected}
