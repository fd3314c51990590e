"""util/config_rules.py: the choice lists equal what the models and data sets accept, every rule takes the shipped
configs and refuses a bad value, and the rules across keys catch what the model would fail on later."""
from pathlib import Path

import pytest

from datasets.layouts import DATASET_FILES
from models.backbones import BACKBONE_NAMES
from models.caff_dino import QUERY_MODALITIES
from models.fusion import FUSION_TYPES
from models.ops.ms_deform_attn_func import BACKENDS
from models.utils import get_activation_fn
from util import config_rules
from util.config import ConfigError, known_keys, load_config
from datasets.images import BIT_DEPTH_RULES
from datasets.transforms import MISSING_MODALITY_CHOICES
from engine import AMP_DTYPES
from util.config_rules import CROSS_RULES, VALUE_RULES, at_least, between, int_list, one_of

# every full config (coco_transformer.py is a base holding the augmentation keys only)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / 'config' / 'DINO').glob('*.py')
                 if p.name != 'coco_transformer.py')


def test_choice_lists_are_the_names_the_code_accepts():
    assert config_rules.DATASET_FILES == tuple(DATASET_FILES)
    assert config_rules.BACKBONES == tuple(BACKBONE_NAMES)
    assert config_rules.FUSION_TYPES == tuple(FUSION_TYPES)
    assert config_rules.QUERY_MODALITIES == tuple(QUERY_MODALITIES)
    assert config_rules.MSDA_BACKENDS == tuple(BACKENDS)
    assert config_rules.BIT_DEPTH_RULES == tuple(BIT_DEPTH_RULES)
    assert config_rules.MISSING_MODALITY_CHOICES == tuple(MISSING_MODALITY_CHOICES)
    assert config_rules.AMP_DTYPES == tuple(AMP_DTYPES)
    for name in config_rules.ACTIVATIONS:
        get_activation_fn(name)
    with pytest.raises(ValueError):
        get_activation_fn('tanh')  # not offered by the model, so not in the list either


def test_every_rule_is_for_a_known_key():
    known = known_keys()
    assert set(VALUE_RULES) <= set(known)
    assert all(set(rule.keys) <= set(known) for rule in CROSS_RULES)


@pytest.mark.parametrize('config', CONFIGS, ids=[c.name for c in CONFIGS])
def test_the_shipped_configs_keep_every_rule(config):
    load_config(config)  # raises ConfigError otherwise


@pytest.mark.parametrize('rule,good,bad', [
    (at_least(1), [1, 2.5], [0, -1, float('nan'), float('inf'), True]),
    (between(0, 1), [0, 0.5, 1], [-0.1, 1.01, float('nan')]),
    (between(0, 1, low_open=True, high_open=True), [0.5], [0, 1]),
    (one_of('a', 'b'), ['a'], ['c', None]),
    (int_list(lo=0, hi=3, increasing=True), [[1, 2, 3], (0,)], [[], [2, 1], [1, 4], [1.0]]),
    (int_list(lo=1, length=3, first=1, odd=True), [[1, 5, 7]], [[1, 4, 7], [3, 5, 7], [1, 5]]),
])
def test_rules_accept_and_refuse(rule, good, bad):
    assert all(rule.fits(v) for v in good) and not any(rule.fits(v) for v in bad)


def test_a_rule_names_the_source_key_value_and_requirement():
    path = Path(__file__).resolve().parents[1] / 'config' / 'DINO' / 'CAFF_tiny.py'
    with pytest.raises(ConfigError) as info:
        load_config(path, ['dropout=1.0'])
    assert str(info.value) == ("--options: key 'dropout' = 1.0 is not allowed: it must be in [0, 1) "
                               '(a probability)')


@pytest.mark.parametrize('options,keys', [
    (['use_dn=False', 'dn_labelbook_size=1'], None),  # without DN the label book is not used
    (['num_select=61'], ('num_select', 'num_queries', 'num_classes')),
    (['data_aug_scales2_crop=[96,64]'], ('data_aug_scales2_crop',)),
    (['eval_size=200', 'eval_max_size=192'], ('eval_max_size', 'eval_size')),
    (['two_stage_bbox_embed_share=True', 'dec_pred_bbox_embed_share=False'], ('two_stage_bbox_embed_share',)),
    (['use_checkpoint=True'], ('use_checkpoint', 'backbone')),
    (['dilation=True'], ('dilation', 'backbone')),
])
def test_rules_across_keys(options, keys):
    path = Path(__file__).resolve().parents[1] / 'config' / 'DINO' / 'CAFF_tiny.py'
    base = ['num_queries=20']  # CAFF_tiny: 3 classes, backbone resnet18
    if keys is None:
        load_config(path, [*base, *options])
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, [*base, *options])
    assert all(f'{key}=' in str(info.value) for key in keys) and str(info.value).startswith('--options')
