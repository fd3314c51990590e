"""The Python inference API: a trained CAFF-DINO as an object that takes RGB + thermal images and returns boxes.

    from tools.detector import Detector
    det = Detector.from_checkpoint('outputs/caff_demo/checkpoint_best_ema.pth')   # config saved in it
    result = det.predict('rgb/000001.png', 'ir/000001.png', score_threshold=0.3)
    result['boxes'], result['scores'], result['labels'], result['names']

Not in the reference (it has only the training / evaluation loop). What ``predict`` does to a pair is what the
evaluation loop (``engine.evaluate``) does to it: the image is read as 3-channel 8-bit RGB
(``datasets.pairs.read_image``), passes the evaluation transform (``eval_size`` / ``eval_max_size`` of the config,
then ImageNet normalisation), the model runs in eval mode, and ``PostProcess`` (top ``num_select`` over queries x
classes) maps the boxes to the pixels of the original image; ``predict`` then keeps the detections with score >=
``score_threshold``. A test checks the boxes against the evaluation loop's detections for the same pair.

Inputs, for ``rgb`` and ``ir`` each (the two images of a pair must have the same size):
- a path (``str`` / ``os.PathLike``) to an image file;
- a PIL image (any mode; converted to RGB, so a grey thermal frame becomes three equal channels);
- a numpy array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` in RGB channel order (not OpenCV's BGR);
- a tensor ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` (torchvision's channel-first layout);
- ``None``: the image is missing (a failed camera); see below;
- a list of the above: a batch; ``rgb`` and ``ir`` are then lists of the same length.
Arrays and tensors are ``uint8`` (0..255) or floating point in [0, 1]; floating point values are rounded to
8 bits, which is what the evaluation loop sees when it reads an image file.

A missing image (``None``) is replaced, after normalisation, by ``datasets.transforms.missing_image``: the zero
tensor, i.e. the ImageNet mean in pixel space, of the size of its partner; one ``MissingModalityWarning`` per ``predict`` call
says how many pairs had which image missing. A pair with both images missing is an error.

Output: one dict per pair (a list for a batch): ``boxes`` ``(k, 4)`` float xyxy in the pixels of the original
image, ``scores`` ``(k,)`` descending, ``labels`` ``(k,)`` int64 (the category ids of the annotation files),
``names`` (k strings: the class names, or the id as a string when none is known); tensors on the CPU.

Weights load ``weights_only`` (``util/checkpoint.py``). ``config=None`` takes the config saved in the checkpoint
(``'config'``, written by ``main.py``); a checkpoint of the reference code holds its run arguments instead
(``'args'``, an ``argparse.Namespace``): the keys of it that this code base knows are applied on top of
``config/DINO/DINO_4scale.py``, the others are ignored, so released CAFF-DINO weights load as they are.
"""
import argparse
import json
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from datasets.images import DEFAULT_BIT_DEPTH, BadPairError, BitDepthRule, read_image, to_rgb
from datasets.transforms import make_eval_transforms, missing_image
from util.checkpoint import CheckpointError, load_checkpoint, strip_module_prefix
from util.config import KNOWN_KEYS_FILE, config_from_dict, load_config, value_fits
from util.device import resolve_device
from util.errors import UsageError
from util.misc import collate_fn

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor, None]
MODALITIES = ('rgb', 'ir')


class MissingModalityWarning(UserWarning):
    """A pair was predicted with one of its two images missing (replaced by :func:`datasets.transforms.missing_image`)."""


# ------------------------------------------------------------------------------------------------ config

def category_names(coco_dataset: Optional[dict]) -> dict[int, str]:
    """``{category id: name}`` of a COCO dict (empty when there is none)."""
    if not coco_dataset:
        return {}
    return {int(c['id']): str(c.get('name', c['id'])) for c in coco_dataset.get('categories', [])}


def config_categories(cfg) -> dict[int, str]:
    """Category names of the val annotation file of the config's data set, or ``{}`` when it is not on disk."""
    from datasets.layouts import resolve_layout
    try:
        layout = resolve_layout(cfg.dataset_file, cfg.coco_path, 'val')
        with open(layout.annotation_file, encoding='utf-8') as f:
            return category_names(json.load(f))
    except (ValueError, OSError, KeyError):
        return {}


