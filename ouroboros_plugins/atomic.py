"""Atomic file writes: whoever reads the destination sees the old file or the complete new one, never a part.

Every file the project writes (run state, checkpoints' JSON, results, task files, downloads, extracted data) goes
through `atomic_path`: the content is written to a temporary file in the destination's folder, flushed to disk,
given ordinary permissions, and renamed over the destination. If anything fails before the rename (an exception in
the writer, a checksum that does not match, Ctrl-C), the temporary file is removed and the destination is left as it
was. Standard library only, so the stdlib-only scripts under evals/ can use it too.

Folders (checkpoints, saved adapters, exported models) go through `atomic_dir` the same way: a temporary folder
beside the destination, renamed into place once complete; an existing destination is moved aside first and removed
only after the new folder is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; when the block ends without an error it replaces `path`.

    The writer may open the temporary path itself or hand it to a library (`safetensors.save_file`, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private to the owner
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data, *, sort_keys: bool = False) -> None:
    """Write `data` as indented JSON (with a final newline) to `path` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], *, sort_keys: bool = False) -> int:
    """Write one JSON object per line to `path` atomically; returns how many were written.

    `records` may be a generator: nothing replaces `path` unless it is consumed without an error.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=sort_keys, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; when the block ends without an error it takes `path`'s place.

    Replacing an existing `path` moves it aside, renames the new folder in, then deletes the old one; if the rename
    fails the old folder is put back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkdtemp makes it private to the owner
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old is not None:
                old.rename(path)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
