"""Checkpoint files: atomic saves, safe loads, and partial loading of a state dict into a model.

The file side of what CAFF-DINO's ``main.py`` does inline (``torch.save`` / ``torch.load``, the state-dict part
of ``--pretrain_model_*`` and ``--finetune_ignore``). What is in a training checkpoint and how ``--resume`` reads
it is ``util/training_checkpoint.py``; how pretrained weights initialise a CAFF-DINO is ``models/pretrained.py``.
What differs from the reference:
- Saves are atomic: the file is written next to its target, fsync'ed, then renamed over it, so a crash mid-save
  (kill -9, full disk) leaves the previous checkpoint intact. The reference writes in place. A save that fails
  (full disk, no permission) is a ``CheckpointError`` naming the file.
- Loads use ``torch.load(weights_only=True)`` with an allow-list (``argparse.Namespace``, which the released DINO
  and CAFF checkpoints store under ``'args'``); anything else needs ``allow_unsafe=True``
  (``--allow_unsafe_checkpoint``). The reference unpickles everything, and fails on torch >= 2.6.
- Pretrained weights are checked against the model: keys whose shape differs (e.g. a class head for another
  num_classes) are skipped and reported, never silently. The reference raises a size mismatch error instead.
- Keys are matched against the unwrapped model and a ``module.`` prefix is stripped from sources, so loading under
  DDP loses nothing (the reference drops the transformer and heads there).
- A summary of loaded / newly initialised / skipped / ignored keys is returned (``LoadReport``) and logged.
"""
import argparse
import contextlib
import os
import pickle
import re
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from util.errors import UserError

# Types a checkpoint may contain beyond tensors and containers of plain values. The reference checkpoints hold
# their run arguments as an argparse.Namespace.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit: the message names the file and what to do."""


def _tmp_path(path: str) -> str:
    """The one temporary name used while writing ``path``: a save killed mid-write (kill -9, power loss) leaves
    this file behind, and the next save to ``path`` truncates and reuses it, so strays never accumulate."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp')


def save_checkpoint(obj: dict, path: str) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` holds either the old or the new file, never a partial one.

    The bytes go to ``.<name>.tmp`` in the same directory (left over from a killed save, it is overwritten), are
    flushed and fsync'ed, and the file is renamed onto ``path`` (atomic on POSIX); the directory is fsync'ed so
    the rename itself survives a crash. One writer per ``path`` at a time (the main process).
    """
    with _atomic_write(path) as tmp_path:
        with open(tmp_path, 'wb') as f:  # created with 0o666 & ~umask, truncated if a killed save left it
            try:
                torch.save(obj, f)
            except RuntimeError as err:  # torch's zip writer reports a failed write (e.g. a full disk) this way
                if 'PytorchStreamWriter' not in str(err):
                    raise
                raise OSError(str(err).strip().splitlines()[-1]) from None
            f.flush()
            os.fsync(f.fileno())


