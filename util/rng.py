"""The random generators of a process: seeding them, and capturing / restoring their states for ``--resume``.

Python's ``random``, NumPy's legacy global generator, torch's CPU generator and the CUDA generator of the run's
device are the generators the data pipeline (augmentation, sampler order) and the model (DN noise, dropout)
draw from. Not in the reference, which seeds once and saves no generator state, so its resumed runs draw other
numbers than an uninterrupted run. States are tensors and plain values, so a checkpoint holding them still
loads with ``torch.load(weights_only=True)``.
"""
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python's `random`, NumPy and torch (CPU and every CUDA device). Add the rank for per-process seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device) -> dict:
    """This process's generator states, as tensors and plain values (loadable with ``weights_only=True``).

    ``{'python': {'version', 'state': int64[625], 'gauss_next'}, 'numpy': {'keys': int64[624], 'pos',
    'has_gauss', 'cached_gaussian'}, 'torch': uint8[N], 'cuda': uint8[M] or None}``; ``'cuda'`` is the state of
    ``device`` when it is a CUDA device. Raises ValueError for a NumPy generator other than MT19937.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    if kind != 'MT19937':
        raise ValueError(f'numpy random generator {kind!r} cannot be saved; only MT19937 is supported')
    return {
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64), 'gauss_next': gauss_next},
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set this process's generators to ``state`` (from :func:`capture_rng_state`); the CUDA state is set only
    when both it and ``device`` are CUDA (a CPU run resumed on a GPU keeps the seeded CUDA generator)."""
    python = state['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss_next']))
    numpy_state = state['numpy']
    np.random.set_state(('MT19937', numpy_state['keys'].numpy().astype(np.uint32), numpy_state['pos'],
                         numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None and device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)
