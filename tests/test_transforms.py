"""Paired transforms: one geometry for both images and the boxes; photometric sharing rules; resize rule."""
import random

import numpy as np
import PIL.Image
import pytest
import torch

from datasets import transforms as T

W, H = 200, 160
BOX = (80, 60, 110, 80)  # x0, y0, x1, y1 in pixels


def make_pair(box=BOX):
    """RGB: blue-grey ground with a red rectangle; IR: dark ground with a hot rectangle at the same place."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:] = (30, 60, 90)
    ir = np.full((H, W), 40, np.uint8)
    x0, y0, x1, y1 = box
    rgb[y0:y1, x0:x1] = (250, 20, 20)
    ir[y0:y1, x0:x1] = 220
    target = {'boxes': torch.tensor([box], dtype=torch.float32), 'labels': torch.tensor([1]),
              'area': torch.tensor([float((x1 - x0) * (y1 - y0))]), 'iscrowd': torch.tensor([0]),
              'size': torch.tensor([H, W]), 'orig_size': torch.tensor([H, W])}
    return PIL.Image.fromarray(rgb), PIL.Image.fromarray(ir).convert('RGB'), target


def as_array(image) -> np.ndarray:
    """HWC float array in 0..255 from a PIL image or an ImageNet-normalised CHW tensor."""
    if isinstance(image, torch.Tensor):
        mean = torch.tensor(T.IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(T.IMAGENET_STD)[:, None, None]
        return ((image * std + mean) * 255).permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.float64)


def drawn_box(image):
    """Pixel extent (x0, y0, x1, y1) of the drawn rectangle (pixels far from the ground colour), or None."""
    a = as_array(image)
    ground = np.median(a.reshape(-1, a.shape[-1]), axis=0)
    dist = np.abs(a - ground).sum(-1)
    if dist.max() < 30:
        return None
    ys, xs = np.nonzero(dist > dist.max() / 2)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def target_box_pixels(target, image):
    """The single target box as xyxy pixels, from xyxy pixels (PIL stage) or cxcywh normalised (tensor stage)."""
    box = target['boxes'][0]
    if isinstance(image, torch.Tensor):
        h, w = image.shape[-2:]
        cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
        return cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    return box.tolist()


def assert_aligned(rgb, ir, target, tol=2.0):
    size = rgb.shape[-2:] if isinstance(rgb, torch.Tensor) else (rgb.height, rgb.width)
    size_ir = ir.shape[-2:] if isinstance(ir, torch.Tensor) else (ir.height, ir.width)
    assert tuple(size) == tuple(size_ir)
    assert tuple(target['size'].tolist()) == tuple(size)
    seen_rgb, seen_ir = drawn_box(rgb), drawn_box(ir)
    if len(target['boxes']) == 0:
        assert seen_rgb is None and seen_ir is None
        return
    expected = target_box_pixels(target, rgb)
    assert seen_rgb is not None and seen_ir is not None
    np.testing.assert_allclose(seen_rgb, expected, atol=tol)
    np.testing.assert_allclose(seen_ir, expected, atol=tol)


STEPS = {
    'flip': T.RandomHorizontalFlip(p=1.0),
    'resize': T.RandomResize([96, 128, 240], max_size=300),
    'crop': T.RandomSizeCrop(64, 150),
    'select_resize': T.RandomSelect(T.RandomResize([128]), T.RandomSizeCrop(64, 150), p=1.0),
    'select_crop_branch': T.RandomSelect(T.RandomResize([128]),
                                         T.Compose([T.RandomResize([120, 140]), T.RandomSizeCrop(64, 120),
                                                    T.RandomResize([96, 128], max_size=200)]), p=0.0),
    'photometric_choice': T.RandomChoice([T.ChannelPermutation(), T.AdjustBrightness(2.0), T.AdjustContrast(2.0)]),
    'eval': T.make_eval_transforms(128, 200),
}


@pytest.mark.parametrize('name', sorted(STEPS))
def test_each_transform_keeps_box_aligned_in_both_images(name):
    for seed in range(8):
        random.seed(seed)
        assert_aligned(*STEPS[name](*make_pair()))


def test_flip_moves_the_box_to_the_mirrored_place():
    rgb, ir, target = T.RandomHorizontalFlip(p=1.0)(*make_pair())
    assert target['boxes'][0].tolist() == [W - BOX[2], BOX[1], W - BOX[0], BOX[3]]
    assert drawn_box(ir) == (W - BOX[2], BOX[1], W - BOX[0], BOX[3])


def test_full_train_recipe_keeps_pairs_aligned_over_many_draws():
    recipe = T.make_train_transforms([96, 112, 128], 200, [100, 120], [64, 100], strong_aug=True)
    sizes = set()
    for seed in range(30):
        random.seed(seed)
        rgb, ir, target = recipe(*make_pair())
        assert rgb.dtype == ir.dtype == torch.float32 and rgb.shape[0] == ir.shape[0] == 3
        assert_aligned(rgb, ir, target, tol=2.5)
        sizes.add(tuple(rgb.shape[-2:]))
    assert len(sizes) > 3  # scales and crops vary between draws


def test_crop_removes_objects_outside_and_keeps_fields_in_step():
    rgb, ir, target = make_pair()
    target = dict(target, boxes=torch.tensor([BOX, (0, 0, 20, 20)], dtype=torch.float32),
                  labels=torch.tensor([1, 2]), area=torch.tensor([600.0, 400.0]), iscrowd=torch.tensor([0, 0]))
    rgb2, ir2, out = T.crop(rgb, ir, target, (50, 70, 40, 30))  # top, left, h, w: contains part of BOX only
    assert out['labels'].tolist() == [1]
    assert len(out['area']) == len(out['iscrowd']) == len(out['boxes']) == 1
    assert out['boxes'][0].tolist() == [10, 10, 30, 30]  # clipped to the 30 x 40 window
    assert out['area'].tolist() == [400.0]
    assert rgb2.size == ir2.size == (30, 40)


def test_crop_that_misses_the_object_leaves_an_empty_target():
    rgb, ir, out = T.crop(*make_pair(), (0, 0, 40, 40))
    assert out['boxes'].shape == (0, 4) and out['labels'].numel() == 0
    assert_aligned(rgb, ir, out)


def test_size_crop_handles_images_smaller_than_min_size():
    rgb, ir, target = make_pair()
    random.seed(0)
    out_rgb, out_ir, _ = T.RandomSizeCrop(300, 400)(rgb, ir, target)
    assert out_rgb.size == out_ir.size == (W, H)


@pytest.mark.parametrize('w, h, size, max_size, expected', [
    (640, 512, 800, 1333, (800, 1000)),    # FLIR at eval
    (1280, 1024, 800, 1333, (800, 1000)),  # LLVIP at eval
    (2000, 500, 800, 1333, (333, 1332)),   # long side capped: short side lowered to round(1333 * 500 / 2000)
    (300, 600, 300, None, (600, 300)),     # already at the target
    (333, 500, 480, None, (720, 480)),     # int() truncation of 480 * 500 / 333
])
def test_resize_rule_matches_detr(w, h, size, max_size, expected):
    assert T.resized_hw(w, h, size, max_size) == expected


def test_resize_scales_boxes_and_area():
    _, _, target = T.resize(*make_pair(), size=80)
    assert target['size'].tolist() == [80, 100]
    assert target['boxes'][0].tolist() == pytest.approx([40, 30, 55, 40])
    assert target['area'][0].item() == pytest.approx(600 / 4)


def test_channel_permutation_is_drawn_per_image():
    rgb = PIL.Image.fromarray(np.tile(np.array([10, 100, 200], np.uint8), (4, 4, 1)))
    orders = set()
    for seed in range(20):
        random.seed(seed)
        a, b, _ = T.ChannelPermutation()(rgb, rgb.copy(), {})
        orders.add((tuple(np.asarray(a)[0, 0]), tuple(np.asarray(b)[0, 0])))
    assert any(x != y for x, y in orders)  # the two images got different orders at least once
    assert all(sorted(x) == [10, 100, 200] for pair in orders for x in pair)


@pytest.mark.parametrize('step', [T.AdjustBrightness(2.0), T.AdjustContrast(2.0)])
def test_brightness_and_contrast_use_one_factor_for_both_images(step):
    rgb, _, target = make_pair()
    for seed in range(5):
        random.seed(seed)
        a, b, _ = step(rgb, rgb.copy(), target)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_brightness_factor_is_in_reference_range():
    grey = PIL.Image.new('RGB', (4, 4), (100, 100, 100))
    values = []
    for seed in range(50):
        random.seed(seed)
        a, _, _ = T.AdjustBrightness(2.0)(grey, grey, {})
        values.append(np.asarray(a)[0, 0, 0])
    assert min(values) >= 100 and max(values) < 200 and len(set(values)) > 10


def test_normalize_uses_imagenet_stats_for_both_and_converts_boxes():
    rgb, ir, target = T.ToTensor()(*make_pair())
    n_rgb, n_ir, out = T.Normalize()(rgb, ir, target)
    mean, std = torch.tensor(T.IMAGENET_MEAN)[:, None, None], torch.tensor(T.IMAGENET_STD)[:, None, None]
    assert torch.allclose(n_rgb, (rgb - mean) / std) and torch.allclose(n_ir, (ir - mean) / std)
    x0, y0, x1, y1 = BOX
    expected = [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H]
    assert out['boxes'][0].tolist() == pytest.approx(expected)


def test_train_recipe_without_strong_aug_has_no_photometric_step():
    with_aug = T.make_train_transforms([128], 200, [100], [64, 100], strong_aug=True)
    without = T.make_train_transforms([128], 200, [100], [64, 100], strong_aug=False)
    assert any(isinstance(t, T.RandomChoice) for t in with_aug.transforms)
    assert not any(isinstance(t, T.RandomChoice) for t in without.transforms)
    random.seed(0)
    rgb, _, _ = without(*make_pair())
    random.seed(0)
    rgb2, _, _ = without(*make_pair())
    assert torch.equal(rgb, rgb2)


def test_eval_transform_resizes_to_eval_size():
    rgb, ir, target = T.make_eval_transforms(128, 1333)(*make_pair())
    assert rgb.shape == ir.shape == (3, 128, 160)
    assert target['size'].tolist() == [128, 160]
    assert target['orig_size'].tolist() == [H, W]


# ------------------------------------------------------------------------------------------- missing modality

def test_missing_image_is_the_normalisation_mean():
    rgb, ir, _ = T.make_eval_transforms(128, 1333)(*make_pair())
    blank = T.missing_image(rgb)
    assert blank.shape == rgb.shape and blank.dtype == rgb.dtype and not blank.any()
    mean = torch.tensor(T.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(T.IMAGENET_STD)[:, None, None]
    assert torch.allclose(blank * std + mean, mean.expand_as(blank))  # un-normalised: a flat frame at the mean
    assert rgb.abs().sum() > 0, 'the image it was shaped on is left as it was'


def _recipe(modality_dropout):
    return T.make_train_transforms([96, 112, 128], 200, [100, 120], [64, 100], strong_aug=True,
                                   modality_dropout=modality_dropout)


@pytest.mark.slow
def test_modality_dropout_never_blanks_both_and_picks_each_image_about_half_the_time():
    dropout = T.ModalityDropout(1.0)
    rgb, ir, target = T.make_eval_transforms(128, 1333)(*make_pair())
    random.seed(0)
    missing = []
    for _ in range(400):
        out_rgb, out_ir, out_target = dropout(rgb, ir, target)
        blank = (not out_rgb.any(), not out_ir.any())
        assert blank in ((True, False), (False, True)), 'exactly one image is missing'
        kept = out_ir if blank[0] else out_rgb
        assert torch.equal(kept, ir if blank[0] else rgb)
        assert out_target is target
        missing.append('rgb' if blank[0] else 'ir')
    assert 160 < missing.count('rgb') < 240  # 400 fair draws: 200 +- 4 standard deviations


@pytest.mark.slow
def test_modality_dropout_rate():
    dropout = T.ModalityDropout(0.3)
    rgb, ir, target = T.make_eval_transforms(128, 1333)(*make_pair())
    random.seed(1)
    blanked = sum(not (a.any() and b.any()) for a, b, _ in (dropout(rgb, ir, target) for _ in range(1000)))
    assert 255 < blanked < 345  # 300 +- 3 standard deviations (sqrt(1000 * 0.3 * 0.7) = 14.5)


def test_modality_dropout_keeps_geometry_and_boxes_of_the_recipe():
    plain, dropped = _recipe(0.0), _recipe(1.0)
    assert not any(isinstance(t, T.ModalityDropout) for t in plain.transforms), \
        'at 0 the step is absent, so the random stream is the reference recipe'
    for seed in range(12):
        random.seed(seed)
        rgb, ir, target = plain(*make_pair())
        random.seed(seed)
        d_rgb, d_ir, d_target = dropped(*make_pair())
        assert d_rgb.shape == rgb.shape and d_ir.shape == ir.shape
        assert d_target.keys() == target.keys()
        assert all(torch.equal(d_target[k], target[k]) for k in target)
        assert (torch.equal(d_rgb, rgb) and not d_ir.any()) or (torch.equal(d_ir, ir) and not d_rgb.any())


@pytest.mark.parametrize('modality', ['rgb', 'ir'])
def test_eval_blanks_exactly_the_named_modality(modality):
    rgb, ir, target = T.make_eval_transforms(128, 1333)(*make_pair())
    b_rgb, b_ir, b_target = T.make_eval_transforms(128, 1333, missing_modality=modality)(*make_pair())
    blanked, kept, original = (b_rgb, b_ir, ir) if modality == 'rgb' else (b_ir, b_rgb, rgb)
    assert blanked.shape == kept.shape == (3, 128, 160) and not blanked.any()
    assert torch.equal(kept, original)
    assert all(torch.equal(b_target[k], target[k]) for k in target)


def test_missing_modality_values_are_checked():
    with pytest.raises(ValueError, match="eval_missing_modality='thermal'"):
        T.make_eval_transforms(128, 1333, missing_modality='thermal')
    with pytest.raises(ValueError, match='modality_dropout=1.5'):
        _recipe(1.5)
    assert not any(isinstance(t, T.BlankModality) for t in T.make_eval_transforms(128, 1333, 'none').transforms)
