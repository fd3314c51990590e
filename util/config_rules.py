"""What a config value may be: one rule per key (``VALUE_RULES``) and rules across keys (``CROSS_RULES``).

``util/config.py`` checks every loaded config against these tables (after the type check, so a rule sees a value
of its key's type), and a value that breaks one is a ``ConfigError`` naming the file (or ``--options``), the
key, the value and what it may be. Not in the reference, where a bad value fails later, deep inside the model or
the data pipeline, or trains silently wrong (``dropout=1.5``, ``lr_drop=0``).

Adding a rule for a key is one line in ``VALUE_RULES``:

    'my_key': at_least(1),                      # an int or float >= 1
    'my_mode': one_of('fast', 'exact'),          # a string choice
    'my_sizes': int_list(lo=1, length=2),        # a list of two ints >= 1

and a rule across keys one ``Cross`` entry in ``CROSS_RULES`` (the keys it reads, a test of the config, what it
requires). The choice lists below repeat the names that the models and data sets accept (they live in layers
above ``util``); ``tests/test_config_rules.py`` checks that both agree, so a new backbone, fusion type or data set
must be added here too.
"""
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Mapping, Optional

# Names the layers above accept (checked against them by tests/test_config_rules.py).
DATASET_FILES = ('llvip_fusion', 'flir_fusion', 'synthetic', 'kaist_fusion')
BIT_DEPTH_RULES = ('percentile', 'range')
MISSING_MODALITY_CHOICES = ('none', 'rgb', 'ir')
BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'swin_T_224_1k', 'swin_B_224_22k', 'swin_B_384_22k',
             'swin_L_224_22k', 'swin_L_384_22k')
FUSION_TYPES = ('caff', 'caff_dw', 'concat', 'add', 'rgb_only', 'ir_only')
QUERY_MODALITIES = ('ir', 'rgb')
MSDA_BACKENDS = ('auto', 'pytorch', 'cpu', 'cuda', 'triton')
ACTIVATIONS = ('relu', 'gelu', 'glu')
AMP_DTYPES = ('auto', 'float16', 'bfloat16')


@dataclass(frozen=True)
class Rule:
    """A test of one value and the words that say what the value may be (``'>= 1'``, ``"one of 'a', 'b'"``)."""
    test: Callable[[Any], bool]
    requirement: str

    def fits(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low) -> Rule:
    return Rule(lambda v: _finite(v) and v >= low, f'a finite number >= {low}')


def above(low) -> Rule:
    return Rule(lambda v: _finite(v) and v > low, f'a finite number > {low}')


def between(low, high, low_open: bool = False, high_open: bool = False, what: str = '') -> Rule:
    lower = (lambda v: v > low) if low_open else (lambda v: v >= low)
    upper = (lambda v: v < high) if high_open else (lambda v: v <= high)
    interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    return Rule(lambda v: _finite(v) and lower(v) and upper(v), f'in {interval}{f" ({what})" if what else ""}')


def probability() -> Rule:
    return between(0, 1, what='a probability')


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, 'one of ' + ', '.join(repr(c) for c in choices))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.fits(v), f'None or {rule.requirement}')


def multiple_of(n: int, low: int) -> Rule:
    return Rule(lambda v: _finite(v) and v >= low and v % n == 0, f'a multiple of {n}, >= {low}')


def non_empty_text() -> Rule:
    return Rule(lambda v: isinstance(v, str) and v.strip() != '', 'a non-empty string')


def int_list(lo: int = 1, hi: Optional[int] = None, length: Optional[int] = None, increasing: bool = False,
             first: Optional[int] = None, odd: bool = False) -> Rule:
    """A non-empty list (or tuple) of ints in [lo, hi], with the given length, strictly increasing, starting with
    ``first``, of odd values, as asked."""

    def test(values) -> bool:
        values = list(values)
        return (bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
                and all(v >= lo and (hi is None or v <= hi) for v in values)
                and (length is None or len(values) == length)
                and (not increasing or all(a < b for a, b in zip(values, values[1:])))
                and (first is None or values[0] == first) and (not odd or all(v % 2 for v in values)))

    words = [f'a list of {length} ints' if length else 'a non-empty list of ints',
             f' in [{lo}, {hi}]' if hi is not None else f' >= {lo}']
    if increasing:
        words.append(', strictly increasing')
    if odd:
        words.append(', odd')
    if first is not None:
        words.append(f', the first {first}')
    return Rule(test, ''.join(words))


