"""ouroboros_plugins.atomic: every file and folder the project writes appears complete or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ouroboros_plugins.atomic import atomic_dir, atomic_path, write_json, write_jsonl, write_text


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_and_json_create_folders_and_ordinary_files(tmp_path):
    write_text(tmp_path / "a" / "b.txt", "héllo\n")
    write_json(tmp_path / "a" / "c.json", {"z": 1, "a": "é"}, sort_keys=True)
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "a" / "c.json").read_text(encoding="utf-8")
    assert text == '{\n  "a": "é",\n  "z": 1\n}\n'
    assert listing(tmp_path / "a") == ["b.txt", "c.json"]  # no temporary files left
    assert stat.S_IMODE((tmp_path / "a" / "b.txt").stat().st_mode) == 0o644  # not mkstemp's private 0o600


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "results.json"
    write_text(dest, "old\n")
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half of the new conte")
            raise ValueError("boom")
    assert dest.read_text() == "old\n"
    assert listing(tmp_path) == ["results.json"]


def test_write_jsonl_counts_and_leaves_nothing_when_the_records_fail(tmp_path):
    dest = tmp_path / "log.jsonl"
    assert write_jsonl(dest, ({"i": i} for i in range(3))) == 3
    assert [json.loads(line) for line in dest.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]

    def broken():
        yield {"i": 9}
        raise RuntimeError("record source failed")

    with pytest.raises(RuntimeError, match="record source failed"):
        write_jsonl(dest, broken())
    assert [json.loads(line)["i"] for line in dest.read_text().splitlines()] == [0, 1, 2]
    assert listing(tmp_path) == ["log.jsonl"]


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("v1")
    assert (dest / "weights").read_text() == "v1"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755

    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(dest) as tmp:
            (tmp / "weights").write_text("v2, half")
            raise OSError("disk full")
    assert (dest / "weights").read_text() == "v1"
    assert listing(tmp_path) == ["adapter"]

    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("v2")
    assert listing(dest) == ["weights"] and (dest / "weights").read_text() == "v2"
    assert listing(tmp_path) == ["adapter"]  # the old folder was removed after the swap


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    """The fallback where the system cannot swap two folders in one step: move aside, rename in, undo on failure."""
    import ouroboros_plugins.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "export"
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("{}")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == dest and self.name.endswith(".tmp"):
            raise OSError("rename refused")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text('{"new": true}')
    assert (dest / "config.json").read_text() == "{}"
    assert listing(tmp_path) == ["export"]


def dead_pid() -> int:
    """A process id that is not running."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replacing_swaps_in_one_step_so_the_destination_never_goes_missing(tmp_path, monkeypatch):
    """Killed right after the swap (here: while the old folder is being deleted), the destination already is the
    new folder; the old one lies at a temporary name, and the next write to that destination removes it."""
    import ouroboros_plugins.atomic as atomic

    dest = tmp_path / "export"
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("old")
    seen = []
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, target: seen.append(target) or real_rename(self, target))
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "config.json").write_text("new")
    assert seen == []  # no rename: the swap is one renameat2 call
    assert (dest / "config.json").read_text() == "new"
    leftover = [p for p in tmp_path.iterdir() if p.name != "export"]
    assert len(leftover) == 1 and (leftover[0] / "config.json").read_text() == "old"
    monkeypatch.undo()
    # the writer "died": the same leftover under a finished process's id is tidied by the next write
    stale = leftover[0].with_name(leftover[0].name.replace(f".{os.getpid()}-", f".{dead_pid()}-"))
    leftover[0].rename(stale)
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("newer")
    assert listing(tmp_path) == ["export"] and (dest / "config.json").read_text() == "newer"


def test_a_destination_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """The fallback's window: killed between its two renames, the destination is missing and the old folder lies
    beside it; the next write to it (or `recover_leftovers`) puts it back before anything else."""
    from ouroboros_plugins.atomic import recover_leftovers

    dest = tmp_path / "export"
    moved = tmp_path / f".export.old-{dead_pid()}-123"
    moved.mkdir()
    (moved / "config.json").write_text("old")
    half = tmp_path / f".export.{dead_pid()}-xyz.tmp"
    half.mkdir()
    notes = recover_leftovers(dest)
    assert (dest / "config.json").read_text() == "old" and listing(tmp_path) == ["export"]
    assert len(notes) == 2 and any("restored" in n for n in notes)
    running = tmp_path / ".export.1-init.tmp"  # a writer whose process still runs (pid 1) keeps its folder
    running.mkdir()
    assert recover_leftovers(dest) == [] and running.exists()
