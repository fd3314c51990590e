"""The torch device a run uses, from the config's ``device`` key ('auto', 'cpu', 'cuda', 'cuda:N'), and the CPU's
float mode (``flush_denormal``)."""
import torch

from util.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """``'auto'`` is CUDA when available, else the CPU; any other name must be a device this machine has."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'device {name!r} requested but CUDA is not available; use --device cpu')
    return device


def set_flush_denormal(on: bool) -> bool:
    """Subnormal floats (|x| < 1.2e-38 in float32) read and produced as 0 on the CPU (x86 FTZ + DAZ), or not.

    x86 cores take 10-100x longer on subnormal operands; a trained model's gradients hold many, so without this a
    CPU training step slows down as training goes on (the demo's: 1.28 s instead of 0.50 s after 10 epochs).
    ``torch.set_flush_denormal`` sets the calling thread's MXCSR only; threads inherit it when they start, so this
    reaches torch's intra-op (OpenMP) threads only when called before the first parallel kernel starts them:
    ``main.py`` calls it first. Returns whether the CPU supports it (False: nothing changed).
    """
    return torch.set_flush_denormal(on)
