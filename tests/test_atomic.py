"""ouroboros_plugins.atomic: every file and folder the project writes appears complete or not at all."""

from __future__ import annotations

import json
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