def config_from_reference_args(args: argparse.Namespace, options: Optional[Mapping[str, Any]] = None,
                               source: str = 'reference checkpoint'):
    """The config of a reference checkpoint: ``config/DINO/DINO_4scale.py`` with every known key of ``args``.

    Keys of the reference's run arguments that this code base does not have (``modelname``, ``two_stage_type``,
    ...) and values whose type does not fit the key are left out; ``options`` are applied last.
    """
    values = load_config(KNOWN_KEYS_FILE).to_dict()
    values.update({key: value for key, value in vars(args).items() if value_fits(key, value)})
    cfg = config_from_dict(values, source=source)
    if options:
        cfg = load_config_values(cfg.to_dict(), options, source)
    return cfg


def load_config_values(values: dict, options: Mapping[str, Any], source: str):
    """``values`` (a full config dict) with ``options`` applied, validated like a config file."""
    return config_from_dict({**values, **dict(options)}, source=f'{source} with options {dict(options)}')


def config_for_checkpoint(checkpoint: dict, checkpoint_path: str, config: Union[str, os.PathLike, None] = None,
                          options: Optional[Mapping[str, Any]] = None):
    """The model config of a checkpoint: the file ``config`` when given, else the one saved in the checkpoint
    (``'config'`` of ``main.py``, or the reference's ``'args'``), with ``options`` (key -> value) on top."""
    options = dict(options or {})
    if config is not None:
        return load_config(config, options)
    saved = checkpoint.get('config')
    if isinstance(saved, dict):
        return load_config_values(saved, options, f'config saved in {checkpoint_path}')
    if isinstance(checkpoint.get('args'), argparse.Namespace):
        return config_from_reference_args(checkpoint['args'], options, f'args saved in {checkpoint_path}')
    raise CheckpointError(f'checkpoint {checkpoint_path!r} holds no config: pass the config it was trained with '
                          '(config=... / -c CONFIG)')


def load_model(cfg, state_dict: dict, checkpoint_path: str, device: torch.device):
    """``(model in eval mode on device, postprocess)`` with the checkpoint's weights; a mismatch is an error."""
    from models import build_model
    model, _, postprocessors = build_model(cfg)
    try:
        model.load_state_dict(strip_module_prefix(state_dict), strict=True)
    except RuntimeError as e:
        first = ' '.join(str(e).strip().splitlines()[:2])[:300]
        raise CheckpointError(f'checkpoint {checkpoint_path!r} does not fit the model of the config ({first}); '
                              'pass the config it was trained with, or none to use its saved one') from None
    return model.to(device).eval(), postprocessors['bbox']


# ------------------------------------------------------------------------------------------------ inputs

def _array_to_pil(array: np.ndarray, what: str) -> PIL.Image.Image:
    """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8 / float-in-[0, 1] array -> RGB PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise UsageError(f'{what}: an image array must be (H, W), (H, W, 1) or (H, W, 3), got shape '
                         f'{tuple(array.shape)}')
    if array.dtype.kind == 'f':
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise UsageError(f'{what}: image arrays must be uint8 (0..255) or float in [0, 1], got {array.dtype}')
    image = PIL.Image.fromarray(np.ascontiguousarray(array))
    return image.convert('RGB')


def to_pil(image: ImageInput, what: str, bit_depth: BitDepthRule = DEFAULT_BIT_DEPTH) -> PIL.Image.Image:
    """One input image (path, PIL image, array or tensor; see the module docstring) as an RGB PIL image.

    Files and PIL images follow the data sets' reading rule (``datasets/images.py``: EXIF orientation for files,
    images wider than 8 bits mapped to 0..255 by ``bit_depth``, any channel layout to RGB).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image), bit_depth)
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image, bit_depth)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 3:
            if tensor.shape[0] not in (1, 3):
                raise UsageError(f'{what}: an image tensor must be (H, W), (1, H, W) or (3, H, W) (channels '
                                 f'first), got shape {tuple(tensor.shape)}')
            tensor = tensor.permute(1, 2, 0)
        return _array_to_pil(tensor.numpy(), what)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, what)
    raise UsageError(f'{what}: expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}')


