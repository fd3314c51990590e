"""Builds the fused MSDeformAttn extensions (C++ CPU kernel, CUDA kernel) with `torch.utils.cpp_extension.load`.

Nothing here runs at import time: the dispatcher (`ms_deform_attn_func.py`) calls `load_cpu_extension()` or
`load_cuda_extension()` on first use. Builds are cached under `$TORCH_EXTENSIONS_DIR` (if set) or
`~/.cache/caff_dino/torch_extensions/`, in a folder per torch/Python version; a change to a source or to a shared
header (`HEADERS`, whose digest is one of the compile flags) triggers a rebuild.
The reference (Deformable-DETR `setup.py`) needs a CUDA machine to build at all; this builds the CPU kernel
anywhere a C++ compiler exists, and the CUDA kernel anywhere `nvcc` exists (no GPU needed to compile).

Ahead-of-time build (e.g. in a Docker image), from the repository root:

    python -m models.ops.build --cpu                      # the fused CPU kernel
    python -m models.ops.build --cuda --arch 8.0 9.0      # the CUDA kernel for A100 and H100
"""
import argparse
import contextlib
import hashlib
import os
import platform
import re
import shutil
import sys
import sysconfig
from pathlib import Path
from collections.abc import Iterator
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / 'csrc'
CPU_SOURCES = [CSRC / 'ms_deform_attn_cpu.cpp']
CUDA_SOURCES = [CSRC / 'ms_deform_attn_cuda.cu']
HEADERS = [CSRC / 'ms_deform_attn_checks.h']
CPU_EXTENSION = 'caff_msda_cpu'
CUDA_EXTENSION = 'caff_msda_cuda'


def build_root() -> Path:
    """Cache folder of the built extensions, one sub-folder per torch and Python version (ABI-safe)."""
    base = os.environ.get('TORCH_EXTENSIONS_DIR') or Path.home() / '.cache' / 'caff_dino' / 'torch_extensions'
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info.major}{sys.version_info.minor}"
    return Path(base) / tag


def headers_flag() -> str:
    """A `-D` compile flag carrying a digest of the `HEADERS` the sources include.

    torch's JIT loader decides whether to rebuild from the sources and the flags only, not from the files the
    sources include; with the digest in the flags a header change changes the compile command, so both torch and
    ninja rebuild.
    """
    digest = hashlib.sha1()
    for header in HEADERS:
        digest.update(header.read_bytes())
    return f'-DCAFF_MSDA_HEADERS_SHA1={digest.hexdigest()[:12]}'


def host_cpu_tag() -> str:
    """Short id of this machine's CPU model and instruction-set flags.

    The CPU kernel is compiled with -march=native, so a cache shared between different machines (an NFS home)
    must keep one build per CPU kind.
    """
    description = f'{platform.machine()} {platform.processor()}'
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags', 'Features', 'CPU part'))]
        description += ''.join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(description.encode()).hexdigest()[:10]


def find_cxx() -> str | None:
    """The C++ compiler torch.utils.cpp_extension will call ($CXX, else c++), or None if there is none."""
    return shutil.which(os.environ.get('CXX', 'c++'))


@contextlib.contextmanager
def ninja_on_path() -> Iterator[str | None]:
    """Within the block, `ninja` (which torch.utils.cpp_extension runs by name) is on PATH if it can be found.

    A virtual environment's python run without activating it (`.venv/bin/python -m pytest`) does not have the
    venv's bin folder on PATH, so the `ninja` pip package installed there is not found and the build fails. When
    PATH has no ninja, the running interpreter's scripts folder (`sysconfig.get_path('scripts')`) is put in front
    of PATH for the block and PATH is restored after it. Yields the ninja that will run, or None if there is none.
    """
    found = shutil.which('ninja')
    if found is not None:
        yield found
        return
    scripts = sysconfig.get_path('scripts')
    saved = os.environ.get('PATH')
    os.environ['PATH'] = os.pathsep.join(p for p in (scripts, saved) if p)
    try:
        yield shutil.which('ninja')
    finally:
        if saved is None:
            os.environ.pop('PATH', None)
        else:
            os.environ['PATH'] = saved


def find_nvcc() -> str | None:
    """`nvcc` from $CUDA_HOME/bin, else from PATH; None if there is none."""
    for home_var in ('CUDA_HOME', 'CUDA_PATH'):
        home = os.environ.get(home_var)
        if home and (Path(home) / 'bin' / 'nvcc').is_file():
            return str(Path(home) / 'bin' / 'nvcc')
    return shutil.which('nvcc')


