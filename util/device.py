"""The torch device a run uses, from the config's ``device`` key ('auto', 'cpu', 'cuda', 'cuda:N')."""
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