def _as_batch(rgb, ir) -> tuple[list, list, bool]:
    """``(rgb list, ir list, batched)``: single inputs become one-element lists."""
    rgb_is_list, ir_is_list = isinstance(rgb, (list, tuple)), isinstance(ir, (list, tuple))
    if rgb_is_list != ir_is_list:
        raise UsageError('predict: give rgb and ir both as single images or both as lists of the same length')
    if not rgb_is_list:
        return [rgb], [ir], False
    if len(rgb) != len(ir):
        raise UsageError(f'predict: {len(rgb)} RGB images but {len(ir)} thermal images; the lists pair up '
                         'element by element')
    if not rgb:
        raise UsageError('predict: the lists of images are empty')
    return list(rgb), list(ir), True


def missing_summary(missing: Sequence[Optional[str]]) -> Optional[str]:
    """The one warning for a batch whose ``missing`` entries name the missing modality per pair (None: none)."""
    counts = {m: sum(1 for x in missing if x == m) for m in MODALITIES}
    parts = [f'{counts[m]} of {len(missing)} pair(s) without their {"RGB" if m == "rgb" else "thermal"} image'
             for m in MODALITIES if counts[m]]
    if not parts:
        return None
    return ('predicting ' + ' and '.join(parts) + ': the missing image is replaced by the mean image (zero after '
            'normalisation); expect fewer detections of objects that only it shows')


# ---------------------------------------------------------------------------------------------- detector

