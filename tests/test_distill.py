"""Distillation from the full model (`ouroboros_train.distill`, `ouroboros train --distill`): the loss is the KL a
direct computation gives, the teacher is the base model (the adapter disabled; for pruned_lora the whole unpruned
base), weight 0 is the plain cross-entropy, the temperature enters as documented, and the CLI records, resumes and
refuses what it should. Tiny models only."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ouro_config, randomize_adapter, tiny_model

SEQ = 16
SPLIT = dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3, r=8)
pytestmark = pytest.mark.usefixtures("one_thread")


def student(arch: str, method: str):
    """A PEFT model whose adapted logits differ from the base model's: a randomised Ouroboros adapter, or the
    pruned_lora arm with its LoRA B moved off zero."""
    from peft import get_peft_model

    from ouroboros_train.pruned import build_pruned_lora

    torch.manual_seed(0)
    if method == "ouroboros":
        return randomize_adapter(get_peft_model(tiny_model(arch), ouro_config()))
    model = build_pruned_lora(tiny_model(arch), SPLIT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def batch(rows: int = 2, seed: int = 0, pad: int = 5) -> dict:
    """Random word ids; the last `pad` positions of row 1 are padding (mask 0, label -100), so rows differ in count."""
    ids = torch.randint(4, 96, (rows, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad:
        mask[1, -pad:] = 0
        labels[1, -pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def by_hand(teacher: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """(mean CE, mean T^2 * sum_v p log(p / q)) over the positions with a next-token label, written out."""
    valid = labels[:, 1:] != -100
    t = teacher[:, :-1][valid].double() / temperature
    s = student_logits[:, :-1][valid].double()
    log_p = t - torch.logsumexp(t, -1, keepdim=True)
    log_q = s / temperature - torch.logsumexp(s / temperature, -1, keepdim=True)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2
    log_q1 = s - torch.logsumexp(s, -1, keepdim=True)
    ce = -log_q1.gather(-1, labels[:, 1:][valid][:, None]).mean()
    return float(ce), float(kl)


def base_logits(arch: str, method: str, inputs: dict) -> torch.Tensor:
    """The teacher computed apart: a fresh copy of the plain base model (the same seed gives the same weights)."""
    with torch.no_grad():
        return tiny_model(arch)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def distill_trainer(tmp_path, model, weight, temperature, **args):
    from transformers import TrainingArguments

    from ouroboros_train import OuroborosDistillTrainer

    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none", use_cpu=True,
              disable_tqdm=True, save_strategy="no", logging_steps=1, train_sampling_strategy="sequential")
    kw.update(args)
    return OuroborosDistillTrainer(model=model, args=TrainingArguments(**kw), distill_weight=weight, distill_temperature=temperature)


METHODS = ["ouroboros", "pruned_lora"]


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weight_one_temperature_one_is_the_kl_from_the_base_model_computed_by_hand(tmp_path, arch, method):
    model = student(arch, method)
    inputs = batch()
    with torch.no_grad():
        adapted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    _, kl = by_hand(base_logits(arch, method, inputs), adapted, inputs["labels"])
    trainer = distill_trainer(tmp_path, model, weight=1.0, temperature=1.0)
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    assert kl > 1e-3  # the adapted model is not the base: there is something to distil
    assert float(loss.detach()) == pytest.approx(kl, rel=1e-5)
    # the public function gives the same number from the two logits
    from ouroboros_train import distillation_loss

    teacher = base_logits(arch, method, inputs)
    assert float(distillation_loss(adapted, teacher, inputs["labels"], weight=1.0, temperature=1.0)) == pytest.approx(kl, rel=1e-5)


def test_the_logged_loss_of_an_update_is_the_kl_over_its_global_batch_with_gradient_accumulation(tmp_path):
    """Two micro-batches with different numbers of targets: Trainer's num_items_in_batch makes the update's loss the
    per-target mean over both (not the mean of the two means), as for its own CE."""
    from transformers import TrainerCallback

    model = student("llama", "ouroboros")
    rows = [batch(seed=0, pad=0), batch(seed=1, pad=9)]
    items = [{k: v[i] for k, v in b.items()} for b in rows for i in range(2)]
    with torch.no_grad():
        teacher = torch.cat([base_logits("llama", "ouroboros", b) for b in rows])
        adapted = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in rows])
    labels = torch.cat([b["labels"] for b in rows])
    _, kl = by_hand(teacher, adapted, labels)
    logged = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logged.append(logs)

    trainer = distill_trainer(tmp_path, model, 1.0, 1.0, gradient_accumulation_steps=2, learning_rate=1e-3)
    trainer.train_dataset = items
    trainer.add_callback(Spy())
    trainer.train()
    assert len(logged) == 1
    assert logged[0]["loss"] == pytest.approx(kl, rel=1e-4)
    assert logged[0]["distill_kl"] == pytest.approx(kl, rel=1e-4)  # the per-target mean of the term, logged beside


@pytest.mark.parametrize("method", METHODS)
def test_the_teacher_is_the_base_model_not_the_adapted_one(method):
    from ouroboros_evaluate.evaluate import pruned_layers
    from ouroboros_train import teacher_logits

    model = student("llama", method)
    model.train()
    inputs = batch()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    teacher = teacher_logits(model, inputs)
    base = base_logits("llama", method, inputs)
    assert torch.allclose(teacher, base, atol=1e-5)
    assert float((teacher - adapted).abs().max()) > 0.05  # would fail if the teacher were the adapted model
    if method == "pruned_lora":  # nor the pruned model without its LoRA: the whole unpruned base
        with torch.no_grad(), pruned_layers(tiny_model("llama"), model.pruned_lora_plan.kept) as pruned:
            alone = pruned(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert float((teacher - alone).abs().max()) > 0.05
    # the model is as it was: adapter on, same trainable parameters, train mode, no gradient from the teacher
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not teacher.requires_grad
    with torch.no_grad():
        again = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(again, adapted)


@pytest.mark.parametrize("method", METHODS)
def test_weight_zero_is_the_plain_cross_entropy_and_runs_no_teacher(tmp_path, method, monkeypatch):
    from transformers import Trainer, TrainingArguments

    import ouroboros_train.distill as distill

    model = student("llama", method)
    model.train()
    inputs = batch()
    args = TrainingArguments(str(tmp_path / "plain"), report_to="none", use_cpu=True)
    plain = Trainer(model=model, args=args)
    monkeypatch.setattr(distill, "teacher_logits", lambda *a, **k: pytest.fail("a teacher forward at weight 0"))
    for temperature in (1.0, 2.0):  # the CE is the model's own distribution whatever T
        trainer = distill_trainer(tmp_path, model, weight=0.0, temperature=temperature)
        for items in (None, torch.tensor(13)):  # the micro-batch's own mean, and Trainer's global normalisation
            ce = plain.compute_loss(model, dict(inputs), num_items_in_batch=items)
            mine = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
            assert float(mine.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_softens_both_distributions_and_scales_the_kl_by_its_square(tmp_path, temperature):
    model = student("llama", "ouroboros")
    inputs = batch()
    with torch.no_grad():
        adapted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    teacher = base_logits("llama", "ouroboros", inputs)
    ce, kl = by_hand(teacher, adapted, inputs["labels"], temperature)
    _, kl_1 = by_hand(teacher, adapted, inputs["labels"], 1.0)
    assert kl != pytest.approx(kl_1, rel=1e-3)  # the temperature changes the term
    model.train()
    for weight in (1.0, 0.3):
        trainer = distill_trainer(tmp_path, model, weight, temperature)
        loss = float(trainer.compute_loss(model, dict(inputs)).detach())
        # documented: (1 - w) * CE (at T = 1, the data's own likelihood) + w * T^2 * KL(softmax(t / T) || softmax(s / T))
        assert loss == pytest.approx((1 - weight) * ce + weight * kl, rel=1e-5)


@pytest.mark.parametrize("weight, temperature, message", [
    (-0.1, 1.0, "distill_weight must be a number in [0, 1]"),
    (1.5, 1.0, "distill_weight must be a number in [0, 1]"),
    (float("nan"), 1.0, "distill_weight must be a number in [0, 1]"),
    (0.5, 0.0, "distill_temperature must be a finite number > 0"),
    (0.5, -1.0, "distill_temperature must be a finite number > 0"),
    (0.5, float("inf"), "distill_temperature must be a finite number > 0"),
])
def test_the_trainer_refuses_bad_settings_before_any_work(tmp_path, weight, temperature, message):
    from ouroboros_train import OuroborosDistillTrainer

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        OuroborosDistillTrainer(model=None, args=None, distill_weight=weight, distill_temperature=temperature)


def test_distillation_needs_labels_and_a_peft_model(tmp_path):
    from ouroboros_train import teacher_logits

    model = student("llama", "ouroboros")
    trainer = distill_trainer(tmp_path, model, 0.5, 1.0)
    inputs = batch()
    del inputs["labels"]
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(model, inputs)
    with pytest.raises(ValueError, match="needs a PEFT model"):
        teacher_logits(tiny_model("llama"), inputs)


# ----------------------------------------------------------------------------------------------------
# ouroboros train --distill
# ----------------------------------------------------------------------------------------------------


def cli_args(base_dir, text_file, out, *extra, batch_size=2):
    return ["train", "--base", str(base_dir), "--train-text", str(text_file), "--out", str(out), "--prelude", "1", "--coda", "1",
            "--steps", "2", "--rank", "8", "--seq-len", "32", "--batch-size", str(batch_size), "--updates", "4", "--warmup", "1",
            "--lr", "3e-3", "--checkpoint-every", "2", "--no-progress", *extra]


def cut_copy(run, out, after: int):
    """Train `run`'s stored config again into `out`, stopped by an exception after update `after`; returns the config."""
    from ouroboros_train.train import TrainConfig, train

    cfg = TrainConfig.from_json(json.loads((Path(run) / "config.json").read_text()))
    cfg.out = str(out)

    class Cut(Exception):
        pass

    def stop(update, loss):
        if update == after:
            raise Cut

    with pytest.raises(Cut):
        train(cfg, on_update=stop)
    return cfg


