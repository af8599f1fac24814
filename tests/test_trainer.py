"""The training engine users scale with: the public calibration, `OuroborosCallback` in a plain `transformers.Trainer`,
`ouroboros train` on two processes (torchrun, gloo) against one, and `kill -9` then `--resume`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ouro_config, save_base, tiny_model

SEQ = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def peft_model(arch="llama", **overrides):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_model(arch), ouro_config(**overrides))


def token_batch(rows=2, seq=SEQ, seed=0):
    return torch.randint(4, 96, (rows, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# calibrate_step_norms: public, on any PeftModel with an active Ouroboros adapter
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_public_calibration_sets_each_row_to_the_median_rms_its_step_produces(arch):
    from ouroboros_peft import calibrate_step_norms

    model = peft_model(arch, num_steps=2, max_steps=3)
    adapter = model.base_model.model.model.ouroboros_adapter["default"]
    ids = token_batch()
    model.train()
    values = calibrate_step_norms(model, ids)
    assert len(values) == 3  # every row of the tables, not only num_steps
    for t, v in enumerate(values):
        assert torch.all(adapter.norms.weight[t] == v) and abs(v - 1.0) > 1e-3
    assert model.training and model.base_model.model.model.plans["default"].num_steps == 2  # mode and depth restored
    assert not adapter._step_hooks  # its hook is gone
    # the values are the RMS the recurrent layer really produces at each step once the rows before it are calibrated
    seen = []
    handle = adapter.register_step_hook(lambda a, step, u, h: seen.append(float(u.float().pow(2).mean(-1).sqrt().median())))
    model.base_model.model.model.set_num_steps(3)
    with torch.no_grad():
        model.eval()(input_ids=ids)
    handle.remove()
    assert seen == pytest.approx(values, rel=1e-5)
    # deterministic: a second call on the calibrated model finds the same values
    assert calibrate_step_norms(model, ids) == pytest.approx(values, rel=1e-6)


def test_calibration_ignores_padding_when_given_the_attention_mask():
    from ouroboros_peft import calibrate_step_norms

    ids = token_batch(rows=2, seq=SEQ)
    padded = torch.cat([ids, torch.zeros(2, 8, dtype=torch.long)], dim=1)  # right padding
    mask = torch.cat([torch.ones(2, SEQ, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)], dim=1)
    clean = calibrate_step_norms(peft_model(), ids)
    masked = calibrate_step_norms(peft_model(), padded, mask)
    unmasked = calibrate_step_norms(peft_model(), padded)
    assert masked == pytest.approx(clean, rel=1e-5)
    assert unmasked != pytest.approx(clean, rel=1e-5)  # padding does change the median when not masked


def test_calibration_refuses_a_model_without_an_active_ouroboros_adapter():
    from peft import LoraConfig, get_peft_model

    from ouroboros_peft import calibrate_step_norms

    ids = token_batch()
    with pytest.raises(ValueError, match="has no Ouroboros adapter"):
        calibrate_step_norms(tiny_model("llama"), ids)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=4))
    with pytest.raises(ValueError, match="has no Ouroboros adapter"):
        calibrate_step_norms(lora, ids)
    model = peft_model()
    before = model.base_model.model.model.ouroboros_adapter["default"].norms.weight.clone()
    with model.disable_adapter(), pytest.raises(ValueError, match="not active"):
        calibrate_step_norms(model, ids)
    with pytest.raises(ValueError, match="input_ids must be"):
        calibrate_step_norms(model, ids[0])
    assert torch.equal(model.base_model.model.model.ouroboros_adapter["default"].norms.weight, before)


# ----------------------------------------------------------------------------------------------------
# OuroborosCallback in the user's own Trainer
# ----------------------------------------------------------------------------------------------------


class Windows(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        self.ids = token_batch(rows=n, seed=seed)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def user_trainer(tmp_path, model, callback, updates=4, **args):
    from transformers import Trainer, TrainingArguments

    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=updates, learning_rate=3e-3,
              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
              train_sampling_strategy="sequential", logging_nan_inf_filter=False)
    kw.update(args)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=Windows(2 * updates), callbacks=[callback])


def test_callback_calibrates_on_the_first_batch_and_samples_the_depth_per_update(tmp_path):
    from ouroboros_peft import calibrate_step_norms
    from ouroboros_train import OuroborosCallback, depth_at

    model = peft_model(num_steps=2, max_steps=4)
    reference = calibrate_step_norms(peft_model(num_steps=2, max_steps=4), Windows(8).ids[:2])  # the same fresh adapter
    callback = OuroborosCallback(depth_range=(1, 4), seed=3)
    depths = []

    from transformers import TrainerCallback

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            depths.append(model.base_model.model.model.plans["default"].num_steps)

    trainer = user_trainer(tmp_path, model, callback, updates=6)
    trainer.add_callback(Spy())
    trainer.train()
    assert callback.calibrated == pytest.approx(reference, rel=1e-6)
    assert depths == [depth_at(u, 3, (1, 4), 2) for u in range(6)] and len(set(depths)) > 1
    assert model.base_model.model.model.plans["default"].num_steps == 2  # the trained depth is back after training


def test_callback_does_not_calibrate_when_told_not_to_or_when_resuming(tmp_path):
    from transformers import TrainerState

    from ouroboros_train import OuroborosCallback

    model = peft_model()
    weight = model.base_model.model.model.ouroboros_adapter["default"].norms.weight
    callback = OuroborosCallback(calibrate=False)
    user_trainer(tmp_path, model, callback, updates=1, learning_rate=0.0).train()
    assert callback.calibrated is None and torch.all(weight == 1.0)
    resumed = OuroborosCallback()
    state = TrainerState()
    state.global_step = 5
    resumed.on_train_begin(None, state, None, model=model, train_dataloader=[{"input_ids": token_batch()}])
    assert resumed.calibrated is None and torch.all(weight == 1.0)


def test_callback_stops_on_a_nan_gradient_before_the_optimizer_applies_it(tmp_path):
    from transformers import TrainerCallback

    from ouroboros_train import OuroborosCallback, TrainingDiverged

    model = peft_model()

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    model.base_model.model.model.ouroboros_adapter["default"].norms.weight.fill_(float("nan"))

    trainer = user_trainer(tmp_path, model, OuroborosCallback(calibrate=False), updates=4)
    trainer.add_callback(Poison())
    with pytest.raises(TrainingDiverged, match="NaN/inf at update 3"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_callback_refuses_a_depth_range_deeper_than_the_tables(tmp_path):
    from ouroboros_train import OuroborosCallback

    with pytest.raises(ValueError, match="depth_range"):
        OuroborosCallback(depth_range=(3, 2))
    trainer = user_trainer(tmp_path, peft_model(num_steps=3), OuroborosCallback(depth_range=(1, 5)), updates=1)
    with pytest.raises(ValueError, match="max_steps >= 5"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------
# ouroboros train: two processes against one, kill -9 then --resume
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port())]


def ouroboros_cmd(nproc: int) -> list:
    exe = str(Path(sys.executable).with_name("ouroboros"))
    return [exe] if nproc == 1 else torchrun(nproc) + ["--no-python", exe]


def train_args(base_dir, text_file, out, batch_size, updates=6, extra=()):
    return ["train", "--base", str(base_dir), "--train-text", str(text_file), "--out", str(out), "--prelude", "1", "--coda", "1",
            "--steps", "2", "--max-steps", "3", "--sample-depth", "1:3", "--rank", "8", "--seq-len", str(SEQ),
            "--batch-size", str(batch_size), "--grad-accum", "2", "--updates", str(updates), "--lr", "3e-3", "--warmup", "2",
            "--checkpoint-every", "2", "--threads", "1", "--no-progress", *extra]


def run_cli(cmd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run):
    return [r["loss"] for r in (json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def adapter_tensors(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(base_dir, text_file, tmp_path):
    """torchrun -n 2 --batch-size 2 == one process --batch-size 4: same per-update losses and the same adapter, with
    calibration, sampled depth and gradient accumulation on; only rank 0 writes the run folder."""
    one = run_cli(ouroboros_cmd(1) + train_args(base_dir, text_file, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(ouroboros_cmd(2) + train_args(base_dir, text_file, tmp_path / "two", 2))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and len(set(a)) > 1
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-3
    ta, tb = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert sorted(ta) == sorted(tb)
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-3
    moved = [k for k in ta if "controller" in k and float(ta[k].abs().max()) > 0]
    assert moved  # the zero-initialised Controller heads trained
    assert two.stdout.count("trained 6 updates") == 1  # rank 0 alone reports
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["train_tokens"] == 6 * 8 * SEQ

    # resuming a two-process run with one process would change the global batch: refused before any work
    log_before = (tmp_path / "two" / "log.jsonl").read_text()
    again = run_cli(ouroboros_cmd(1) + ["train", "--out", str(tmp_path / "two"), "--resume"])
    assert again.returncode != 0 and "world_size: run has 2, asked 1" in again.stderr
    assert (tmp_path / "two" / "log.jsonl").read_text() == log_before


def test_more_processes_than_sequences_is_refused_before_anything_is_written(base_dir, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(" ".join(f"w{4 + i % 90}" for i in range(3 * SEQ)))  # 3 sequences; 2 processes x 2 x 2 need 8
    result = run_cli(ouroboros_cmd(2) + train_args(base_dir, small, tmp_path / "run", 2))
    assert result.returncode != 0
    assert "training corpus too small" in result.stderr and "x 2 processes" in result.stderr
    assert not (tmp_path / "run").exists()


def test_kill_9_mid_run_then_resume_gives_the_identical_loss_curve(base_dir, text_file, tmp_path):
    full = run_cli(ouroboros_cmd(1) + train_args(base_dir, text_file, tmp_path / "full", 2, updates=10))
    assert full.returncode == 0, full.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a little slower per update than usual, so that the kill lands mid-run
    args = train_args(base_dir, text_file, tmp_path / "cut", 2, updates=10)
    proc = subprocess.Popen(ouroboros_cmd(1) + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut_at = len(log.read_text().splitlines())
    assert proc.returncode == -signal.SIGKILL and 5 <= cut_at < 10, f"killed after {cut_at} updates"
    resumed = run_cli(ouroboros_cmd(1) + ["train", "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    ta, tb = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_from_update"] in (4, 6, 8) and summary["resumed_from_update"] <= cut_at


def test_readme_trainer_example_runs_as_written(tmp_path, monkeypatch):
    """The README's PEFT + Trainer block, run as printed on a tiny 20-layer Llama (so its 8 + 8 split fits), with only
    the paths and the number of updates changed."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "OuroborosCallback" in b)
    base = tmp_path / "base"
    save_base(base, "llama", layers=20)
    paragraphs = [" ".join(f"w{4 + (i * 7 + j) % 92}" for j in range(40)) for i in range(12)]
    (tmp_path / "train.txt").write_text("\n\n".join(paragraphs))
    code = block.replace('"path/to/qwen2-or-llama"', repr(str(base))).replace("max_steps=221", "max_steps=3")
    assert code.count(str(base)) == 1 and "max_steps=3," in code  # the substitutions found their targets
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    callback = next(c for c in scope["trainer"].callback_handler.callbacks if type(c).__name__ == "OuroborosCallback")
    assert callback.calibrated is not None and len(callback.calibrated) == 6  # every row of max_steps=6
    assert scope["full"].shape[-1] == 96


def test_callback_calibrates_on_the_global_first_batch_under_two_processes(tmp_path):
    """A user's Trainer with OuroborosCallback under torchrun -n 2 (2 sequences per process): every process calibrates
    on the global first batch (both processes' rows, in rank order), so the values, losses and adapter are those of
    one process with 4 sequences."""
    from safetensors.torch import load_file

    script = str(Path(__file__).with_name("callback_ddp.py"))
    one = run_cli([sys.executable, script, "--out", str(tmp_path / "one"), "--batch-size", "4"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(torchrun(2) + [script, "--out", str(tmp_path / "two"), "--batch-size", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert len(a["calibrated"]) == 3 and b["calibrated"] == pytest.approx(a["calibrated"], rel=1e-6)
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    ta, tb, tb1 = (load_file(str(tmp_path / f)) for f in ("one/adapter-0.safetensors", "two/adapter-0.safetensors",
                                                           "two/adapter-1.safetensors"))
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-5
    assert all(torch.equal(tb[k], tb1[k]) for k in tb)  # every process ends with the same adapter
