"""Crash-safe writes: every file and folder chatforge produces is replaced whole or not at all.

A file is written to a temporary name in its own folder, flushed and fsync'd, renamed over the target
with `os.replace` (atomic on POSIX), and the folder is fsync'd so that the rename itself survives a power
loss. A SIGKILL can therefore never leave half a file under the real name.

A folder (a checkpoint `step_N/`, a prepared data folder) is built under `.NAME.tmp-PID`, fsync'd file by
file, then swapped in. POSIX cannot rename a folder over a non-empty one, so the swap takes two renames:

    NAME -> .NAME.old-PID      (the complete old version, set aside)
    .NAME.tmp-PID -> NAME      (the complete new version: the commit point)
    .NAME.old-PID -> .NAME.tmp-PID, then deleted

Between the first two renames NAME is missing; a reader then uses the `.old-` folder (`current_dir`), and
the next writer renames it back (`recover_dir`). An `.old-` folder is always complete because it is only
ever deleted under a `.tmp-` name; a `.tmp-` folder is never trusted. Plain folders keep a checkpoint a
self-contained Hugging Face folder that can be copied or moved; a symlink swap would not.

Written here rather than taken from a library: none of the maintained ones (atomicwrites is archived)
does fsync'd folder swaps, and the file case is a dozen lines.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder last."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(parent, name))
        fsync_path(parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """`with atomic_open(path) as f:` writes `path` whole or not at all (nothing is left if the body raises).
    Like `open`, it does not create missing folders."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    # unique per writer, so threads and processes writing the same file never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically and durably; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, written atomically and durably; returns the path."""
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def _tmp_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _set_aside(path: Path) -> list[Path]:
    """The `.old-` folders a swap of `path` left (at most one while `path` is missing)."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"))


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def _discard(folder: Path, path: Path) -> None:
    """Delete a folder under this process's `.tmp-` name, so that a kill mid-way leaves nothing trusted."""
    tmp = _tmp_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.rename(folder, tmp)
    shutil.rmtree(tmp)


def current_dir(path: str | Path) -> Path:
    """Where a reader finds the folder `path`: itself, or, if a writer was killed between the two renames
    of a swap, the complete old version it had set aside (`path` itself when neither exists)."""
    path = Path(path)
    if path.exists():
        return path
    aside = _set_aside(path)
    return aside[-1] if aside else path


def recover_dir(path: str | Path) -> None:
    """For a writer: undo what killed swaps of `path` left. A set-aside old version goes back under its
    name if the name is missing; stale `.old-` folders and dead writers' `.tmp-` folders are deleted."""
    path = Path(path)
    aside = _set_aside(path)
    if aside and not path.exists():
        os.rename(aside.pop(), path)
    for folder in aside:
        _discard(folder, path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _is_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`with atomic_dir(path) as tmp:` fill the folder `tmp`; on success it replaces `path` whole (see the
    module docstring); if the body raises, `tmp` is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = _tmp_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
    if old is not None:
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_path(path.parent)
    if old is not None:
        _discard(old, path)