def train_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines() if '"train"' in line]


@pytest.mark.parametrize("method", METHODS)
def test_cli_distill_records_its_settings_and_logs_both_terms(base_dir, text_file, tmp_path, method):
    from ouroboros_plugins.cli import main

    run = tmp_path / "run"
    assert main(cli_args(base_dir, text_file, run, "--method", method, "--distill", "--distill-weight", "0.7",
                         "--distill-temperature", "2")) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["distill"], config["distill_weight"], config["distill_temperature"], config["method"]) == (True, 0.7, 2.0, method)
    rows = train_log(run)
    assert len(rows) == 4
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["ce"]) and r["kl"] >= 0 and math.isfinite(r["kl"])
        assert r["loss"] == pytest.approx(0.3 * r["ce"] + 0.7 * r["kl"], rel=1e-5)  # one process, no accumulation
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"] == {"weight": 0.7, "temperature": 2.0} and summary["method"] == method


def test_cli_resume_keeps_the_distillation_and_refuses_a_contradicting_flag(base_dir, text_file, tmp_path, capsys):
    from ouroboros_plugins.cli import main
    from ouroboros_train.train import TrainConfig, train

    extra = ("--distill", "--distill-weight", "0.7", "--distill-temperature", "2")
    assert main(cli_args(base_dir, text_file, tmp_path / "full", *extra)) == 0
    # the same run cut after update 3 (checkpoint at 2), then resumed by the CLI with no distillation flag
    cfg = cut_copy(tmp_path / "full", tmp_path / "cut", after=3)
    before = (tmp_path / "cut" / "log.jsonl").read_text()
    for flag, value in (("--distill-weight", "0.5"), ("--distill-temperature", "1"), ("--method", "pruned_lora"),
                        ("--lora-layers", "recurrent")):
        assert main(["train", "--out", str(tmp_path / "cut"), "--resume", flag, value]) == 2
        assert flag in capsys.readouterr().err
        assert (tmp_path / "cut" / "log.jsonl").read_text() == before
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert json.loads((tmp_path / "cut" / "config.json").read_text()) == {**json.loads((tmp_path / "full" / "config.json").read_text()),
                                                                          "out": str(tmp_path / "cut")}
    full, cut = train_log(tmp_path / "full"), train_log(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]  # the resumed updates are distilled as before
    assert [r["kl"] for r in cut] == [r["kl"] for r in full]
    # the API refuses a changed setting too
    with pytest.raises(ValueError, match="distill_temperature: run has 2.0, asked 1.0"):
        train(TrainConfig(**{**cfg.to_json(), "distill_temperature": 1.0}), resume=True)


