"""Data sets of aligned RGB + thermal pairs: `build_dataset(image_set, cfg)` is the only reader of data config keys.

Follows CAFF-DINO's `datasets/__init__.py::build_dataset` (llvip_fusion, flir_fusion); adds `synthetic` (the
LLVIP layout written by `datasets/synthetic.py`) and `kaist_fusion` (KAIST in the LLVIP layout, scored by MR^-2 too:
`datasets/kaist.py`). Unlike the reference, the augmentation keys of the config are
used (the reference ignores them and hard-codes the same COCO values).
"""
from datasets.images import BitDepthRule
from datasets.kaist import KaistDataset
from datasets.layouts import DATASET_FILES, resolve_layout
from datasets.pairs import BadPairError, PairedCocoDataset
from datasets.transforms import make_eval_transforms, make_train_transforms

__all__ = ['build_dataset', 'build_benchmark_evaluator', 'PairedCocoDataset', 'BadPairError', 'DATASET_FILES']


def build_dataset(image_set: str, cfg) -> PairedCocoDataset:
    """The 'train' or 'val' split of `cfg.dataset_file` under `cfg.coco_path`, with its transforms.

    Train: the reference augmentation recipe with the `data_aug_*` scales and `strong_aug`; bad pairs are
    skipped when `skip_bad_pairs`; `modality_dropout` blanks one image of a pair at that rate. Val: resize to
    `eval_size` (long side <= `eval_max_size`), `eval_missing_modality` blanks that image of every pair; a bad
    pair always raises, so evaluation never drops an image. Both: images wider than 8 bits are mapped to 0..255 by
    `high_bit_depth_rule` / `high_bit_depth_limits` (datasets/images.py).
    """
    layout = resolve_layout(cfg.dataset_file, cfg.coco_path, image_set)
    if image_set == 'train':
        transforms = make_train_transforms(cfg.data_aug_scales, cfg.data_aug_max_size, cfg.data_aug_scales2_resize,
                                           cfg.data_aug_scales2_crop, cfg.strong_aug, cfg.modality_dropout)
    else:
        transforms = make_eval_transforms(cfg.eval_size, cfg.eval_max_size, cfg.eval_missing_modality)
    dataset_class = KaistDataset if cfg.dataset_file == 'kaist_fusion' else PairedCocoDataset
    return dataset_class(layout.rgb_dir, layout.ir_dir, layout.annotation_file, cfg.num_classes,
                         transforms=transforms, pair_names=layout.pair_names,
                         skip_bad_pairs=bool(cfg.skip_bad_pairs) and image_set == 'train',
                         bit_depth=BitDepthRule(cfg.high_bit_depth_rule, cfg.high_bit_depth_limits))


def build_benchmark_evaluator(dataset):
    """The evaluator of the data set's own benchmark metric, beside COCO AP (KAIST: MR^-2), or None."""
    return dataset.benchmark_evaluator() if isinstance(dataset, KaistDataset) else None
