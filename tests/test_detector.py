"""tools/detector.py: Detector on a tiny random-weight CAFF-DINO and a few 160 x 120 synthetic pairs.

The eval size (96, long side <= 160) is below the file size, so every box has to be mapped back to the file's
pixels; the reference for that is the evaluation loop (``engine.evaluate``) on the same pairs.
"""
import argparse
import copy
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import build_dataset
from datasets.synthetic import generate_synthetic_dataset
from engine import evaluate
from models import build_model
from datasets.transforms import missing_image
from tools.detector import Detector, MissingModalityWarning
from util.checkpoint import CheckpointError, save_checkpoint
from util.config import load_config
from util.errors import UsageError
from util.misc import collate_fn

WIDTH, HEIGHT = 160, 120


@pytest.fixture(scope='module')
def workspace(tiny_model_options, tmp_path_factory, repo_root):
    """Synthetic data (1 train / 3 val pairs, 160 x 120), the model, and a checkpoint saved as main.py saves one."""
    root = tmp_path_factory.mktemp('detector')
    data = root / 'data'
    generate_synthetic_dataset(str(data), num_train=1, num_val=3, width=WIDTH, height=HEIGHT)
    cfg = load_config(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', {**tiny_model_options, 'coco_path': str(data)})
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(cfg)
    checkpoint = root / 'checkpoint.pth'
    save_checkpoint({'model': model.state_dict(), 'config': cfg.to_dict(), 'epoch': 0}, str(checkpoint))
    return {'root': root, 'data': data, 'cfg': cfg, 'checkpoint': checkpoint, 'model': model.eval(),
            'criterion': criterion, 'postprocessors': postprocessors,
            'detector': Detector.from_checkpoint(checkpoint, device='cpu')}


def _pair(workspace, index=1, split='test'):
    data = workspace['data']
    return (str(data / 'visible' / split / f'{index:06d}.png'), str(data / 'infrared' / split / f'{index:06d}.png'))


def _assert_same(a: dict, b: dict, atol=1e-4):
    assert a['labels'].tolist() == b['labels'].tolist()
    torch.testing.assert_close(a['scores'], b['scores'], atol=atol, rtol=0)
    torch.testing.assert_close(a['boxes'], b['boxes'], atol=atol * 100, rtol=0)


@pytest.mark.slow
def test_boxes_are_the_evaluation_loops_detections_in_original_pixels(workspace, tmp_path):
    cfg = workspace['cfg']
    dataset = build_dataset('val', cfg)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_fn)
    evaluate(workspace['model'], workspace['criterion'], workspace['postprocessors'], loader, dataset.coco,
             torch.device('cpu'), str(tmp_path))
    by_image: dict[int, list[dict]] = {}
    for row in json.loads((tmp_path / 'detections_bbox.json').read_text()):
        by_image.setdefault(row['image_id'], []).append(row)
    assert len(by_image) == 3
    for image_id, rows in by_image.items():
        info = dataset.coco.imgs[image_id]
        result = workspace['detector'].predict(os.path.join(dataset.rgb_dir, info['file_name']),
                                               os.path.join(dataset.ir_dir, info['file_name']), score_threshold=0.0)
        assert len(rows) == len(result['scores']) == cfg.num_select
        rows = sorted(rows, key=lambda r: -r['score'])
        assert [r['category_id'] for r in rows] == result['labels'].tolist()
        np.testing.assert_allclose([r['score'] for r in rows], result['scores'].numpy(), atol=1e-5)
        xywh = np.array([r['bbox'] for r in rows])
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.testing.assert_allclose(result['boxes'].numpy(), expected, atol=1e-3)


