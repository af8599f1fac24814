"""Reading a run folder back without ever losing a run: every JSON error names its file, a log torn by an
interruption loses only its torn last line, and resume takes the newest *intact* checkpoint, saying why it passed
over any newer one.

    RUN/config.json  log.jsonl  checkpoints/checkpoint-K/{trainer_state.json, adapter_model.safetensors,
                                                          optimizer.pt, scheduler.pt, rng_state.pth}
"""

from __future__ import annotations

import errno
import json
import zipfile
from pathlib import Path
from typing import Callable, Optional

CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


class DiskFull(OSError):
    """The disk filled up while the run was writing; the message names the path and the last intact checkpoint."""


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing, unreadable or malformed file is a ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); it may have been cut short by a full disk or a crash") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def read_log(run_dir, torn_tail: Optional[Callable[[str], None]] = None) -> list:
    """The records of RUN/log.jsonl. A malformed line is a ValueError naming the file and line, except a malformed
    *last* line when `torn_tail` is given (what an interruption mid-write leaves): it is dropped and reported."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if torn_tail is not None and not any(rest.strip() for rest in lines[i + 1 :]):
                torn_tail(f"{path}: dropped its torn last line (line {i + 1}, cut off mid-write)")
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({exc.msg})") from None
    return rows


def checkpoints(run_dir) -> list:
    """Trainer checkpoint folders of a run, newest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_checkpoint(run_dir) -> Optional[Path]:
    """The newest checkpoint folder with its trainer_state.json (not checked further), or None."""
    return next((p for p in checkpoints(run_dir) if (p / "trainer_state.json").is_file()), None)


def checkpoint_problem(ckpt: Path, expected: dict) -> Optional[str]:
    """Why `ckpt` cannot be resumed from, or None. expected: adapter tensor name -> shape (the model's)."""
    from safetensors import safe_open

    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        step = read_json(ckpt / "trainer_state.json").get("global_step")
    except ValueError as exc:
        return str(exc)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        return f"trainer_state.json has no valid global_step ({step!r})"
    try:
        with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the answer
        return f"adapter_model.safetensors is unreadable ({exc})"
    if set(shapes) != set(expected):
        return f"adapter_model.safetensors holds other tensors than this adapter (missing {sorted(set(expected) - set(shapes))[:3]}, extra {sorted(set(shapes) - set(expected))[:3]})"
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in sorted(expected) if shapes[k] != tuple(expected[k])]
    if wrong:
        return f"adapter_model.safetensors has tensors of the wrong shape: {', '.join(wrong[:3])}"
    for name in ("optimizer.pt", "scheduler.pt") + (("rng_state.pth",) if (ckpt / "rng_state.pth").is_file() else ()):
        # torch.save writes a zip archive: its structure and CRCs say whether it is whole, without unpickling it
        # (Trainer itself reads it back with torch's restricted weights_only loader)
        try:
            with zipfile.ZipFile(ckpt / name) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{name} is unreadable ({exc})"
        if bad is not None:
            return f"{name} is unreadable (corrupt member {bad})"
    return None


def resume_checkpoint(run_dir, expected: dict, report: Callable[[str], None]) -> Optional[Path]:
    """The newest intact checkpoint (each newer one passed over is reported with its problem), None when the run
    has none. When there are checkpoints but none is intact, a ValueError: never restart over them silently."""
    found = checkpoints(run_dir)
    problems = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt, expected)
        if problem is None:
            return ckpt
        problems.append(f"{ckpt.name}: {problem}")
        report(f"passing over {ckpt}: {problem}")
    if found:
        raise ValueError(
            f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({'; '.join(problems)}); nothing was changed. "
            "Start the run again with --overwrite, or restore a checkpoint"
        )
    return None


def is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)
