"""util/tensorboard_logger.py: main.py with tensorboard=True writes event files that read back to what log.txt
holds; without the package the run goes on and says so once."""
import json
import logging
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from datasets.synthetic import generate_synthetic_dataset
from util import tensorboard_logger

REPO = Path(__file__).resolve().parents[1]


def _train(tmp_path, run_options: list[str], *options, epochs: int = 2) -> Path:
    data = tmp_path / 'data'
    generate_synthetic_dataset(str(data), num_train=2, num_val=2, width=128, height=96)
    out = tmp_path / 'run'
    argv = ['-c', str(REPO / 'config' / 'DINO' / 'CAFF_tiny.py'), '--coco_path', str(data), '--output_dir', str(out),
            '--options', *run_options, f'epochs={epochs}', *options]
    assert main.main(argv) == 0
    return out


@pytest.mark.slow
def test_event_files_hold_iteration_losses_lr_and_epoch_metrics(tmp_path, tiny_run_options):
    out = _train(tmp_path, tiny_run_options, 'tensorboard=True', 'batch_size=1')
    assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
    events = EventAccumulator(str(out / 'tensorboard'), size_guidance={'scalars': 0, 'tensors': 0}).Reload()
    scalars = set(events.Tags()['scalars'])
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]

    # per iteration: 2 training pairs / batch 1 = 2 steps per epoch, numbered on across epochs
    loss = events.Scalars('train_iter/loss')
    assert [e.step for e in loss] == [0, 1, 2, 3]
    for epoch in (0, 1):  # the epoch average of log.txt is the mean of that epoch's iterations
        values = [e.value for e in loss if e.step // 2 == epoch]
        assert sum(values) / 2 == pytest.approx(log[epoch]['train_loss'], rel=1e-5)
    assert {'train_iter/loss_ce', 'train_iter/loss_bbox', 'train_iter/loss_giou', 'train_iter/lr'} <= scalars
    assert events.Scalars('train_iter/lr')[0].value == pytest.approx(log[0]['train_lr'])

    # per epoch: the 12 COCO numbers, the training averages and the per-class table
    for epoch in (0, 1):
        assert events.Scalars('val/AP')[epoch].value == pytest.approx(log[epoch]['test_coco_eval_bbox'][0], abs=1e-6)
        assert events.Scalars('val/AP50')[epoch].value == pytest.approx(log[epoch]['test_coco_eval_bbox'][1],
                                                                        abs=1e-6)
    assert [e.step for e in events.Scalars('train/loss_ce')] == [0, 1]
    per_class = log[1]['test_coco_eval_per_class']  # the classes present in the validation split
    assert per_class
    text = events.Tensors('val/per_class_AP/text_summary')[1].tensor_proto.string_val[0].decode()
    for name, (ap, ap50) in per_class.items():
        assert events.Scalars(f'val_per_class/AP/{name}')[1].value == pytest.approx(ap, abs=1e-6)
        assert events.Scalars(f'val_per_class/AP50/{name}')[1].value == pytest.approx(ap50, abs=1e-6)
        assert f'| {name} |' in text


@pytest.mark.slow
def test_without_the_package_the_run_goes_on_and_says_so_once(tmp_path, monkeypatch, tiny_run_options):
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # `import tensorboard` raises ImportError
    monkeypatch.setattr(tensorboard_logger, '_warned_missing', False)
    out = _train(tmp_path, tiny_run_options, 'tensorboard=True', epochs=1)
    assert not (out / 'tensorboard').exists()
    assert len((out / 'log.txt').read_text().splitlines()) == 1
    assert (out / 'info.txt').read_text().count('tensorboard package is not installed') == 1

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger('caff_dino').addHandler(handler)
    try:  # a second logger in the same process says nothing more
        assert tensorboard_logger.make_tensorboard_logger(True, str(tmp_path / 'again')) is None
    finally:
        logging.getLogger('caff_dino').removeHandler(handler)
    assert not messages and not (tmp_path / 'again').exists()
