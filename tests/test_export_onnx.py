"""tools/export_onnx.py: the export wrapper, the set matching, the size constraint, and (slow) a real export of
config/DINO/CAFF_tiny.py checked with onnxruntime at two input sizes."""
import json

import pytest
import torch

from models import build_model
from tools import export_onnx
from util.box_ops import box_cxcywh_to_xyxy
from util.checkpoint import save_checkpoint
from util.config import load_config


@pytest.fixture(scope='module')
def tiny(repo_root):
    cfg = load_config(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', {'msda_backend': 'pytorch'})
    torch.manual_seed(0)
    model, _, postprocessors = build_model(cfg)
    return cfg, model.eval(), postprocessors['bbox']


def test_matched_fraction_compares_rows_as_sets():
    rows = torch.rand(10, 7, dtype=torch.float64)
    shuffled = rows[torch.randperm(10)]
    assert export_onnx.matched_fraction(rows, shuffled) == 1.0
    nudged = shuffled.clone()
    nudged[3, 5] += 2e-3  # one row off by more than the tolerance in one coordinate
    assert export_onnx.matched_fraction(rows, nudged) == pytest.approx(0.9)
    nudged[3, 5] -= 1.5e-3  # now within 1e-3
    assert export_onnx.matched_fraction(rows, nudged) == 1.0
    assert export_onnx.matched_fraction(rows, rows[:0]) == 0.0
    assert export_onnx.matched_fraction(rows[:0], rows) == 1.0


@pytest.mark.slow
def test_minimum_side_is_the_largest_kernel_on_the_coarsest_level(tiny, repo_root):
    _, model, _ = tiny
    assert export_onnx.minimum_side(model) == 6 * 64 + 1  # kernel 7 on the stride-64 level
    for options, expected in (({'caff_kernel_sizes': [1, 3, 5]}, 4 * 64 + 1), ({'num_feature_levels': 3}, 6 * 32 + 1),
                              ({'fusion_type': 'concat'}, 1)):
        cfg = load_config(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py', options)
        with torch.device('meta'):
            other, _, _ = build_model(cfg)
        assert export_onnx.minimum_side(other) == expected, options
    # the coarsest map of a 385-px side is ceil(385 / 64) = 7 px (the kernel fits), of a 384-px side 6 px
    samples = export_onnx.NestedTensor(torch.zeros(1, 3, 385, 384), torch.zeros(1, 385, 384, dtype=torch.bool))
    with torch.no_grad():
        srcs, _, _ = model._stream(model.backbone_visible, model.input_proj, samples)
    assert tuple(srcs[-1].shape[-2:]) == (7, 6)


@pytest.mark.slow
def test_wrapper_returns_the_models_outputs_and_top_k_in_input_pixels(tiny):
    cfg, model, postprocess = tiny
    rgb, ir = torch.randn(1, 3, 96, 128), torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = model([rgb[0]], [ir[0]])
        logits, boxes, scores, labels, xyxy = export_onnx.OnnxExportModel(model, postprocess)(rgb, ir)
    torch.testing.assert_close(logits, expected['pred_logits'])
    torch.testing.assert_close(boxes, expected['pred_boxes'])
    # top-k over queries x classes, computed here directly
    flat = expected['pred_logits'][0].sigmoid().flatten()
    top = flat.topk(cfg.num_select)
    torch.testing.assert_close(scores[0], top.values)
    assert labels[0].tolist() == (top.indices % cfg.num_classes).tolist()
    chosen = box_cxcywh_to_xyxy(expected['pred_boxes'][0][top.indices // cfg.num_classes])
    torch.testing.assert_close(xyxy[0], chosen * torch.tensor([128.0, 96.0, 128.0, 96.0]))


@pytest.mark.slow
def test_size_below_the_constraint_is_a_one_line_error(tmp_path, capsys, repo_root):
    argv = ['-c', str(repo_root / 'config' / 'DINO' / 'CAFF_tiny.py'), '--out', str(tmp_path / 'm.onnx'),
            '--height', '384', '--width', '512']
    assert export_onnx.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '384x512' in err and '385 px' in err
    assert export_onnx.main(argv[:-4] + ['--height', '416', '--width', '448', '--check-size', '400x300']) == 2
    assert '--check-size 400x300' in capsys.readouterr().err
    assert not (tmp_path / 'm.onnx').exists()


@pytest.mark.slow
def test_export_matches_pytorch_in_onnxruntime_at_two_sizes(tiny, tmp_path, capsys, repo_root):
    """CAFF_tiny (random weights, saved as main.py saves them) exported at 416x448 with --postprocess; the tool
    checks it at 416x448 and 512x640; here the file is also run at a third size against the PyTorch model."""
    import onnx
    import onnxruntime
    cfg, model, _ = tiny
    checkpoint = tmp_path / 'checkpoint.pth'
    save_checkpoint({'model': model.state_dict(), 'config': cfg.to_dict()}, str(checkpoint))
    out = tmp_path / 'caff_tiny.onnx'
    argv = ['--checkpoint', str(checkpoint), '--out', str(out), '--height', '416', '--width', '448',
            '--check-size', '512x640', '--postprocess', '--threads', str(torch.get_num_threads())]
    report = export_onnx.run(export_onnx.get_args_parser().parse_args(argv))
    assert [row['size'] for row in report['parity']] == ['416x448', '512x640']
    for row in report['parity']:
        assert row['queries'] >= 0.97 and row['detections'] >= 0.97, row
    assert '% of the queries matched' in capsys.readouterr().out

    graph = onnx.load(str(out))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert inputs == {'rgb': [1, 3, 'height', 'width'], 'ir': [1, 3, 'height', 'width']}
    assert [o.name for o in graph.graph.output] == ['pred_logits', 'pred_boxes', 'scores', 'labels', 'boxes']
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata['caff_dino.min_side'] == '385' and json.loads(metadata['caff_dino.std'])[0] == 0.229

    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    rgb, ir = torch.randn(1, 3, 400, 520), torch.randn(1, 3, 400, 520)
    logits, boxes, *_ = session.run(None, {'rgb': rgb.numpy(), 'ir': ir.numpy()})
    with export_onnx.msda_backend(model, 'pytorch'), torch.no_grad():
        expected = model([rgb[0]], [ir[0]])
    rows = export_onnx._query_rows(expected['pred_logits'], expected['pred_boxes'])
    got = export_onnx._query_rows(torch.from_numpy(logits), torch.from_numpy(boxes))
    assert export_onnx.matched_fraction(rows, got) >= 0.97


def test_timing_rounds_interleave_the_runs():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b', 'c')}
    medians = export_onnx._interleaved_medians(runs, repeats=2)
    assert calls == ['a', 'b', 'c'] * 3  # one warm-up round, then two timed rounds, each calling every run once
    assert set(medians) == {'a', 'b', 'c'} and all(v >= 0 for v in medians.values())
