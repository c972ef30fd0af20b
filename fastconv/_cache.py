"""Per-user cache directory shared by the autotuner and the extension build.

Rules (they are the reason this module exists):
* the directory belongs to the current user and nobody else can write to it (0700);
* files hold JSON or build outputs only: nothing is unpickled;
* writes are atomic (write to a temporary file in the same directory, then ``os.replace``);
* cross-process critical sections use ``fcntl`` locks on a file inside the directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UnsafeCacheError(RuntimeError):
    pass


def cache_dir(*parts: str) -> Path:
    """``$FASTCONV_CACHE_DIR`` or ``$XDG_CACHE_HOME/fastconv`` or ``~/.cache/fastconv``.

    Created with mode 0700. Raises :class:`UnsafeCacheError` if the directory is owned by
    another user or writable by group/others, because its contents are loaded as code
    (compiled extensions) and as tuning decisions.
    """
    root = os.environ.get("FASTCONV_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fastconv")
    path = Path(root, *parts)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path)
    return path


def check_private(path: Path) -> None:
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeCacheError(f"cache directory {path} is owned by uid {st.st_uid}, not by you")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(
            f"cache directory {path} is writable by other users (mode {oct(st.st_mode & 0o777)}); "
            "run `chmod go-w` on it or set FASTCONV_CACHE_DIR")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; a missing or corrupt file gives ``default`` (caches are disposable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return default


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock held for the ``with`` block (blocks until acquired)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