def test_cli_distils_by_default_and_no_distill_trains_on_the_cross_entropy(base_dir, text_file, tmp_path):
    """Issue 19 item 5: distillation is `ouroboros train`'s default (and TrainConfig's); --no-distill is CE alone."""
    from ouroboros_plugins.cli import main
    from ouroboros_train.train import TrainConfig

    assert TrainConfig(base="b", out="o").distill is True
    assert main(cli_args(base_dir, text_file, tmp_path / "default", "--distill-weight", "0.7")) == 0
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert (config["distill"], config["distill_weight"], config["distill_temperature"]) == (True, 0.7, 1.0)
    rows = train_log(tmp_path / "default")
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(0.3 * r["ce"] + 0.7 * r["kl"], rel=1e-5) for r in rows)

    assert main(cli_args(base_dir, text_file, tmp_path / "ce", "--no-distill")) == 0
    assert json.loads((tmp_path / "ce" / "config.json").read_text())["distill"] is False
    ce_rows = train_log(tmp_path / "ce")
    assert len(ce_rows) == 4 and all("kl" not in r for r in ce_rows)
    assert json.loads((tmp_path / "ce" / "summary.json").read_text())["distill"] is None
    # same data and init: the first update's loss is the same cross-entropy either way; the updates then differ
    assert ce_rows[0]["loss"] == pytest.approx(rows[0]["ce"], rel=1e-5)
    assert ce_rows[-1]["loss"] != pytest.approx(rows[-1]["ce"], rel=1e-6)


