import copy
import pickle
import re
from pathlib import Path

import pytest

from util.config import Config, ConfigError, config_from_dict, known_keys, load_config, parse_options

ROOT = Path(__file__).resolve().parents[1]
DINO_4SCALE = ROOT / 'config' / 'DINO' / 'DINO_4scale.py'
BASE_LINE = f"_base_ = ['{DINO_4SCALE}']\n"
ARCHITECTURE_KEYS = """
dataset_file coco_path output_dir device seed num_workers amp amp_dtype batch_size epochs lr_drop lr lr_backbone weight_decay
clip_max_norm save_checkpoint_interval use_ema ema_decay ema_epoch skip_bad_pairs print_freq data_aug_scales
data_aug_max_size data_aug_scales2_resize data_aug_scales2_crop strong_aug eval_size eval_max_size num_classes
backbone backbone_ir use_checkpoint dilation return_interm_indices freeze_backbones pe_temperatureH pe_temperatureW
num_feature_levels hidden_dim nheads enc_layers dec_layers dim_feedforward dropout transformer_activation
num_queries enc_n_points dec_n_points two_stage_default_hw two_stage_bbox_embed_share two_stage_class_embed_share
dec_pred_bbox_embed_share dec_pred_class_embed_share embed_init_tgt msda_backend fusion_type query_modality
caff_num_stages caff_kernel_sizes caff_proj_dim aux_loss use_dn dn_number dn_box_noise_scale dn_label_noise_ratio
dn_labelbook_size set_cost_class set_cost_bbox set_cost_giou cls_loss_coef bbox_loss_coef giou_loss_coef
interm_loss_coef focal_alpha num_select tensorboard flush_denormal eval_interval nms_iou_threshold
high_bit_depth_rule high_bit_depth_limits modality_dropout eval_missing_modality
""".split()
# Every model config in config/DINO/ (coco_transformer.py is the augmentation base they share).
SHIPPED = sorted(p.name for p in (ROOT / 'config' / 'DINO').glob('*.py') if p.name != 'coco_transformer.py')
READERS = ['models', 'datasets', 'util', 'engine.py', 'main.py', 'tools']
READ_PATTERNS = [
    re.compile(r"\bcfg\.(\w+)"),
    re.compile(r"\bcfg\[\s*['\"](\w+)['\"]\s*\]"),
    re.compile(r"\bcfg\.get\(\s*['\"](\w+)['\"]"),
    re.compile(r"getattr\(\s*cfg\s*,\s*['\"](\w+)['\"]"),
]


def test_known_keys_are_the_architecture_table():
    assert set(known_keys()) == set(ARCHITECTURE_KEYS)


def test_reference_values_of_dino_4scale():
    cfg = load_config(DINO_4SCALE)
    assert isinstance(cfg, Config)
    assert cfg.hidden_dim == 256 and cfg.num_queries == 900 and cfg.num_classes == 91
    assert cfg.dn_box_noise_scale == 0.4 and cfg.lr_drop == 11 and cfg.backbone_ir is None
    assert cfg.data_aug_scales == list(range(480, 801, 32))


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_configs_evaluate_at_the_largest_training_scale(name):
    # DINO's rule (its val transform resizes to max(scales)); a smaller eval size shrinks every object below the
    # sizes the model was trained on.
    cfg = load_config(ROOT / 'config' / 'DINO' / name)
    assert cfg.eval_size == max(cfg.data_aug_scales)
    assert cfg.eval_max_size >= cfg.eval_size


def test_base_inheritance_child_overrides(tiny_cfg):
    swin = load_config(ROOT / 'config' / 'DINO' / 'DINO_5scale_swin.py')
    assert swin.backbone == 'swin_L_384_22k' and swin.num_feature_levels == 5 and swin.batch_size == 1
    assert swin.return_interm_indices == [0, 1, 2, 3] and swin.use_checkpoint is True
    assert swin.hidden_dim == 256 and swin.data_aug_max_size == 1333  # from DINO_4scale.py and its base
    assert tiny_cfg.hidden_dim == 64 and tiny_cfg.hidden_dim % 32 == 0 and tiny_cfg.nheads == 4
    assert tiny_cfg.num_classes == 3 and tiny_cfg.dn_labelbook_size == 3 and tiny_cfg.freeze_backbones is False
    assert tiny_cfg.dropout == 0.0 and tiny_cfg.enc_n_points == 4  # inherited


