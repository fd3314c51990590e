"""Tests for tools/profile_fusion.py on the tiny config: counted FLOPs equal the hand count, the table is complete,
and the one part-timer (also used by tools/benchmark.py) sums each group's calls per forward."""
import time

import pytest
import torch

from tools.profile_fusion import PartTimer, count_flops, markdown_table, time_parts


def caff_level_macs(channels, height, width, kernels=(1, 5, 7), stages=2, proj=64):
    """Multiply-adds of one CAFF level (maps at least as large as every kernel), from docs/REFERENCE.md §1."""
    per_stage = 3 * channels * channels * height * width  # compression 3C -> C
    for k in kernels:
        h, w = height - k + 1, width - k + 1
        per_stage += 3 * channels * channels * k * k * h * w  # q, k, v convs
        per_stage += 2 * channels * h * h * w  # q k^T and A v, per channel over rows
    return stages * per_stage + channels * proj * height * width


@pytest.fixture
def tiny(tiny_cfg):
    tiny_cfg.msda_backend = 'pytorch'
    return tiny_cfg


@pytest.mark.slow
def test_counted_flops_match_the_hand_count(tiny):
    per_part, total, shapes = count_flops(tiny, 128, 128)
    channels, proj = tiny.hidden_dim, tiny.caff_proj_dim
    assert shapes == {0: (16, 16), 1: (8, 8), 2: (4, 4), 3: (2, 2)}
    assert per_part['conv_corr.0'] == 2 * caff_level_macs(channels, 16, 16, proj=proj)
    assert per_part['conv_corr.1'] == 2 * caff_level_macs(channels, 8, 8, proj=proj)
    assert per_part['redim_corr.0'] == 2 * (2 * channels + proj) * channels * 16 * 16
    assert sum(per_part.values()) < total


@pytest.mark.slow
def test_timing_and_table_cover_every_part(tiny):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_part_time, total_time = time_parts(tiny, 64, 64, repeats=1)
    finally:
        torch.set_num_threads(previous)
    assert set(per_part_time) == {'backbone_visible', 'backbone_ir', 'transformer'} | {
        f'{name}.{level}' for name in ('conv_corr', 'redim_corr') for level in range(4)}
    assert 0 < sum(per_part_time.values()) <= total_time
    flops, total_flops, shapes = count_flops(tiny, 64, 64)
    table = markdown_table(flops, total_flops, shapes, per_part_time, total_time)
    assert table.count('| fusion level ') == 4 and '**whole model**' in table


class Sleeper(torch.nn.Module):
    """Takes ``seconds`` of wall time per call and returns its input."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_part_timer_sums_each_group_per_forward_and_clears():
    a, b, c = Sleeper(0.06), Sleeper(0.03), Sleeper(0.0)
    timer = PartTimer({'ab': [a, b], 'c': [c]})
    x = torch.zeros(1)
    a(b(a(x)))  # one "forward": a twice, b once = 0.15 s of sleep
    c(x)
    first = timer.take()
    # at least every call's sleep (fewer calls: <= 0.09 s), and below any double count (>= 0.3 s); the margin
    # absorbs late wake-ups on a loaded machine
    assert 0.15 <= first['ab'] < 0.3
    assert 0 <= first['c'] < first['ab']
    assert timer.take() == {'ab': 0.0, 'c': 0.0}, 'take() clears the record'
    timer.remove()
    a(x)
    assert timer.take() == {'ab': 0.0, 'c': 0.0}, 'removed hooks record nothing'


def test_part_timer_reads_the_clock_it_is_given():
    ticks = iter([10.0, 10.5, 20.0, 22.0])  # a's pre/post, then c's: 0.5 s and 2 s on the given clock
    a, c = Sleeper(0.0), Sleeper(0.0)
    timer = PartTimer({'a': [a], 'c': [c]}, clock=lambda: next(ticks))
    a(torch.zeros(1))
    c(torch.zeros(1))
    assert timer.take() == {'a': 0.5, 'c': 2.0}
    timer.remove()
