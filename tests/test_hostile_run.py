"""Hostile run folders (issue 20, "Training runs"): a damaged run folder is resumed from what is intact, or refused
with a message naming the file, and nothing is lost."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from ouroboros_train.run_folder import DiskFull
from ouroboros_train.train import TrainConfig, read_log, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def config(base_dir, text_file, out, **kw):
    values = dict(base=str(base_dir), out=str(out), adapter=dict(num_prelude_layers=1, num_coda_layers=1, num_steps=2, r=8),
                  train_text=str(text_file), seq_len=32, batch_size=2, max_updates=6, lr=3e-3, warmup=1, checkpoint_every=2,
                  keep_checkpoints=3, progress=False, distill=False)
    values.update(kw)
    return TrainConfig(**values)


def losses(run):
    return [r["loss"] for r in read_log(run) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(base_dir, text_file, tmp_path_factory):
    """The uninterrupted run's losses, and a run interrupted after update 5 (checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    train(config(base_dir, text_file, root / "full"))

    def stop(update, loss):
        if update == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(base_dir, text_file, root / "cut"), on_update=stop)
    return losses(root / "full"), root / "cut"


def damaged(runs, tmp_path, damage):
    reference, cut = runs
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    damage(run)
    return reference, run


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wrong_shape_adapter(run):
    from safetensors.torch import load_file, save_file

    path = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith("norms.weight"))
    tensors[name] = torch.ones(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(path))


# damage -> what the resume must say (stderr) while it falls back to checkpoint-2 and finishes the run exactly
FALLBACKS = {
    "torn last log line": (lambda run: (run / "log.jsonl").open("a").write('{"kind": "train", "upd'), "dropped its torn last line"),
    "truncated trainer_state.json": (lambda run: truncate(run / "checkpoints" / "checkpoint-4" / "trainer_state.json"),
                                     "passing over .*checkpoint-4: .*trainer_state.json is not readable JSON"),
    "truncated adapter weights": (lambda run: truncate(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"),
                                  "passing over .*checkpoint-4: adapter_model.safetensors is unreadable"),
    "wrong-shape adapter tensor": (wrong_shape_adapter, "passing over .*checkpoint-4: .*wrong shape: .*norms.weight"),
    "truncated optimizer state": (lambda run: truncate(run / "checkpoints" / "checkpoint-4" / "optimizer.pt"),
                                  "passing over .*checkpoint-4: optimizer.pt is unreadable"),
    "missing scheduler state": (lambda run: (run / "checkpoints" / "checkpoint-4" / "scheduler.pt").unlink(),
                                "passing over .*checkpoint-4: missing scheduler.pt"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_resume_falls_back_to_what_is_intact_and_finishes_exactly(runs, tmp_path, capfd, case, base_dir, text_file):
    damage, message = FALLBACKS[case]
    reference, run = damaged(runs, tmp_path, damage)
    result = train(config(base_dir, text_file, run), resume=True)
    assert losses(run) == reference  # nothing lost: the run is the uninterrupted one
    import re

    assert re.search(message, capfd.readouterr().err), case
    expected_from = 4 if case == "torn last log line" else 2
    assert result.summary["resumed_from_update"] == expected_from


REFUSALS = {
    "garbage config.json": (lambda run: (run / "config.json").write_text("{not json"), "config.json is not readable JSON"),
    "truncated config.json": (lambda run: truncate(run / "config.json"), "config.json is not readable JSON"),
    "torn line in the middle of the log": (
        lambda run: (run / "log.jsonl").write_text('{"kind": "train", "upd\n' + (run / "log.jsonl").read_text()),
        r"log.jsonl, line 1: not valid JSON"),
    "every checkpoint damaged": (
        lambda run: [truncate(c / "adapter_model.safetensors") for c in (run / "checkpoints").iterdir()],
        r"no intact checkpoint in .*checkpoint-4: adapter_model.safetensors is unreadable.*checkpoint-2: .*--overwrite"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_damage_that_cannot_be_resumed_is_named_and_nothing_changes(runs, tmp_path, case, base_dir, text_file):
    damage, message = REFUSALS[case]
    _, run = damaged(runs, tmp_path, damage)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=message):
        train(config(base_dir, text_file, run), resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_full_disk_is_one_error_naming_the_last_intact_checkpoint(base_dir, text_file, tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def save(self, model, trial):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "checkpoint-4"))
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    with pytest.raises(DiskFull, match=r"disk full while writing to .*checkpoint-4.*last intact checkpoint is .*checkpoint-2 \(update 2\)"):
        train(config(base_dir, text_file, tmp_path / "run"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    train(config(base_dir, text_file, tmp_path / "run"), resume=True)  # and the run goes on from there
    assert [r["update"] for r in read_log(tmp_path / "run")] == list(range(1, 7))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_update"] == 2
