"""util/rng.py: seeding repeats every generator; captured states restore them exactly, through a weights-only file."""
import random

import numpy as np
import torch

from util.checkpoint import save_checkpoint
from util.rng import capture_rng_state, restore_rng_state, seed_everything


def test_seed_everything_repeats_all_generators():
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in both Python and NumPy states
    np.random.standard_normal()
    path = str(tmp_path / 'checkpoint.pth')
    save_checkpoint({'model': {}, 'rng_state': [capture_rng_state(torch.device('cpu'))]}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    seed_everything(0)
    (state,) = torch.load(path, weights_only=True)['rng_state']
    restore_rng_state(state, torch.device('cpu'))
    again = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert again[:2] == expected[:2] and np.array_equal(again[2], expected[2]) and again[3] == expected[3]
    assert torch.equal(again[4], expected[4])
