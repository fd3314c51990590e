"""Tests of the extension build cache (models/ops/build.py): a build is keyed by content, not by path, so a second
copy of the sources imports the first copy's library without compiling; any edit, flag or target change gets a new
key; a build is published by one rename, so a concurrent build or a failed one leaves the cache consistent; a
second build under an already imported module name is refused instead of silently returning the first."""
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from models.ops import build


def copy_sources(root):
    """A copy of models/ops/csrc under `root` (what a second clone has): its CPU sources and headers."""
    csrc = shutil.copytree(build.CSRC, root / 'csrc')
    return [csrc / s.name for s in build.CPU_SOURCES], [csrc / h.name for h in build.HEADERS]


def use_sources(monkeypatch, sources, headers):
    monkeypatch.setattr(build, 'CPU_SOURCES', sources)
    monkeypatch.setattr(build, 'HEADERS', headers)
    monkeypatch.setattr(build, '_loaded', {})  # as in a fresh process


def refuse_to_compile(**kwargs):
    raise AssertionError(f"compiled although the build is cached: {kwargs['sources']}")


def test_second_copy_of_the_sources_reuses_the_built_kernel(monkeypatch, tmp_path):
    if build.find_cxx() is None:
        pytest.skip('no C++ compiler: the cpu backend cannot be built here')
    use_sources(monkeypatch, *copy_sources(tmp_path / 'clone1'))
    first = build.load_cpu_extension()  # compiles only if no run has cached this kernel yet
    use_sources(monkeypatch, *copy_sources(tmp_path / 'clone2'))
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', refuse_to_compile)
    second = build.load_cpu_extension()
    assert second.__file__ == first.__file__
    assert str(tmp_path) not in second.__file__
    assert 'CPU' in second.forward.__doc__
    # Another build under the same module name cannot be imported next to it: Python would return the first one.
    other = tmp_path / 'other_build' / Path(first.__file__).name
    other.parent.mkdir()
    shutil.copy(first.__file__, other)
    with pytest.raises(RuntimeError, match='already loaded in this process'):
        build._import_library(other)


def test_key_follows_contents_flags_and_target_not_paths(monkeypatch, tmp_path):
    sources, headers = copy_sources(tmp_path / 'clone1')
    use_sources(monkeypatch, sources, headers)
    key = build.build_key(sources, ['-O3'], 'cpu-x')
    assert build.build_key(sources, ['-O2'], 'cpu-x') != key
    assert build.build_key(sources, ['-O3'], 'cpu-y') != key
    moved, moved_headers = copy_sources(tmp_path / 'clone2')
    use_sources(monkeypatch, moved, moved_headers)
    assert build.build_key(moved, ['-O3'], 'cpu-x') == key
    with monkeypatch.context() as patch:
        patch.setattr(torch, '__version__', '0.0.1')
        assert build.build_key(moved, ['-O3'], 'cpu-x') != key
    moved_headers[0].write_text(moved_headers[0].read_text() + '\n// edited\n')
    assert build.build_key(moved, ['-O3'], 'cpu-x') != key
    moved[0].write_text(moved[0].read_text() + '\n// edited\n')
    use_sources(monkeypatch, moved, headers)
    assert build.build_key(moved, ['-O3'], 'cpu-x') != key


def fake_build(written: bytes, before_return=None):
    """A stand-in for torch's `load`: writes a library file into its build folder and returns a module."""

    def load(name, sources, build_directory, **kwargs):
        library = Path(build_directory) / f'{name}.so'
        library.write_bytes(written)
        if before_return is not None:
            before_return()
        return types.SimpleNamespace(__file__=str(library))
    return load


def cache_folder():
    return build.build_root() / f'{build.CPU_EXTENSION}_{build.build_key(build.CPU_SOURCES, [], "t")}'


def test_build_is_published_by_one_rename_and_then_imported(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(build, '_loaded', {})
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fake_build(b'library'))
    module = build.load_cached(build.CPU_EXTENSION, build.CPU_SOURCES, [], 't')
    folder = cache_folder()
    assert module.__file__ == str(folder / f'{build.CPU_EXTENSION}.so')
    assert (folder / f'{build.CPU_EXTENSION}.so').read_bytes() == b'library'
    assert [p.name for p in build.build_root().iterdir()] == [folder.name]  # no staging folder left

    imported = []
    monkeypatch.setattr(build, '_loaded', {})
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', refuse_to_compile)
    monkeypatch.setattr(build, '_import_library', lambda library: imported.append(library) or 'module')
    assert build.load_cached(build.CPU_EXTENSION, build.CPU_SOURCES, [], 't') == 'module'
    assert imported == [folder / f'{build.CPU_EXTENSION}.so']


def test_concurrent_build_keeps_the_first_published_library(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(build, '_loaded', {})

    def other_process_publishes_first():
        cache_folder().mkdir()
        (cache_folder() / f'{build.CPU_EXTENSION}.so').write_bytes(b'theirs')

    monkeypatch.setattr(torch.utils.cpp_extension, 'load', fake_build(b'mine', other_process_publishes_first))
    module = build.load_cached(build.CPU_EXTENSION, build.CPU_SOURCES, [], 't')
    assert (cache_folder() / f'{build.CPU_EXTENSION}.so').read_bytes() == b'theirs'
    assert module.__file__ == str(cache_folder() / f'{build.CPU_EXTENSION}.so')
    assert [p.name for p in build.build_root().iterdir()] == [cache_folder().name]


def test_failed_build_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(build, '_loaded', {})

    def broken(**kwargs):
        (Path(kwargs['build_directory']) / 'half_written.o').write_bytes(b'')
        raise RuntimeError('Error building extension')

    monkeypatch.setattr(torch.utils.cpp_extension, 'load', broken)
    with pytest.raises(RuntimeError, match='Error building'):
        build.load_cached(build.CPU_EXTENSION, build.CPU_SOURCES, [], 't')
    assert list(build.build_root().iterdir()) == []
