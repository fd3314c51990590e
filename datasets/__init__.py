"""Data sets of aligned RGB + thermal pairs: `build_dataset(image_set, cfg)` is the only reader of data config keys.

Follows CAFF-DINO's `datasets/__init__.py::build_dataset` (llvip_fusion, flir_fusion); adds `synthetic` (the
LLVIP layout written by `datasets/synthetic.py`). Unlike the reference, the augmentation keys of the config are
used (the reference ignores them and hard-codes the same COCO values).
"""
from collections.abc import Mapping

from datasets.layouts import DATASET_FILES, resolve_layout
from datasets.pairs import BadPairError, PairedCocoDataset
from datasets.transforms import make_eval_transforms, make_train_transforms

__all__ = ['build_dataset', 'PairedCocoDataset', 'BadPairError', 'DATASET_FILES']

DATA_KEYS = ('dataset_file', 'coco_path', 'num_classes', 'skip_bad_pairs', 'data_aug_scales', 'data_aug_max_size',
             'data_aug_scales2_resize', 'data_aug_scales2_crop', 'strong_aug', 'eval_size', 'eval_max_size')


def _data_config(cfg) -> dict:
    values = cfg if isinstance(cfg, Mapping) else vars(cfg)
    missing = [k for k in DATA_KEYS if k not in values]
    if missing:
        raise KeyError(f'build_dataset: config lacks key(s) {missing}; they are defined in '
                       f'config/DINO/coco_transformer.py and DINO_4scale.py')
    return {k: values[k] for k in DATA_KEYS}


def build_dataset(image_set: str, cfg) -> PairedCocoDataset:
    """The 'train' or 'val' split of `cfg.dataset_file` under `cfg.coco_path`, with its transforms.

    Train: the reference augmentation recipe with the `data_aug_*` scales and `strong_aug`; bad pairs are
    skipped when `skip_bad_pairs`. Val: resize to `eval_size` (long side <= `eval_max_size`); a bad pair
    always raises, so evaluation never drops an image.
    """
    c = _data_config(cfg)
    layout = resolve_layout(c['dataset_file'], c['coco_path'], image_set)
    if image_set == 'train':
        transforms = make_train_transforms(c['data_aug_scales'], c['data_aug_max_size'],
                                           c['data_aug_scales2_resize'], c['data_aug_scales2_crop'],
                                           c['strong_aug'])
    else:
        transforms = make_eval_transforms(c['eval_size'], c['eval_max_size'])
    return PairedCocoDataset(layout.rgb_dir, layout.ir_dir, layout.annotation_file, c['num_classes'],
                             transforms=transforms, pair_names=layout.pair_names,
                             skip_bad_pairs=bool(c['skip_bad_pairs']) and image_set == 'train')
