"""Crash-safe file writes: readers see the old file or the whole new one, never half a file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, sync: bool = True) -> Iterator[str]:
    """A temporary path in ``path``'s folder to write to; when the block ends, the file is synced
    and renamed to ``path`` (readers never see half a file), or removed if the block raised.

    ``sync=False`` renames without the sync: a killed process still never leaves half a file, but
    an operating-system crash may (for files whose reader checks them, written by the thousand).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_target`)."""
    with atomic_target(path, sync) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