def test_default_distillation_with_sampled_depth_resumes_exactly(base_dir, text_file, tmp_path):
    """The default loss meets per-update depth sampling and resume: a run cut after update 3 and resumed gives the
    uncut run's losses and KL terms (the teacher ignores the depth; the student's depth is redrawn from the seed)."""
    from ouroboros_plugins.cli import main

    extra = ("--sample-depth", "1:3", "--max-steps", "3")
    assert main(cli_args(base_dir, text_file, tmp_path / "full", *extra)) == 0
    cfg = cut_copy(tmp_path / "full", tmp_path / "cut", after=3)
    assert cfg.distill and cfg.depth_range == (1, 3)
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = train_log(tmp_path / "full"), train_log(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full] and all(r["kl"] > 0 for r in full)
    assert len({r["depth"] for r in full}) > 1  # the depth really was sampled


def test_a_run_folder_from_before_distillation_resumes_on_the_cross_entropy(base_dir, text_file, tmp_path):
    """config.json files written before the `distill` field existed have no such key: they trained on the CE, and a
    resume must not switch them to the new default."""
    from ouroboros_plugins.cli import main
    from ouroboros_train.train import TrainConfig

    assert main(cli_args(base_dir, text_file, tmp_path / "old", "--no-distill")) == 0
    stored = json.loads((tmp_path / "old" / "config.json").read_text())
    old = {k: v for k, v in stored.items() if k not in ("distill", "distill_weight", "distill_temperature")}
    assert TrainConfig.from_json(old).distill is False
    assert TrainConfig.from_json(stored).distill is False and TrainConfig.from_json({**stored, "distill": True}).distill is True