def copy_checkpoint(src: str, dst: str) -> None:
    """Make ``dst`` a copy of the saved checkpoint ``src``, atomically (``dst`` is old or new, never partial).

    A hard link is used where the file system allows it: ``save_checkpoint`` never writes into an existing file
    (it renames a new one over it), so the two names stay independent and no bytes are copied. The temporary
    name is ``save_checkpoint``'s, so a stray left by a killed copy is removed by the next one.
    """
    with _atomic_write(dst) as tmp_path:
        if os.path.lexists(tmp_path):
            os.unlink(tmp_path)
        try:
            os.link(src, tmp_path)
        except OSError:
            shutil.copyfile(src, tmp_path)
            with open(tmp_path, 'rb') as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def _atomic_write(path: str):
    """Yield the temporary name to fill for ``path``; then rename it onto ``path`` and fsync the directory.

    On any error (or interrupt) the temporary file is removed and ``path`` keeps its old content; an ``OSError``
    (full disk, no permission) becomes a ``CheckpointError`` naming ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = _tmp_path(path)
    try:
        os.makedirs(directory, exist_ok=True)
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as err:
        if os.path.lexists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(err, OSError):
            raise CheckpointError(f'cannot write checkpoint {path!r} ({err.strerror or err}); the previous file is '
                                  'kept: free disk space or choose a writable --output_dir') from None
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory`` (the entry itself, not only the file's bytes)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_checkpoint_path(path: str, flag: str = 'checkpoint') -> None:
    """``CheckpointError`` unless ``path`` is an existing file (``flag`` names the option in the message)."""
    if os.path.isdir(path):
        raise CheckpointError(f'{flag} {path!r} is a directory; pass the .pth file inside it')
    if not os.path.isfile(path):
        raise CheckpointError(f'{flag} {path!r} does not exist: check the path')


def load_checkpoint(path: str, allow_unsafe: bool = False) -> dict:
    """Load a checkpoint on the CPU. A bare state dict is returned as ``{'model': state_dict}``.

    Raises ``CheckpointError`` (one line naming the file) when it is missing, truncated, not a checkpoint, or
    holds objects outside ``SAFE_GLOBALS`` while ``allow_unsafe`` is False.
    """
    check_checkpoint_path(path)
    try:
        if allow_unsafe:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        unsupported = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if unsupported:
            raise CheckpointError(
                f'checkpoint {path!r} contains objects outside the weights-only allow-list ({unsupported.group(1)}); '
                'if you trust the file, pass --allow_unsafe_checkpoint') from None
        raise CheckpointError(f'checkpoint {path!r} is unreadable: the file is not a torch checkpoint') from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            zipfile.BadZipFile) as e:  # what torch / pickle raise on foreign or cut bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f'checkpoint {path!r} is unreadable ({reason}): the file is truncated or not a torch checkpoint') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict; '
                              "pass a file saved by main.py or the reference (a dict with a 'model' state dict)")
    if 'model' not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return {'model': checkpoint}
        keys = sorted(map(str, checkpoint))[:8]
        raise CheckpointError(f"checkpoint {path!r} has no 'model' state dict (its keys: {keys}), so it is not a model "
                              "checkpoint; pass a file saved by main.py or the reference")
    state = checkpoint['model']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path!r}: its 'model' entry is a {type(state).__name__}, not a state dict "
                              'of tensors; pass a file saved by main.py or the reference')
    return checkpoint


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, 'module') and isinstance(model.module, nn.Module) else model


def strip_module_prefix(state_dict: dict) -> dict:
    """Drop a leading ``module.`` (left by saving a DDP-wrapped model) from every key."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _group(keys) -> str:
    """``'conv_corr: 168, redim_corr: 16'``: keys counted by their first name component."""
    counts = Counter(k.split('.')[0] for k in keys)
    return ', '.join(f'{name}: {n}' for name, n in counts.most_common())


@dataclass
class LoadReport:
    """What a partial load did. ``skipped_shape`` holds ``(key, source shape, model shape)``."""
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f'{self.source}: loaded {len(self.loaded)} tensors'
                 + (f' ({_group(self.loaded)})' if self.loaded else '')]
        lines.append(f'  newly initialised (no source tensor): {len(self.new)}'
                     + (f' ({_group(self.new)})' if self.new else ''))
        lines.append(f'  skipped, shape mismatch: {len(self.skipped_shape)}')
        lines += [f'    {k}: checkpoint {list(src)} vs model {list(dst)}' for k, src, dst in self.skipped_shape]
        lines.append(f'  ignored by --finetune_ignore: {len(self.ignored)}'
                     + (f' ({_group(self.ignored)})' if self.ignored else ''))
        lines.append(f'  not in the model (unused): {len(self.unexpected)}'
                     + (f' ({_group(self.unexpected)})' if self.unexpected else ''))
        return '\n'.join(lines)


def load_partial_state_dict(model: nn.Module, state_dict: dict, ignore: list[str] | tuple = (),
                            source: str = 'checkpoint') -> LoadReport:
    """Load every tensor of ``state_dict`` whose key is in ``model`` with the same shape; report the rest.

    ``ignore``: substrings; a key containing any of them is not loaded (``--finetune_ignore``, as in the reference).
    Works on a DDP-wrapped model (keys are matched against the unwrapped one).
    """
    target = unwrap_model(model)
    model_state = target.state_dict()
    state_dict = strip_module_prefix(state_dict)
    report = LoadReport(source=source)
    to_load = {}
    for key, value in state_dict.items():
        if any(s in key for s in ignore):
            report.ignored.append(key)
        elif key not in model_state:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            report.skipped_shape.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            to_load[key] = value
    target.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    report.new = [k for k in model_state if k not in to_load]
    return report
