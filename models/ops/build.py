"""Builds the fused MSDeformAttn extensions (C++ CPU kernel, CUDA kernel) with `torch.utils.cpp_extension.load`,
and keeps one build per content in a cache that any clone of the repository reuses.

Nothing here runs at import time: the dispatcher (`ms_deform_attn_func.py`) calls `load_cpu_extension()` or
`load_cuda_extension()` on first use. The cache is `$TORCH_EXTENSIONS_DIR` (if set) or
`~/.cache/caff_dino/torch_extensions/`, with one folder per build named by `build_key`: a digest of the sources
and headers (their contents, not their paths), the compile flags, the torch version, the Python ABI and the target
(host CPU or CUDA architectures). A second clone, or the same clone moved, finds that folder and imports its
library without compiling (torch's own cache would rebuild: its `build.ninja` holds the sources' absolute paths).
A build runs in a private staging folder that is renamed into place once the library exists, so concurrent builds
never write into one folder and a killed build leaves no half-written cache entry behind.
The reference (Deformable-DETR `setup.py`) needs a CUDA machine to build at all; this builds the CPU kernel
anywhere a C++ compiler exists, and the CUDA kernel anywhere `nvcc` exists (no GPU needed to compile).

Ahead-of-time build (e.g. in a Docker image), from the repository root:

    python -m models.ops.build --cpu                      # the fused CPU kernel
    python -m models.ops.build --cuda --arch 8.0 9.0      # the CUDA kernel for A100 and H100
"""
import argparse
import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / 'csrc'
CPU_SOURCES = [CSRC / 'ms_deform_attn_cpu.cpp']
CUDA_SOURCES = [CSRC / 'ms_deform_attn_cuda.cu']
HEADERS = [CSRC / 'ms_deform_attn_bilinear.h', CSRC / 'ms_deform_attn_checks.h']
CPU_EXTENSION = 'caff_msda_cpu'
CUDA_EXTENSION = 'caff_msda_cuda'
LIBRARY_SUFFIXES = ('.so', '.pyd')  # what torch names the built library on Linux / macOS and on Windows

logger = logging.getLogger(__name__)
_loaded: dict[Path, ModuleType] = {}  # cache folder -> its module, imported once per process


def build_root() -> Path:
    """Cache folder of the built extensions, one sub-folder per torch and Python version (for people browsing it:
    `build_key` already tells builds apart)."""
    base = os.environ.get('TORCH_EXTENSIONS_DIR') or Path.home() / '.cache' / 'caff_dino' / 'torch_extensions'
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info.major}{sys.version_info.minor}"
    return Path(base) / tag


def build_key(sources: Sequence[Path], flags: Sequence[str], target: str) -> str:
    """Digest naming one build: what decides the library's bytes and whether this interpreter can import it.

    Covers the contents (not the paths) of `sources` and of every `HEADERS` file, the compile flags, the target
    (the host CPU for -march=native, or the CUDA architectures and toolkit), the torch version and build, and the
    Python ABI. Two clones with the same files get the same key; an edit to any of them gets a new one.
    """
    digest = hashlib.sha256()
    for path in [*sources, *HEADERS]:
        digest.update(path.name.encode() + b'\0' + path.read_bytes() + b'\0')
    abi = sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag
    for part in (*flags, target, torch.__version__, torch.version.git_version, abi, platform.machine()):
        digest.update(str(part).encode() + b'\0')
    return digest.hexdigest()[:16]


