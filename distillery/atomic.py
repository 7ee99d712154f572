"""Artefacts written whole or not at all: written beside their destination, then renamed into place.

A reader (the server scanning its adapters root, a resume, `from_pretrained`) finds at a destination the
previous complete version or the new complete one, never part of one. A folder is written into a hidden
staging folder on the same file system, `.<name>.tmp-<writer>/<name>` (one level down, so a scan
for `*/adapter.json` never matches it), its files are fsynced, and one rename puts it in place: on Linux
renameat2(RENAME_EXCHANGE) swaps it with an existing destination; elsewhere the old one is renamed aside
first, a moment in which the destination is missing but never torn. A file goes the same way through a
hidden temporary beside it and os.replace. A killed writer leaves only hidden leftovers; the next write
to the same place removes those whose process is gone (<writer>: its pid and start time, so that a
reused pid is not mistaken for it, and a random part).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


@contextmanager
def atomic_folder(dest: Path | str) -> Iterator[Path]:
    """Yield an empty folder to write `dest`'s contents into; on success it replaces `dest` whole. On an
    exception nothing at `dest` changes and the partial write is removed."""
    dest = Path(dest)
    staging = staging_folder(dest)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    publish(staging, dest)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write one file to; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)
    tmp = path.parent / f".{path.name}.tmp-{_writer()}"  # no suffix: a scan for *.safetensors never matches it
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself survives a power cut


def staging_folder(dest: Path | str) -> Path:
    """A fresh, empty hidden folder beside `dest` to write it into, then `publish`; for writers that
    cannot use `atomic_folder` (several processes writing one checkpoint)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest.parent, dest.name)
    staging = dest.parent / f".{dest.name}.tmp-{_writer()}" / dest.name
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, dest: Path) -> None:
    """Put the finished `staging_folder(dest)` in place of `dest` in one rename, then drop the old one."""
    staging, dest = Path(staging), Path(dest)
    holder = staging.parent
    for root, _, files in os.walk(staging):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    if not dest.exists():
        os.rename(staging, dest)
    elif not _exchange(staging, dest):  # either way the old version ends in the holder, removed below
        os.rename(dest, holder / ".previous")
        os.rename(staging, dest)
    _fsync(dest.parent)
    shutil.rmtree(holder)


def remove_folder(folder: Path | str) -> None:
    """Delete `folder` so that no reader ever sees part of it: it leaves its name in one rename."""
    folder = Path(folder)
    holder = folder.parent / f".{folder.name}.tmp-{_writer()}"
    holder.mkdir()
    os.rename(folder, holder / folder.name)
    _fsync(folder.parent)
    shutil.rmtree(holder)


def remove_leftovers(parent: Path | str, name: str = "*") -> None:
    """Remove what killed writers left in `parent` (of destination `name`; every one by default): hidden
    staging folders and temporary files whose process is gone. Those of live writers stay."""
    for path in Path(parent).glob(f".{glob.escape(name) if name != '*' else name}.tmp-*"):
        writer = path.name.rsplit(".tmp-", 1)[1].split("-")
        if len(writer) == 3 and writer[0].isdigit() and not _alive(int(writer[0]), writer[1]):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _writer() -> str:
    return f"{os.getpid()}-{_started(os.getpid())}-{secrets.token_hex(4)}"


def _started(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot ("0" without /proc, "" when there is no such process)."""
    if not Path("/proc/self/stat").exists():
        return "0"
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, after (comm)
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    if started != "0":  # with /proc: that pid, started then
        return _started(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc / not Linux
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without exchange: the fallback
        return False
    raise OSError(err, os.strerror(err), str(b))
