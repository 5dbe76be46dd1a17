"""Writes that never leave a half-written file or folder behind (temporary name, then rename), and reads
that never block on something that is not a regular file."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


class UnreadableFile(OSError):
    """A file that cannot be read: its message names it and says why."""


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _cannot_read(name: str, path, exc: OSError) -> UnreadableFile:
    missing = isinstance(exc, FileNotFoundError)
    why = (
        ("a broken symbolic link" if os.path.islink(path) else "no such file") if missing else exc.strerror or str(exc)
    )
    return UnreadableFile(f"{name}: cannot be read ({why})")


def check_regular_file(path: str | Path, name: str | None = None) -> None:
    """Refuse, without opening it, anything but a regular file (a FIFO blocks, a device never ends)."""
    name = name or str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _cannot_read(name, path, exc) from None
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"{name}: not a regular file ({_kind(mode)})")


def read_regular_file(path: str | Path, name: str | None = None) -> bytes:
    """The bytes of a regular file; anything else is refused unopened. Every error is an UnreadableFile
    naming the file as `name` (default: the path)."""
    name = name or str(path)
    check_regular_file(path, name)
    try:
        # Swapped for a FIFO since the check? O_NONBLOCK opens it without waiting for a writer, and fstat
        # on the open file refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _cannot_read(name, path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(f"{name}: not a regular file ({_kind(mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except UnreadableFile:
        raise
    except OSError as exc:  # e.g. EIO from a failing disk
        raise _cannot_read(name, path, exc) from None
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path, names) -> list[Path]:
    """Delete the temporaries that atomic_write_bytes leaves for `names` when killed mid-write.

    Only our own pattern (.NAME.<random>.tmp) is touched; call it before anything writes to `folder`.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for name in names:
        for path in folder.glob(f".{glob.escape(name)}.*.tmp"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_csv(path: str | Path, rows, fields: list[str]) -> None:
    """Rows (dicts; keys outside `fields` are an error) as CSV with a header, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(path: str | Path):
    """Build a folder under a temporary name; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