def test_child_of_child_and_base_relative_to_the_file(write_file):
    write_file('a/parent.py', BASE_LINE + 'hidden_dim = 128\nnheads = 4\n')
    child = write_file('a/b/child.py', "_base_ = ['../parent.py']\nnheads = 2\n")
    cfg = load_config(child)
    assert (cfg.hidden_dim, cfg.nheads, cfg.enc_layers) == (128, 2, 6)


def test_same_key_in_two_sibling_bases_is_an_error(write_file):
    write_file('one.py', 'lr = 1e-3\n')
    write_file('two.py', 'lr = 2e-3\n')
    path = write_file('child.py', BASE_LINE + "_base_ = ['one.py', 'two.py']\n")
    with pytest.raises(ConfigError, match=r"'lr' is defined in two bases"):
        load_config(path)


def test_base_cycle_and_missing_base_are_errors(write_file):
    write_file('x.py', "_base_ = ['y.py']\n")
    cyclic = write_file('y.py', "_base_ = ['x.py']\n")
    with pytest.raises(ConfigError, match='cycle'):
        load_config(cyclic)
    with pytest.raises(ConfigError, match='no such config file'):
        load_config(write_file('z.py', "_base_ = ['absent.py']\n"))


def test_imports_functions_and_private_names_are_not_keys(write_file):
    path = write_file('c.py', BASE_LINE + 'import math\nfrom os import path\n_scale = 2\n'
                      'def _double(x):\n    return 2 * x\n\nhidden_dim = _double(64) * _scale\n'
                      'lr = math.sqrt(1e-8)\n')
    cfg = load_config(path)
    assert cfg.hidden_dim == 256 and cfg.lr == pytest.approx(1e-4)
    assert set(cfg) == set(ARCHITECTURE_KEYS)


def test_unknown_key_in_file_names_file_key_and_suggestion(write_file):
    path = write_file('x.py', BASE_LINE + 'hiden_dim = 64\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert 'x.py' in message and "unknown key 'hiden_dim'" in message and "did you mean 'hidden_dim'?" in message


def test_file_without_every_known_key_is_an_error(write_file):
    with pytest.raises(ConfigError, match='missing keys'):
        load_config(write_file('partial.py', 'hidden_dim = 64\n'))


def test_wrong_type_in_file_is_an_error(write_file):
    with pytest.raises(ConfigError, match=r"'hidden_dim' expects a int"):
        load_config(write_file('t.py', BASE_LINE + 'hidden_dim = 64.0\n'))


def test_parse_options_types():
    parsed = parse_options(['a=1', 'b=[1, (2, 3)]', 'c=True', 'd=None', 'e=resnet18', 'f=1e-4', "g='7'", 'h.i=-2'])
    assert parsed == {'a': 1, 'b': [1, (2, 3)], 'c': True, 'd': None, 'e': 'resnet18', 'f': 1e-4, 'g': '7',
                      'h.i': -2}
    assert type(parsed['a']) is int and type(parsed['f']) is float
    assert parse_options(None) == {} and parse_options('x=[]') == {'x': []}
    with pytest.raises(ConfigError, match='key=value'):
        parse_options(['no_equals_sign'])


def test_options_override_with_type_checks(tiny_cfg):
    path = ROOT / 'config' / 'DINO' / 'CAFF_tiny.py'
    cfg = load_config(path, ['lr=1', 'epochs=3', 'backbone_ir=resnet34', 'data_aug_scales=[200,216]',
                             'amp=True', 'coco_path=/data/llvip'])
    assert cfg.lr == 1.0 and type(cfg.lr) is float  # int accepted for a float default
    assert cfg.epochs == 3 and cfg.backbone_ir == 'resnet34' and cfg.data_aug_scales == [200, 216]
    assert cfg.amp is True and cfg.coco_path == '/data/llvip'
    assert load_config(path, {'backbone_ir': None, 'seed': 7}).seed == 7
    assert tiny_cfg.lr == 4e-4  # the fixture's config is not changed by the loads above
    with pytest.raises(ConfigError, match=r"--options: key 'epochs' expects a int"):
        load_config(path, ['epochs=1.5'])
    with pytest.raises(ConfigError, match=r"'amp' expects a bool"):
        load_config(path, ['amp=1'])
    with pytest.raises(ConfigError, match=r"'hidden_dim' expects a int.*got str"):
        load_config(path, ['hidden_dim=big'])


def test_unknown_option_names_key_and_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / 'config' / 'DINO' / 'CAFF_tiny.py', ['num_querys=10'])
    assert str(err.value).startswith("--options: unknown key 'num_querys'")
    assert "'num_queries'" in str(err.value)
    with pytest.raises(ConfigError, match="'lr' is not a dict"):
        load_config(ROOT / 'config' / 'DINO' / 'CAFF_tiny.py', ['lr.x=1'])


