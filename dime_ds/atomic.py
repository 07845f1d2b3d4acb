"""Files and directories replaced atomically: written under a temporary name beside the target, then
renamed over it, so a reader sees the old content or the new, never part of it; on failure the
temporary is removed and the target is left as it was.

Durable (the default): the data is fsynced before the rename and the containing directory after it,
so once the call returns the new content survives a crash or power loss. Without it a crash can
leave a complete-looking name over an empty file (delayed allocation), which is why manifests,
completion records, `latest`, keep lists, caches and weights all stay durable; only files nothing
reads back as a fact may pass durable=False.

The temporary's name is the target's plus `.tmp`: one writer per target at a time (every caller
writes its paths from one process), and a crash's leftover is overwritten by the next write.
Lowest layer: the standard library only."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

SUFFIX = ".tmp"
# fsync of a directory is refused by some file systems (and is then a no-op there): not an error.
_NO_DIR_FSYNC = (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EISDIR, errno.EACCES)


def temporary(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file written by someone else (a library given a path) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename into it) durable, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        if err.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


class PendingFile:
    """A file being written at `tmp` that becomes `path` on commit() (fsynced first when durable) or
    is removed by discard(). For a writer spread over several calls (ShardWriter's tar); elsewhere use
    replacing() or write_bytes()."""

    def __init__(self, path: str | os.PathLike, *, durable: bool = True):
        self.path, self.durable = Path(path), durable
        self.tmp = temporary(self.path)

    def commit(self) -> Path:
        if self.durable:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        if self.durable:
            fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yields the temporary path to write (torch.save, safetensors, np.save to a path); on a clean exit
    it replaces `path`, on an exception it is removed and `path` is untouched."""
    pending = PendingFile(path, durable=durable)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def write_bytes(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any], *, durable: bool = True) -> None:
    """`data`, or what `data(binary_file)` writes (np.save(f, ...)), as the new content of `path`."""
    with replacing(path, durable=durable) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, durable: bool = True,
               **dumps: Any) -> None:
    """`obj` as JSON with a final newline."""
    write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n", durable=durable)


def replace_dir(staging: str | os.PathLike, final: str | os.PathLike, *, durable: bool = True) -> Path:
    """Swap a complete staging directory in for `final` (removed first: a rename cannot replace a
    non-empty directory). Its files must already be durable (written through this module); this makes
    their directory entries and the swap durable."""
    staging, final = Path(staging), Path(final)
    if durable:
        fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    if durable:
        fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yields an empty staging directory beside `final` (a crash's leftover cleared) to fill; on a
    clean exit it replaces `final` (replace_dir), on an exception it is removed and `final` is untouched."""
    staging = temporary(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final, durable=durable)