VALUE_RULES: dict[str, Rule] = {
    # data
    'dataset_file': one_of(*DATASET_FILES),
    'num_workers': at_least(0),
    'data_aug_scales': int_list(lo=1),
    'data_aug_max_size': at_least(1),
    'data_aug_scales2_resize': int_list(lo=1),
    'data_aug_scales2_crop': int_list(lo=1, length=2),
    'eval_size': at_least(1),
    'eval_max_size': at_least(1),
    'high_bit_depth_rule': one_of(*BIT_DEPTH_RULES),
    'modality_dropout': probability(),
    'eval_missing_modality': one_of(*MISSING_MODALITY_CHOICES),
    # run
    'output_dir': non_empty_text(),
    'seed': between(0, 2 ** 32 - 1 - 1024, what='NumPy seeds are 32-bit; the rank is added'),
    'print_freq': at_least(1),
    'amp_dtype': one_of(*AMP_DTYPES),
    'save_checkpoint_interval': at_least(0),
    'eval_interval': at_least(1),
    # optimisation
    'batch_size': at_least(1),
    'epochs': at_least(1),
    'lr_drop': at_least(1),
    'lr': above(0),
    'lr_backbone': at_least(0),
    'weight_decay': at_least(0),
    'clip_max_norm': at_least(0),
    'ema_decay': between(0, 1, low_open=True, high_open=True),
    'ema_epoch': at_least(0),
    # model
    'num_classes': at_least(1),
    'backbone': one_of(*BACKBONES),
    'backbone_ir': optional(one_of(*BACKBONES)),
    'return_interm_indices': int_list(lo=0, hi=3, increasing=True),
    'pe_temperatureH': above(0),
    'pe_temperatureW': above(0),
    'num_feature_levels': at_least(1),
    'hidden_dim': multiple_of(32, 32),  # GroupNorm(32, hidden_dim) in input_proj and redim_corr
    'nheads': at_least(1),
    'enc_layers': at_least(1),
    'dec_layers': at_least(1),
    'dim_feedforward': at_least(1),
    'dropout': between(0, 1, high_open=True, what='a probability'),
    'transformer_activation': one_of(*ACTIVATIONS),
    'num_queries': at_least(1),
    'enc_n_points': at_least(1),
    'dec_n_points': at_least(1),
    'two_stage_default_hw': between(0, 1, low_open=True, what='a fraction of the image side'),
    'msda_backend': one_of(*MSDA_BACKENDS),
    'fusion_type': one_of(*FUSION_TYPES),
    'query_modality': one_of(*QUERY_MODALITIES),
    'caff_num_stages': at_least(1),
    'caff_kernel_sizes': int_list(lo=1, length=3, first=1, odd=True),
    'caff_proj_dim': multiple_of(2, 2),  # the CAFF position encoding needs an even channel count
    # denoising
    'dn_number': at_least(0),
    'dn_box_noise_scale': at_least(0),
    'dn_label_noise_ratio': probability(),
    'dn_labelbook_size': at_least(1),
    # matching, losses, post-processing
    'set_cost_class': at_least(0),
    'set_cost_bbox': at_least(0),
    'set_cost_giou': at_least(0),
    'cls_loss_coef': at_least(0),
    'bbox_loss_coef': at_least(0),
    'giou_loss_coef': at_least(0),
    'interm_loss_coef': at_least(0),
    'focal_alpha': probability(),
    'num_select': at_least(1),
    'nms_iou_threshold': between(-1, 1, what='an IoU; <= 0: no NMS'),
}


@dataclass(frozen=True)
class Cross:
    """A rule across keys: ``test(cfg)`` must hold; ``requirement`` says what to change."""
    keys: tuple[str, ...]
    test: Callable[[Mapping], bool]
    requirement: str


_SWIN = tuple(name for name in BACKBONES if name.startswith('swin'))

CROSS_RULES: tuple[Cross, ...] = (
    Cross(('dn_labelbook_size', 'num_classes', 'use_dn'),
          lambda c: not c['use_dn'] or c['dn_labelbook_size'] >= c['num_classes'],
          'dn_labelbook_size must be >= num_classes (label noise draws labels below num_classes); the reference '
          'uses 91 for both'),
    Cross(('num_feature_levels', 'return_interm_indices'),
          lambda c: c['num_feature_levels'] >= len(c['return_interm_indices']),
          'num_feature_levels must be >= the number of return_interm_indices (each returned stage is a level; '
          'extra levels are made by stride-2 convolutions)'),
    Cross(('hidden_dim', 'nheads'), lambda c: c['hidden_dim'] % c['nheads'] == 0,
          'hidden_dim must be a multiple of nheads (each attention head gets hidden_dim / nheads channels)'),
    Cross(('num_select', 'num_queries', 'num_classes'),
          lambda c: c['num_select'] <= c['num_queries'] * c['num_classes'],
          'num_select must be <= num_queries * num_classes (the post-processor keeps the top num_select of them)'),
    Cross(('set_cost_class', 'set_cost_bbox', 'set_cost_giou'),
          lambda c: c['set_cost_class'] > 0 or c['set_cost_bbox'] > 0 or c['set_cost_giou'] > 0,
          'at least one of set_cost_class, set_cost_bbox, set_cost_giou must be > 0 (the Hungarian matching has no '
          'cost otherwise)'),
    Cross(('data_aug_scales2_crop',), lambda c: c['data_aug_scales2_crop'][0] <= c['data_aug_scales2_crop'][1],
          'data_aug_scales2_crop is [min, max] of the random crop side: min must be <= max'),
    Cross(('eval_max_size', 'eval_size'), lambda c: c['eval_max_size'] >= c['eval_size'],
          'eval_max_size caps the long side after resizing the short side to eval_size: it must be >= eval_size'),
    Cross(('two_stage_bbox_embed_share', 'two_stage_class_embed_share', 'dec_pred_bbox_embed_share',
           'dec_pred_class_embed_share'),
          lambda c: not (c['two_stage_bbox_embed_share'] or c['two_stage_class_embed_share'])
          or (c['dec_pred_bbox_embed_share'] and c['dec_pred_class_embed_share']),
          'two_stage_*_embed_share=True needs dec_pred_bbox_embed_share and dec_pred_class_embed_share True (the '
          'encoder heads share the one decoder head)'),
    Cross(('use_checkpoint', 'backbone', 'backbone_ir'),
          lambda c: not c['use_checkpoint'] or {c['backbone'], c['backbone_ir'] or c['backbone']} <= set(_SWIN),
          'use_checkpoint=True (gradient checkpointing) is implemented for Swin backbones only: set it False or '
          'use swin_* backbones'),
    Cross(('dilation', 'backbone', 'backbone_ir'),
          lambda c: not c['dilation'] or not {c['backbone'], c['backbone_ir'] or c['backbone']} & {'resnet18',
                                                                                                 'resnet34'},
          'dilation=True needs a bottleneck ResNet (resnet50 / resnet101): set it False or change the backbone'),
)