def test_missing_key_access_raises_with_suggestion(tiny_cfg):
    with pytest.raises(AttributeError, match="did you mean 'hidden_dim'"):
        tiny_cfg.hiden_dim
    with pytest.raises(KeyError):
        tiny_cfg['hiden_dim']
    assert not hasattr(tiny_cfg, 'hiden_dim') and tiny_cfg.get('hiden_dim') is None


def test_config_survives_deepcopy_and_pickle(tiny_cfg):
    assert copy.deepcopy(tiny_cfg) == tiny_cfg and type(copy.deepcopy(tiny_cfg)) is Config
    assert pickle.loads(pickle.dumps(tiny_cfg)) == tiny_cfg


def test_dump_round_trip(tiny_cfg, tmp_path):
    tiny_cfg.update(lr=3e-4, caff_kernel_sizes=(1, 3, 5), coco_path="it's here")
    path = tmp_path / 'out' / 'config.py'
    tiny_cfg.dump(path)
    text = path.read_text()
    assert 'caff_kernel_sizes = (1, 3, 5)' in text and '_base_' not in text
    reloaded = load_config(path)
    assert reloaded == tiny_cfg and reloaded.to_dict() == tiny_cfg.to_dict()
    assert reloaded.caff_kernel_sizes == (1, 3, 5)


def test_dump_rejects_values_that_are_not_literals(tiny_cfg, tmp_path):
    tiny_cfg.backbone_ir = object()
    with pytest.raises(ConfigError, match="'backbone_ir'"):
        tiny_cfg.dump(tmp_path / 'c.py')


def test_to_dict_and_config_from_dict(tiny_cfg):
    plain = tiny_cfg.to_dict()
    assert type(plain) is dict and plain['hidden_dim'] == 64
    assert config_from_dict(plain) == tiny_cfg
    with pytest.raises(ConfigError, match="checkpoint: unknown key 'hiden_dim'"):
        config_from_dict({**plain, 'hiden_dim': 1}, source='checkpoint')


def _keys_read_in_code() -> dict:
    """{key: [files]} for every `cfg.<key>`-style read in the code outside util/config.py."""
    found = {}
    for reader in READERS:
        path = ROOT / reader
        files = [path] if path.is_file() else sorted(path.rglob('*.py')) if path.is_dir() else []
        for file in files:
            if file == ROOT / 'util' / 'config.py':
                continue
            text = file.read_text()
            for pattern in READ_PATTERNS:
                for key in pattern.findall(text):
                    found.setdefault(key, []).append(str(file.relative_to(ROOT)))
    return found


def test_every_known_key_is_read_somewhere():
    read = _keys_read_in_code()
    unread = sorted(key for key in known_keys() if key not in read)
    assert not unread, f'known config keys that no code reads as cfg.<key>: {unread}'


def test_every_key_read_in_code_is_known():
    config_attributes = set(dir(Config))
    unknown = {key: files for key, files in _keys_read_in_code().items()
               if key not in known_keys() and key not in config_attributes}
    assert not unknown, f'code reads keys that no config defines: {unknown}'
