"""Writing small files so that a crash leaves the old one or the new one, never a torn
one: write to a temporary name, fsync, rename over, fsync the directory (POSIX rename
is atomic; the directory fsync makes the new name itself durable).

Used for every small state file: the MTA-STS policy cache, the self-signed certificate,
quarantine metadata, release records, digest stamps. The queue has its own log format
(relay.queue.spool) and uses fsync_dir for the names it creates.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600,
                 sync: bool = True) -> None:
    """Replace `path` with `data`. The file is created with `mode` (never readable by
    others in between, whatever the umask); `sync=False` for files whose loss is
    harmless (a stamp), keeping only the atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)