def find_cuda_home(nvcc: str | None = None) -> Path | None:
    """Root of the CUDA toolkit `nvcc` belongs to (the folder holding bin/nvcc and include/cuda_runtime.h).

    `nvcc` on PATH may be a symlink or a small shell wrapper (`exec /usr/local/cuda-X/bin/nvcc "$@"`); both are
    followed, so CUDA_HOME points at the toolkit and not at the wrapper's folder (torch would guess /usr/local).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    try:
        head = real.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b'#!'):
        for target in re.findall(rb'(/[^\s"\']+/bin/nvcc)\b', head):
            root = Path(target.decode()).resolve().parent.parent
            if _is_toolkit(root):
                return root
    return None


def _is_toolkit(root: Path) -> bool:
    return (root / 'bin' / 'nvcc').is_file() and (root / 'include' / 'cuda_runtime.h').is_file()


def nvidia_wheel_include_dirs() -> list[str]:
    """Include folders of the `nvidia-*` pip wheels torch depends on (cuBLAS, cuSPARSE, ... headers).

    A minimal toolkit can lack headers that torch's CUDA headers include (e.g. cusparse.h); the wheels ship them
    under site-packages/nvidia/<lib>/include or site-packages/nvidia/cu<ver>/include.
    """
    roots = {Path(p) / 'nvidia' for p in (sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'])}
    found = []
    for root in sorted(roots):
        if root.is_dir():
            found += sorted(str(p) for p in root.glob('*/include') if p.is_dir())
    return found


def load_cpu_extension(verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the fused C++ CPU kernel. Raises if it cannot be built."""
    if find_cxx() is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r} on PATH); "
                           "install g++ or set CXX")
    from torch.utils.cpp_extension import load
    directory = build_root() / f'{CPU_EXTENSION}_{host_cpu_tag()}'
    directory.mkdir(parents=True, exist_ok=True)
    # -march=native: the gathers and D-vector loops vectorise with the host's widest SIMD (about 2x over SSE2).
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without it the kernels run serially.
    with ninja_on_path():
        return load(name=CPU_EXTENSION, sources=[str(s) for s in CPU_SOURCES], build_directory=str(directory),
                    extra_cflags=['-O3', '-march=native', '-fopenmp', headers_flag()], extra_ldflags=['-fopenmp'],
                    verbose=verbose)


def load_cuda_extension(archs: list[str] | None = None, verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the CUDA kernel; no GPU is needed to compile. Raises if it cannot be built.

    Args:
        archs: compute capabilities such as ['8.0', '9.0']; default: $TORCH_CUDA_ARCH_LIST, else the visible
            GPUs' (torch's own rule).
    """
    import torch.utils.cpp_extension as cpp_extension
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc found (looked in $CUDA_HOME/bin and on PATH); install the CUDA toolkit or set "
                           "CUDA_HOME")
    cuda_home = find_cuda_home(nvcc)
    if cuda_home is None:
        raise RuntimeError(f"found nvcc at {nvcc} but not the toolkit it belongs to (no include/cuda_runtime.h "
                           "next to its bin/); set CUDA_HOME to the toolkit root")
    # torch resolves CUDA_HOME once at import (from $CUDA_HOME or PATH); point it at the toolkit nvcc belongs to.
    os.environ['CUDA_HOME'] = str(cuda_home)
    cpp_extension.CUDA_HOME = str(cuda_home)
    if not archs and not os.environ.get('TORCH_CUDA_ARCH_LIST') and not torch.cuda.is_available():
        raise RuntimeError("no GPU is visible to pick the target architecture; pass archs=['8.0', ...] or set "
                           "TORCH_CUDA_ARCH_LIST")
    name = CUDA_EXTENSION + ('_sm' + '_'.join(a.replace('.', '') for a in archs) if archs else '')
    directory = build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    # -isystem after torch's own include flags: the toolkit's headers win, the wheels only fill in missing ones.
    wheel_includes = [flag for path in nvidia_wheel_include_dirs() for flag in ('-isystem', path)]
    saved_archs = os.environ.get('TORCH_CUDA_ARCH_LIST')
    if archs:
        os.environ['TORCH_CUDA_ARCH_LIST'] = ';'.join(archs)
    try:
        with ninja_on_path():
            return cpp_extension.load(
                name=name, sources=[str(s) for s in CUDA_SOURCES], build_directory=str(directory),
                extra_cflags=['-O3', headers_flag(), *wheel_includes],
                extra_cuda_cflags=['-O3', '-lineinfo', headers_flag(), *wheel_includes],
                verbose=verbose)
    finally:
        if saved_archs is None:
            os.environ.pop('TORCH_CUDA_ARCH_LIST', None)
        else:
            os.environ['TORCH_CUDA_ARCH_LIST'] = saved_archs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description='Build the fused MSDeformAttn extensions ahead of time.')
    parser.add_argument('--cpu', action='store_true', help='build the fused C++ CPU kernel')
    parser.add_argument('--cuda', action='store_true', help='build the CUDA kernel (needs nvcc, not a GPU)')
    parser.add_argument('--arch', nargs='+', default=None, help="CUDA compute capabilities, e.g. 8.0 9.0")
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args(argv)
    if not (args.cpu or args.cuda):
        parser.error('pass --cpu and/or --cuda')
    if args.cpu:
        print('cpu extension:', load_cpu_extension(verbose=args.verbose).__file__)
    if args.cuda:
        print('cuda extension:', load_cuda_extension(args.arch, verbose=args.verbose).__file__)


if __name__ == '__main__':
    main()
