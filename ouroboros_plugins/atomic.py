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


# renameat2(2) flag: swap two paths in one step (Linux >= 3.15 with glibc >= 2.28); None where unavailable
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (both must exist). False when the system cannot (then nothing moved)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this kernel or filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(path: str | os.PathLike) -> list[str]:
    """Tidy what a killed `atomic_dir` left beside `path` (its writer's process is gone): a destination moved aside
    but never replaced is put back, temporary folders are removed. Returns what was done, one line each."""
    path = Path(path)
    done = []
    if not path.parent.is_dir():
        return done
    for entry in sorted(path.parent.iterdir()):
        name = entry.name
        prefix = f".{path.name}."
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        pid_text = rest.split("-", 2)[1] if rest.startswith("old-") else rest.split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue  # not ours, or its writer is still running
        if rest.startswith("old-") and not (path.exists() or path.is_symlink()):
            entry.rename(path)
            done.append(f"restored {path} from {entry.name} (an earlier replacement was interrupted)")
        elif rest.endswith(".tmp") or rest.startswith("old-"):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            done.append(f"removed {entry} (left by an interrupted write)")
    return done


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, mode: int = 0o755) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; when the block ends without an error it takes `path`'s place.

    Replacing an existing `path` swaps the two folders in one step (`renameat2` RENAME_EXCHANGE), so `path` is
    always either the old or the new folder, then deletes the old one. Where the system cannot swap, the old folder
    is moved aside and the new one renamed in (`path` is missing between the two renames). Either way, leftovers of
    a writer that was killed (temporary folders, a folder moved aside) are tidied the next time: see
    `recover_leftovers`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkdtemp makes it private to the owner
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            old = tmp  # the swap put the previous folder at the temporary name
        else:
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
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
