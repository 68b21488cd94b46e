"""The one way files are written: whole or not at all.

A file appears at its path only once it is complete and on disk: it is written to a temporary file in the same
folder, flushed and fsynced, renamed over the target (atomic on POSIX), and the folder is fsynced so the rename itself
survives a crash. On any error the temporary file is removed and an existing file at the path is left as it was.
The file gets the mode a plain `open(path, "w")` would give (0666 less the umask): `mkstemp`'s 0600 would leave
weights and exported models unreadable by a service running as another user.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The mode `open(path, "w")` (0666) or `mkdir` (0777) gives under the current umask; for what is made with
    `tempfile`'s private 0600 / 0700 and then put in place."""
    return (0o777 if directory else 0o666) & ~_umask()


def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by name, e.g. for a library's save function); on leaving the
    block without error it is fsynced and renamed to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, write: Callable[[object], None]) -> Path:
    """Call `write(binary file object)` and put the result at `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
