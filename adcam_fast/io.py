"""File helpers: atomic output (a reader never sees a half-written file, a crash never loses
the old one), text input with errors that name the file, and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync, then rename.

    The rename is atomic on POSIX filesystems: ``path`` holds either its old content or the
    whole new one. The temporary file is removed when ``write`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(
    path: str | os.PathLike[str], obj: object, default: Callable[[Any], object] | None = None
) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON (``default`` as in ``json.dumps``)."""
    payload = json.dumps(obj, indent=2, default=default).encode()
    return atomic_write(path, lambda f: f.write(payload))


def writable_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a folder this process can write in (made if missing). Raises ValueError
    naming ``what`` when it cannot be made or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: {path} cannot be made ({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path} is not writable")
    return path


def writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a file this process can create or replace (its folder is made). Raises
    ValueError naming ``what`` when it is a folder or its folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give the file to write")
    writable_folder(path.parent, f"{what} {path}'s folder")
    return path


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of the file ``path`` (a leading BOM dropped). Raises ValueError naming
    the file and ``what`` it holds when it cannot be read or is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {e.start}"
        raise ValueError(f"{path}: the {what} is not UTF-8 text ({where})") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} ({e.strerror or e})") from e


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