@pytest.mark.slow
def test_every_input_kind_gives_the_same_detections(workspace):
    det = workspace['detector']
    rgb_path, ir_path = _pair(workspace)
    reference = det.predict(rgb_path, ir_path, score_threshold=0.0)
    rgb_pil, ir_pil = PIL.Image.open(rgb_path), PIL.Image.open(ir_path)
    rgb_u8, ir_u8 = np.array(rgb_pil.convert('RGB')), np.array(ir_pil.convert('RGB'))
    kinds = {
        'pathlike': (Path(rgb_path), Path(ir_path)),
        'pil': (rgb_pil, ir_pil),
        'numpy uint8 HWC': (rgb_u8, ir_u8),
        'numpy float HWC': (rgb_u8 / 255.0, ir_u8.astype(np.float32) / 255.0),
        'numpy grey HW': (rgb_u8, ir_u8[..., 0]),
        'tensor uint8 CHW': (torch.from_numpy(rgb_u8).permute(2, 0, 1), torch.from_numpy(ir_u8).permute(2, 0, 1)),
        'tensor float CHW': (torch.from_numpy(rgb_u8).permute(2, 0, 1) / 255.0,
                             torch.from_numpy(ir_u8[..., :1]).permute(2, 0, 1).float() / 255.0),
    }
    # the synthetic thermal frame is grey, so its first channel alone is the same image
    assert (ir_u8[..., 0] == ir_u8[..., 1]).all()
    for kind, (rgb, ir) in kinds.items():
        result = det.predict(rgb, ir, score_threshold=0.0)
        _assert_same(result, reference)
        assert set(result) == {'boxes', 'scores', 'labels', 'names'}