class Detector:
    """A CAFF-DINO in eval mode with its preprocessing and post-processing.

    Args:
        model: the detector (``models.build_model``), on ``device``, in eval mode.
        postprocess: its ``PostProcess`` (top ``num_select``).
        transform: the paired evaluation transform (``datasets.transforms.make_eval_transforms``).
        device: where the model runs.
        class_names: ``{label: name}``; labels without a name are reported as their number.
        config: the config the model was built from (kept for reference, e.g. by ``tools/export_onnx.py``).
    """

    def __init__(self, model: torch.nn.Module, postprocess, transform, device: torch.device,
                 class_names: Optional[Mapping[int, str]] = None, config=None):
        self.model = model
        self.postprocess = postprocess
        self.transform = transform
        self.device = device
        self.class_names = dict(class_names or {})
        self.config = config
        self.bit_depth = (BitDepthRule(config.high_bit_depth_rule, config.high_bit_depth_limits)
                          if config is not None else DEFAULT_BIT_DEPTH)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], config: Union[str, os.PathLike, None] = None,
                        device: str = 'auto', options: Optional[Mapping[str, Any]] = None,
                        class_names: Optional[Mapping[int, str]] = None, allow_unsafe: bool = False) -> 'Detector':
        """Load a checkpoint of ``main.py`` (or of the reference) weights-only.

        Args:
            path: the checkpoint file.
            config: a config file; None takes the config saved in the checkpoint.
            device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.
            options: config keys to override, e.g. ``{'eval_size': 640}``.
            class_names: ``{label: name}``; default: the categories of the config's annotation file when it is on
                disk, else none.
            allow_unsafe: unpickle more than tensors and plain values (only for files you trust).
        Raises:
            CheckpointError / ConfigError (``UserError``s) naming the file at fault.
        """
        path = os.fspath(path)
        checkpoint = load_checkpoint(path, allow_unsafe)
        cfg = config_for_checkpoint(checkpoint, path, config, options)
        return cls.from_config(cfg, checkpoint['model'], device, class_names, source=path)

    @classmethod
    def from_config(cls, cfg, state_dict: Optional[dict] = None, device: str = 'auto',
                    class_names: Optional[Mapping[int, str]] = None, source: str = 'weights') -> 'Detector':
        """A detector for a loaded config; ``state_dict=None`` keeps the random initialisation (for timing)."""
        torch_device = resolve_device(device)
        if state_dict is None:
            from models import build_model
            model, _, postprocessors = build_model(cfg)
            model, postprocess = model.to(torch_device).eval(), postprocessors['bbox']
        else:
            model, postprocess = load_model(cfg, state_dict, source, torch_device)
        names = dict(class_names) if class_names is not None else config_categories(cfg)
        return cls(model, postprocess, make_eval_transforms(cfg.eval_size, cfg.eval_max_size), torch_device,
                   names, cfg)

    def preprocess(self, rgb: Optional[PIL.Image.Image], ir: Optional[PIL.Image.Image]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation transform of one pair: two normalised ``(3, h, w)`` tensors; a missing image (None) is
        :func:`datasets.transforms.missing_image` of its partner's size."""
        if rgb is None and ir is None:
            raise UsageError('predict: both images of a pair are missing; give at least one')
        if rgb is not None and ir is not None and rgb.size != ir.size:
            raise BadPairError(f'predict: the RGB image is {rgb.width}x{rgb.height} but the thermal image is '
                               f'{ir.width}x{ir.height} (WxH); the pair must be registered to one size')
        present = rgb if rgb is not None else ir
        rgb_t, ir_t, _ = self.transform(present if rgb is None else rgb, present if ir is None else ir, {})
        if rgb is None:
            rgb_t = missing_image(rgb_t)
        if ir is None:
            ir_t = missing_image(ir_t)
        return rgb_t, ir_t

    @torch.no_grad()
    def _detect(self, pairs: list[tuple[Optional[PIL.Image.Image], Optional[PIL.Image.Image]]]) -> list[dict]:
        """PostProcess output per pair (``num_select`` detections, xyxy pixels of the original image), on the CPU."""
        samples = [(*self.preprocess(rgb, ir), {}) for rgb, ir in pairs]
        samples_rgb, samples_ir, _ = collate_fn(samples)
        outputs = self.model(samples_rgb.to(self.device), samples_ir.to(self.device))
        present = [ir if ir is not None else rgb for rgb, ir in pairs]
        sizes = torch.tensor([[image.height, image.width] for image in present], device=self.device)
        return [{k: v.cpu() for k, v in r.items()} for r in self.postprocess(outputs, sizes)]

    def predict(self, rgb: Union[ImageInput, Sequence[ImageInput]], ir: Union[ImageInput, Sequence[ImageInput]],
                score_threshold: float = 0.3, batch_size: int = 8) -> Union[dict, list[dict]]:
        """Detect objects in one pair or a batch of pairs (see the module docstring for inputs and outputs).

        Args:
            rgb, ir: one image each, or two lists of the same length; None for a missing image.
            score_threshold: keep detections with score >= this (0 keeps all ``num_select``).
            batch_size: pairs per forward pass for lists (images of different sizes are zero-padded together, as
                in training; padding changes the detections slightly, ``batch_size=1`` avoids it).
        Returns:
            a dict for a single pair, a list of dicts for lists.
        """
        if batch_size < 1:
            raise UsageError(f'predict: batch_size must be >= 1, got {batch_size}')
        rgbs, irs, batched = _as_batch(rgb, ir)
        for i, (r, t) in enumerate(zip(rgbs, irs)):
            if r is None and t is None:
                raise UsageError(f'predict: both images of pair {i} are missing; give at least one of them')
        pairs = [(None if r is None else to_pil(r, f'rgb[{i}]' if batched else 'rgb', self.bit_depth),
                  None if t is None else to_pil(t, f'ir[{i}]' if batched else 'ir', self.bit_depth))
                 for i, (r, t) in enumerate(zip(rgbs, irs))]
        warning = missing_summary(['rgb' if r is None else 'ir' if t is None else None for r, t in pairs])
        if warning is not None:
            warnings.warn(warning, MissingModalityWarning, stacklevel=2)
        results = []
        for start in range(0, len(pairs), batch_size):
            for detections in self._detect(pairs[start:start + batch_size]):
                results.append(self._named(detections, score_threshold))
        return results if batched else results[0]

    def _named(self, detections: dict, score_threshold: float) -> dict:
        keep = detections['scores'] >= score_threshold
        out = {k: detections[k][keep] for k in ('boxes', 'scores', 'labels')}
        out['names'] = [self.class_names.get(label, str(label)) for label in out['labels'].tolist()]
        return out

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f'Detector({name} on {self.device}, {len(self.class_names)} named classes)'

