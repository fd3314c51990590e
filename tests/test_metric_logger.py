import logging

import pytest
import torch

from util.metric_logger import MetricLogger, SmoothedValue


def test_smoothed_value_window_and_global_statistics():
    meter = SmoothedValue(window_size=3)
    for value in [10.0, 1.0, 2.0, 6.0]:
        meter.update(value)
    assert meter.value == 6.0 and meter.max == 6.0  # window holds [1, 2, 6]
    assert meter.median == 2.0 and meter.avg == pytest.approx(3.0)
    assert meter.global_avg == pytest.approx(19.0 / 4)
    meter.update(4.0, n=4)
    assert meter.global_avg == pytest.approx((19.0 + 16.0) / 8)
    meter.synchronize_between_processes()  # single process: unchanged
    assert meter.count == 8
    assert str(SmoothedValue(fmt='{value:.1f}')) == 'n/a'


def test_metric_logger_update_and_str():
    metrics = MetricLogger(delimiter=' | ')
    metrics.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metrics.update(loss=torch.tensor(2.0), lr=1e-4, skipped=None)
    metrics.update(loss=4)
    assert metrics.loss.global_avg == 3.0 and 'skipped' not in metrics.meters
    assert str(metrics) == 'lr: 0.000100 | loss: 2.0000 (3.0000)'  # torch.median of [2, 4] is the lower one
    with pytest.raises(AttributeError, match="no meter or attribute 'acc'"):
        metrics.acc
    with pytest.raises(TypeError, match='loss'):
        metrics.update(loss='high')


def test_log_every_yields_all_items_and_prints_progress(capsys):
    metrics = MetricLogger()
    seen = []
    for item in metrics.log_every(list(range(7)), print_freq=3, header='Epoch: [0]'):
        seen.append(item)
        metrics.update(loss=float(item))
    lines = capsys.readouterr().out.strip().splitlines()
    assert seen == list(range(7))
    assert [line.split()[2] for line in lines[:-1]] == ['[0/7]', '[3/7]', '[6/7]']
    assert all('eta:' in line and 'time:' in line and 'data:' in line and 'loss:' in line for line in lines[:-1])
    assert lines[-1].startswith('Epoch: [0] Total time:') and 's / it' in lines[-1]


def test_log_every_writes_to_logger_and_accepts_iterables_without_len(caplog):
    logger = logging.getLogger('caff_dino_test_metrics')
    with caplog.at_level(logging.INFO, logger='caff_dino_test_metrics'):
        items = list(MetricLogger().log_every((i for i in range(3)), print_freq=2, header='Test:', logger=logger))
    assert items == [0, 1, 2]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3 and messages[0].startswith('Test:  [0]') and 'eta' not in messages[0]
    assert messages[-1].startswith('Test: Total time:')