@pytest.mark.slow
def test_lists_are_batched_and_give_one_dict_per_pair(workspace):
    det = workspace['detector']
    pairs = [_pair(workspace, i) for i in (1, 2, 3)]
    singles = [det.predict(rgb, ir, score_threshold=0.0) for rgb, ir in pairs]
    batched = det.predict([p[0] for p in pairs], [p[1] for p in pairs], score_threshold=0.0, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    for one, many in zip(singles, batched):  # same sizes: no padding, so batching changes nothing
        _assert_same(one, many)
    with pytest.raises(UsageError, match='2 RGB images but 1 thermal'):
        det.predict([pairs[0][0], pairs[1][0]], [pairs[0][1]])
    with pytest.raises(UsageError, match='both as single images or both as lists'):
        det.predict([pairs[0][0]], pairs[0][1])


@pytest.mark.slow
def test_threshold_and_names(workspace):
    det = workspace['detector']
    everything = det.predict(*_pair(workspace), score_threshold=0.0)
    threshold = float(everything['scores'][3])
    kept = det.predict(*_pair(workspace), score_threshold=threshold)
    assert len(kept['scores']) == int((everything['scores'] >= threshold).sum()) >= 4
    assert (kept['scores'] >= threshold).all()
    # names come from the categories of the config's annotation file (synthetic: 1 person, 2 car)
    names = {1: 'person', 2: 'car'}
    assert kept['names'] == [names.get(label, str(label)) for label in kept['labels'].tolist()]
    assert det.class_names == names


@pytest.mark.slow
def test_missing_image_is_the_blank_image_with_one_warning(workspace):
    det = workspace['detector']
    rgb_path, ir_path = _pair(workspace)
    with pytest.warns(MissingModalityWarning) as record:
        result = det.predict(rgb_path, None, score_threshold=0.0)
    assert len(record) == 1 and 'without their thermal image' in str(record[0].message)
    # independently: the eval transform of the RGB image, zeros for the thermal one, the model, top-k
    rgb_t, _ = det.preprocess(PIL.Image.open(rgb_path).convert('RGB'), PIL.Image.open(ir_path).convert('RGB'))
    with torch.no_grad():
        out = det.model([rgb_t], [torch.zeros_like(rgb_t)])
    expected = det.postprocess(out, torch.tensor([[HEIGHT, WIDTH]]))[0]
    _assert_same(result, expected)
    assert torch.equal(missing_image(rgb_t), torch.zeros_like(rgb_t))

    with pytest.warns(MissingModalityWarning) as record:
        batch = det.predict([None, rgb_path, rgb_path], [ir_path, ir_path, None], score_threshold=0.0)
    assert len(record) == 1
    message = str(record[0].message)
    assert '1 of 3 pair(s) without their RGB image' in message and '1 of 3 pair(s) without their thermal' in message
    _assert_same(batch[2], result)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a complete pair warns nothing
        det.predict(rgb_path, ir_path)
    with pytest.raises(UsageError, match='both images of pair 0 are missing'):
        det.predict(None, None)


def test_bad_inputs_are_user_errors(workspace):
    det = workspace['detector']
    rgb_path, ir_path = _pair(workspace)
    with pytest.raises(UsageError, match=r'rgb: an image array must be'):
        det.predict(np.zeros((4, 5, 2), np.uint8), ir_path)
    with pytest.raises(UsageError, match='uint8 .* or float'):
        det.predict(np.zeros((HEIGHT, WIDTH), np.int32), ir_path)
    with pytest.raises(UsageError, match='expected a path'):
        det.predict(3, ir_path)
    with pytest.raises(Exception, match='160x120 .* 80x60|must be registered'):
        det.predict(rgb_path, PIL.Image.new('RGB', (80, 60)))


@pytest.mark.slow
def test_reference_checkpoint_with_args_namespace_loads(workspace, tmp_path):
    """A checkpoint of the reference code: weights (DDP ``module.`` prefix) and an argparse.Namespace of its run
    arguments, with keys this code base does not know, and no 'config' entry."""
    cfg = workspace['cfg']
    state = {f'module.{k}': v for k, v in workspace['model'].state_dict().items()}
    values = {k: v for k, v in cfg.to_dict().items() if k not in ('fusion_type', 'msda_backend')}
    values.update(device='cuda', focal_alpha='not a float')  # a value whose type does not fit is ignored
    args = argparse.Namespace(**values, modelname='dino', two_stage_type='standard', decoder_sa_type='sa')
    path = tmp_path / 'checkpoint_best_regular.pth'
    torch.save({'model': state, 'optimizer': {}, 'epoch': 11, 'args': args}, path)
    det = Detector.from_checkpoint(path, device='cpu')
    assert det.config.hidden_dim == 32 and det.config.num_select == cfg.num_select  # from args
    assert det.config.focal_alpha == 0.25  # the default where the value is unusable
    rgb_path, ir_path = _pair(workspace)
    expected = workspace['detector'].predict(rgb_path, ir_path, score_threshold=0.0)
    result = det.predict(rgb_path, ir_path, score_threshold=0.0)
    _assert_same({k: v[:len(expected['scores'])] for k, v in result.items() if k != 'names'}, expected)


@pytest.mark.slow
def test_checkpoint_errors(tiny_model_options, workspace, tmp_path, repo_root):
    with pytest.raises(CheckpointError, match='does not fit the model'):
        Detector.from_checkpoint(workspace['checkpoint'], repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', 'cpu')
    bare = tmp_path / 'bare.pth'
    torch.save(workspace['model'].state_dict(), bare)
    with pytest.raises(CheckpointError, match='holds no config'):
        Detector.from_checkpoint(bare, device='cpu')
    det = Detector.from_checkpoint(bare, repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', 'cpu',
                                   options={k: v for k, v in tiny_model_options.items()})
    assert det.config.num_select == tiny_model_options['num_select']


def _readme_example(repo_root) -> str:
    text = (repo_root / 'README.md').read_text()
    match = re.search(r'<!-- detector-example -->\s*```python\n(.*?)```', text, re.S)
    assert match, 'README.md has no python block after <!-- detector-example -->'
    return match.group(1)


@pytest.mark.slow
def test_readme_example_runs(tiny_model_options, workspace, tmp_path, monkeypatch, capsys, repo_root):
    code = _readme_example(repo_root)
    assert len(code.strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    generate_synthetic_dataset('data/synthetic_llvip', num_train=1, num_val=1, width=WIDTH, height=HEIGHT)
    # coco_path is CAFF_tiny.py's data/synthetic_llvip
    cfg = load_config(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', tiny_model_options)
    model = copy.deepcopy(workspace['model'])
    with torch.no_grad():  # a confident 'person' head (shared by every decoder layer), so that scores pass 0.3
        model.class_embed[-1].bias[1] = 3.0
    save_checkpoint({'model': model.state_dict(), 'config': cfg.to_dict()},
                    'outputs/caff_demo/checkpoint_best_ema.pth')
    exec(compile(code, 'README.md', 'exec'), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines, 'the example printed nothing'
    for line in lines:
        name, score, *box = line.replace('[', ' ').replace(']', ' ').replace(',', ' ').split()
        assert name in ('person', 'car') and float(score) >= 0.3 and len(box) == 4