@pytest.mark.parametrize("flags, message", [
    (["--distill", "--distill-weight", "1.5"], "distill_weight (--distill-weight) must be a number in [0, 1]"),
    (["--distill", "--distill-weight", "-0.5"], "distill_weight (--distill-weight) must be a number in [0, 1]"),
    (["--distill", "--distill-weight", "nan"], "distill_weight (--distill-weight) must be a number in [0, 1]"),
    (["--distill", "--distill-temperature", "0"], "distill_temperature (--distill-temperature) must be a finite number > 0"),
    (["--distill", "--distill-temperature", "-2"], "distill_temperature (--distill-temperature) must be a finite number > 0"),
    (["--distill", "--distill-temperature", "inf"], "distill_temperature (--distill-temperature) must be a finite number > 0"),
    (["--no-distill", "--distill-weight", "0.3"], "--distill-weight sets the distillation loss, which --no-distill turns off"),
    (["--no-distill", "--distill-temperature", "2"], "--distill-temperature sets the distillation loss, which --no-distill turns off"),
    (["--lora-r", "4"], "--lora-r is the rank of --method pruned_lora"),
    (["--lora-layers", "recurrent"], "--lora-layers places the LoRA of --method pruned_lora"),
    (["--method", "pruned_lora", "--lora-layers", "recurrent"], "the LoRA needs rank 100 on 1 layer(s) (recurrent)"),
    (["--method", "pruned_lora", "--sample-depth", "1:2"], "depth_range (--sample-depth) needs an Ouroboros adapter"),
])
def test_cli_bad_distillation_settings_fail_naming_the_flag_before_anything_is_written(base_dir, text_file, tmp_path, capsys,
                                                                                       flags, message):
    from ouroboros_plugins.cli import main

    run = tmp_path / "run"
    assert main(cli_args(base_dir, text_file, run, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------
# two processes
# ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", [[], ["--method", "pruned_lora"], ["--method", "pruned_lora", "--lora-layers", "recurrent",
                                                                      "--modulation", "static"]],
                         ids=["ouroboros", "pruned_lora", "pruned_lora_recurrent"])
def test_two_processes_distil_what_one_process_distils(base_dir, text_file, tmp_path, method):
    """torchrun -n 2 --batch-size 1 == one process --batch-size 2 with --distill: the teacher forward runs on the
    unwrapped model (not through DDP; for pruned_lora the whole unpruned base) and the loss is normalised over the
    global batch."""
    exe = str(Path(sys.executable).with_name("ouroboros"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "--no-python", exe]
    extra = ["--distill", "--threads", "1", "--grad-accum", "2", "--updates", "3", *method]
    one = subprocess.run([exe] + cli_args(base_dir, text_file, tmp_path / "one", *extra, batch_size=2), capture_output=True,
                         text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(torchrun + cli_args(base_dir, text_file, tmp_path / "two", *extra, batch_size=1), capture_output=True,
                         text=True, timeout=240, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b)) <= 1e-4
    from safetensors.torch import load_file

    ta, tb = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert ta.keys() == tb.keys() and max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-4
    stack = tmp_path / "two" / "adapter" / "pruned_stack.json"  # each run is the method asked for
    assert stack.is_file() == bool(method)
    if "recurrent" in method:
        assert json.loads(stack.read_text())["plan"]["lora_layers"] == [3] and all(".layers.3." in k for k in tb)
