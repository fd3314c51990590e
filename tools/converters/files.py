"""Idempotent file output of the converters: images placed by copy / hard link / symlink, text written atomically.

A file already in place is left alone (a copy whose size and modification time match its source, the same hard
link, the same symlink target; a text file with exactly the new content), so a second run rewrites nothing.
"""
import os
import shutil

import PIL.Image

from util.errors import UsageError

MODES = ('copy', 'hardlink', 'symlink')


def place_file(src: str, dst: str, mode: str) -> bool:
    """Put ``src`` at ``dst`` by copy, hard link or symlink; False (nothing done) when it is there already."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UsageError(f'{dst}: the output would overwrite its own source; choose another output folder')
    if mode == 'symlink':
        if os.path.islink(dst) and os.readlink(dst) == os.path.abspath(src):
            return False
    elif os.path.isfile(dst) and not os.path.islink(dst):
        if mode == 'hardlink' and os.path.samefile(src, dst):
            return False
        source, target = os.stat(src), os.stat(dst)
        if mode == 'copy' and source.st_size == target.st_size and abs(source.st_mtime_ns - target.st_mtime_ns) < 1e6:
            return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    temporary = f'{dst}.converting'
    if os.path.lexists(temporary):
        os.remove(temporary)
    try:
        if mode == 'copy':
            shutil.copy2(src, temporary)
        elif mode == 'hardlink':
            os.link(src, temporary)
        else:
            os.symlink(os.path.abspath(src), temporary)
    except OSError as err:
        raise UsageError(f'{dst}: cannot {mode} {src} ({err.strerror}); try --mode copy') from None
    os.replace(temporary, dst)
    return True


def write_if_changed(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless the file already holds exactly it; True when written."""
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            if f.read() == text:
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f'{path}.converting', 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(f'{path}.converting', path)
    return True


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header; OSError-like failures propagate."""
    with PIL.Image.open(path) as image:
        return image.size