def headers_flag() -> str:
    """A `-D` compile flag carrying a digest of the `HEADERS` the sources include.

    torch's JIT loader versions a module by its sources and flags only, not by the files the sources include; with
    the digest in the flags, a process that rebuilds after a header edit gets a fresh module name (`<name>_v1`)
    instead of a second module under the name it has already imported.
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
    roots = {Path(p).resolve() / 'nvidia' for p in (sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'])}
    found = []
    for root in sorted(roots):
        if root.is_dir():
            found += sorted(str(p) for p in root.glob('*/include') if p.is_dir())
    return found


def _library(folder: Path) -> Path | None:
    """The built extension library in `folder`, or None if there is none (yet)."""
    found = sorted(p for p in folder.glob('*') if p.suffix in LIBRARY_SUFFIXES) if folder.is_dir() else []
    return found[0] if found else None


def _import_library(library: Path) -> ModuleType:
    """Import a built extension from its file; its module name is the file's stem (what PYBIND11_MODULE got)."""
    spec = importlib.util.spec_from_file_location(library.stem, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _check_fresh(module, library.parent)
    return module


def _check_fresh(module: ModuleType, folder: Path) -> None:
    """Raise if `module` was not imported from `folder`.

    Python keeps one extension module per name and process: importing another file under a name it has already
    imported returns the first module. A process that imported one build of a kernel and then asks for another
    (its sources were edited meanwhile) would silently run the old code.
    """
    if Path(module.__file__).parent != folder:
        raise RuntimeError(f"{module.__name__} is already loaded in this process from {module.__file__}; a "
                           f"different build of it (in {folder}) can only be loaded by a new process")


def load_cached(name: str, sources: Sequence[Path], flags: Sequence[str], target: str, verbose: bool = False,
                **load_kwargs) -> ModuleType:
    """The extension `name` built from `sources` with `flags` for `target`, from the cache or built into it.

    The cache folder is `build_root() / f'{name}_{build_key(...)}'`. If it holds a library, that library is
    imported and nothing is compiled. Otherwise `torch.utils.cpp_extension.load` builds in a fresh staging folder
    next to it, which is then renamed to the cache folder in one step; if another process renamed its build there
    first, this one's is dropped (both came from the same inputs). `load_kwargs` go to torch's `load` as they are.
    """
    from torch.utils import cpp_extension
    folder = build_root() / f'{name}_{build_key(sources, flags, target)}'
    if folder in _loaded:
        return _loaded[folder]
    library = _library(folder)
    if library is not None:
        logger.info('MSDeformAttn: %s loaded from the build cache %s', name, folder)
        module = _import_library(library)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.', dir=folder.parent))
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the published build from other users of the cache
        try:
            with ninja_on_path():
                module = cpp_extension.load(name=name, sources=[str(s) for s in sources],
                                            build_directory=str(staging), verbose=verbose, **load_kwargs)
            if _library(staging) is not None:
                with contextlib.suppress(OSError):  # the folder exists: another process published it first
                    os.rename(staging, folder)
                library = _library(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if library is None:  # torch's load returned without writing a library (never for a real build)
            return module
        _check_fresh(module, staging)
        module.__file__ = str(library)  # torch imported it from the staging folder, renamed since
        logger.info('MSDeformAttn: %s built into the build cache %s', name, folder)
    _loaded[folder] = module
    return module


def load_cpu_extension(verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the fused C++ CPU kernel. Raises if it cannot be built."""
    if find_cxx() is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r} on PATH); "
                           "install g++ or set CXX")
    # -march=native: the gathers and D-vector loops vectorise with the host's widest SIMD (about 2x over SSE2),
    # hence the host CPU in the key; on x86, -mprefer-vector-width=512 lets them use AVX-512 where the CPU has it
    # (a D = 32 fp32 row is then two registers instead of four; compilers default to 256 bits).
    # -fno-trapping-math: GCC vectorises floor() only when FP exceptions need not be preserved (the kernel never
    # reads them); the per-point loop of the kernel depends on it. -fopenmp: at::parallel_for is inline OpenMP
    # code in torch's headers; without it the kernels run serially.
    flags = ['-O3', '-march=native', '-fno-trapping-math', '-fopenmp', headers_flag()]
    if platform.machine().lower() in ('x86_64', 'amd64'):
        flags.insert(2, '-mprefer-vector-width=512')
    return load_cached(CPU_EXTENSION, CPU_SOURCES, flags, f'cpu-{host_cpu_tag()}-{os.environ.get("CXX", "c++")}',
                       verbose, extra_cflags=flags, extra_ldflags=['-fopenmp'])


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
    # -isystem after torch's own include flags: the toolkit's headers win, the wheels only fill in missing ones.
    wheel_includes = [flag for path in nvidia_wheel_include_dirs() for flag in ('-isystem', path)]
    cflags = ['-O3', headers_flag(), *wheel_includes]
    cuda_cflags = ['-O3', '-lineinfo', headers_flag(), *wheel_includes]
    saved_archs = os.environ.get('TORCH_CUDA_ARCH_LIST')
    if archs:
        os.environ['TORCH_CUDA_ARCH_LIST'] = ';'.join(archs)
    target_archs = os.environ.get('TORCH_CUDA_ARCH_LIST') or ';'.join(
        '{}.{}'.format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
    try:
        return load_cached(name, CUDA_SOURCES, [*cflags, '|', *cuda_cflags], f'cuda-{target_archs}-{cuda_home}',
                           verbose, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags)
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
