"""Training loop and evaluation on tiny models: labels, schedule, resume, divergence, bad input, `ouroboros eval`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_script, random_manifest
from ouroboros_train.train import TrainConfig, TrainingDiverged, batch_at, build_model, last_checkpoint, read_log, train

SEQ = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def config(base_dir, text_file, out, **kw):
    adapter = dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3, r=8)
    adapter.update(kw.pop("adapter", {}))
    # the cross-entropy alone: these tests pin the training loop's own arithmetic (tests/test_distill.py: the default)
    values = dict(base=str(base_dir), out=str(out), adapter=adapter, train_text=str(text_file), seq_len=SEQ, batch_size=2,
                  max_updates=6, lr=3e-3, warmup=2, checkpoint_every=2, progress=False, distill=False)
    values.update(kw)
    return TrainConfig(**values)


def train_losses(run_dir):
    return [r["loss"] for r in read_log(run_dir) if r["kind"] == "train"]


def test_trainer_schedule_warms_up_then_decays_towards_the_floor(base_dir, text_file, tmp_path):
    """Trainer's `cosine_with_min_lr`: linear warmup from 0 over `warmup` updates, then cosine from lr towards
    lr * min_lr_ratio (reached after the last update); the lr logged per update is the one that update used."""
    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=12, lr=1e-3, warmup=4, min_lr_ratio=0.1, checkpoint_every=12)
    train(cfg)
    lrs = [r["lr"] / cfg.lr for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine: never rises after warmup
    assert 0.1 < lrs[-1] < 0.15 and 0.1 < lrs[8] < 1.0


def test_first_logged_loss_is_next_token_loss_shifted_once(base_dir, text_file, tmp_path):
    """The loss the loop optimises is CE(logits[:, :-1], ids[:, 1:]) of the initial model on the first batch:
    neither unshifted nor shifted twice (the reference implementation's bug)."""
    from ouroboros_train.train import calibrate_step_norms, load_base, text_token_stream

    # A text where token t is always followed by t + 1, and a head that maps the embedding of t to the logit of t + 1:
    # the base then predicts the next token well, and only the correct pairing of logits and targets scores low.
    text_file = tmp_path / "counting.txt"
    text_file.write_text(" ".join(f"w{4 + i % 92}" for i in range(2000)))

    def sharp_base():
        base, tok, _ = load_base(str(base_dir))
        with torch.no_grad():
            emb = base.model.embed_tokens.weight
            base.lm_head.weight.zero_()
            base.lm_head.weight[5:96] = 40.0 * emb[4:95] / emb[4:95].norm(dim=-1, keepdim=True)
            base.lm_head.weight[4] = 40.0 * emb[95] / emb[95].norm()
        return base, tok

    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=1)
    base, tok = sharp_base()
    train(cfg, base_model=base, tokenizer=tok)
    logged = train_losses(tmp_path / "run")[0]

    base, tok = sharp_base()
    torch.manual_seed(cfg.seed)
    model = build_model(base, cfg.adapter)
    ids = batch_at(text_token_stream(tok, str(text_file)), 0, cfg.batch_size, SEQ, cfg.seed)
    calibrate_step_norms(model, ids)  # what train() does first (cfg.calibrate_norms defaults to True)
    model.train()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ce = lambda lg, tgt: torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1)).item()  # noqa: E731
    once = ce(logits[:, :-1], ids[:, 1:])
    twice = ce(logits[:, :-2], ids[:, 2:])
    unshifted = ce(logits, ids)
    assert logged == pytest.approx(once, abs=1e-5)
    # the paper-faithful knob really reproduces the reference's double shift
    cfg2 = config(base_dir, text_file, tmp_path / "run2", max_updates=1, label_offset=2)
    base2, tok2 = sharp_base()
    train(cfg2, base_model=base2, tokenizer=tok2)
    assert train_losses(tmp_path / "run2")[0] == pytest.approx(twice, abs=1e-5)
    assert once < 0.5 * min(twice, unshifted)  # the construction works: the base really predicts t + 1


class Interrupt(Exception):
    """Raised from `on_update` to cut a run short, as a crash would."""


def stop_at(update: int):
    def on_update(u, loss):
        if u == update:
            raise Interrupt

    return on_update


@pytest.mark.parametrize("depth_range", [None, (1, 3)], ids=["fixed-depth", "sampled-depth"])
def test_interrupted_then_resumed_run_gives_the_same_loss_curve(base_dir, text_file, tmp_path, depth_range):
    extra = dict(depth_range=depth_range, adapter=dict(max_steps=3), grad_accum=2, max_updates=7)
    full = train(config(base_dir, text_file, tmp_path / "full", **extra))
    cfg = config(base_dir, text_file, tmp_path / "cut", **extra)
    with pytest.raises(Interrupt):
        train(cfg, on_update=stop_at(5))  # checkpoint at 4; update 5 is lost and must be redone identically
    assert last_checkpoint(tmp_path / "cut").name == "checkpoint-4"
    resumed = train(cfg, resume=True)

    reference = train_losses(tmp_path / "full")
    assert len(reference) == 7 and len(set(reference)) > 1
    assert train_losses(tmp_path / "cut") == reference
    if depth_range:
        depths = [r["depth"] for r in read_log(tmp_path / "cut") if r["kind"] == "train"]
        assert len(set(depths)) > 1 and depths == [r["depth"] for r in read_log(tmp_path / "full") if r["kind"] == "train"]
    a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, a[name]), name
    assert resumed.summary["resumed_from_update"] == 4


def test_resume_refuses_changed_training_settings_and_accepts_changed_bookkeeping(base_dir, text_file, tmp_path):
    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=3, checkpoint_every=1)
    with pytest.raises(Interrupt):
        train(cfg, on_update=stop_at(3))
    log_before = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"these differ: lr: run has"):
        train(dataclasses.replace(cfg, lr=cfg.lr * 2), resume=True)
    assert (tmp_path / "run" / "log.jsonl").read_text() == log_before  # refused before any work
    assert not (tmp_path / "run" / "summary.json").exists()
    # thread count and checkpoint cadence are not training settings: the run continues and finishes
    train(dataclasses.replace(cfg, threads=1, checkpoint_every=5, progress=False), resume=True)
    assert len(train_losses(tmp_path / "run")) == 3 and (tmp_path / "run" / "summary.json").is_file()


def test_resume_never_restarts_over_checkpoints_it_cannot_read(base_dir, text_file, tmp_path):
    """A run folder from the hand-written loop (checkpoints/ckpt-XXXXXX, no Trainer checkpoint) is refused on --resume
    with nothing changed, instead of being restarted from update 0 over its checkpoints."""
    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=2, checkpoint_every=2)
    train(cfg)
    old = tmp_path / "run" / "checkpoints" / "ckpt-000002"
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").rename(old)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="hand-written training loop.*ckpt-000002"):
        train(cfg, resume=True)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_resume_before_the_first_checkpoint_restarts_in_place(base_dir, text_file, tmp_path):
    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=4, checkpoint_every=4)
    with pytest.raises(Interrupt):
        train(cfg, on_update=stop_at(2))  # no checkpoint yet
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = train(cfg, resume=True)
    assert [r["update"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and result.summary["resumed_from_update"] == 0


def test_pure_bf16_rounds_away_the_steps_of_large_parameters(base_dir, text_file, tmp_path):
    """The reference's pure-bf16 setup: AdamW steps (~lr) smaller than half a bf16 spacing vanish, so the gate bias
    (logit(0.12) = -1.99, spacing 2^-7) never moves at lr 1e-3, while zero-initialised weights train; with fp32
    trainables the same run moves both. Checked with the study script's own comparison (evals/bf16_stall.py)."""
    stall = load_script("bf16_stall", Path(__file__).resolve().parents[1] / "evals" / "bf16_stall.py")
    shares = {}
    for label, pure in (("fp32", False), ("bf16", True)):
        cfg = config(base_dir, text_file, tmp_path / label, max_updates=4, lr=1e-3, warmup=1, min_lr_ratio=1.0,
                     calibrate_norms=False, pure_bf16=pure)
        initial = stall.initial_trainables(cfg)
        result = train(cfg)
        assert {p.dtype for p in stall.trainables(result.model).values()} == {torch.bfloat16 if pure else torch.float32}
        shares[label] = {g: v["share_changed"] for g, v in stall.changed_share(initial, stall.trainables(result.model)).items()}
    assert shares["fp32"]["gate bias"] == 1.0 and shares["bf16"]["gate bias"] == 0.0
    assert shares["fp32"]["gate weight"] > 0.9 and shares["bf16"]["gate weight"] > 0.9
    assert shares["bf16"]["controller"] > 0.0


def test_checkpoints_are_trainers_and_safe_to_read(base_dir, text_file, tmp_path):
    """Trainer's checkpoint folders, pruned to keep_checkpoints (save_total_limit); the adapter in each is
    safetensors, and everything that resume reads back that is not safetensors or JSON loads with torch's
    weights_only loader (no arbitrary unpickling)."""
    train(config(base_dir, text_file, tmp_path / "run", max_updates=4, keep_checkpoints=1))
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-4"]  # older ones pruned
    files = {p.name for p in ckpts[0].iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= files
    from transformers.trainer_pt_utils import safe_globals  # what Trainer loads the RNG state under (numpy arrays)

    with safe_globals():
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.load(ckpts[0] / name, weights_only=True)
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_dir, text_file, tmp_path):
    from ouroboros_train.train import load_base

    cfg = config(base_dir, text_file, tmp_path / "run", max_updates=6)
    base, tok, _ = load_base(str(base_dir))

    def poison(update, loss):
        if update == 2:
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if ".ouroboros_adapter." in name and p.requires_grad:
                        p.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="at update 3.*checkpoint-2"):
        train(cfg, on_update=poison, base_model=base, tokenizer=tok)
    assert last_checkpoint(tmp_path / "run").name == "checkpoint-2"
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-4").exists()
    assert not (tmp_path / "run" / "adapter").exists()
    assert [r["update"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_existing_run_dir_needs_overwrite(base_dir, text_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = config(base_dir, text_file, out, max_updates=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(cfg)
    assert (out / "keep.txt").read_text() == "mine"
    train(cfg, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "summary.json").is_file()


def bad_inputs(base_dir, text_file, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in base_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("w5 w6 w7")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    return {
        "missing model": (dict(base=str(tmp_path / "nope")), FileNotFoundError, "not found"),
        "corrupt weights": (dict(base=str(corrupt)), ValueError, "corrupt or truncated"),
        "corpus too small": (dict(train_text=str(tiny)), ValueError, "too small"),
        "no text files": (dict(train_text=str(empty)), ValueError, "no text files"),
        "seq_len over the limit": (dict(seq_len=512), ValueError, "max_position_embeddings"),
        "split too deep": (dict(adapter=dict(num_prelude_layers=3, num_coda_layers=3)), ValueError, "num_prelude_layers"),
        "rank too large": (dict(adapter=dict(r=512)), ValueError, "r=512"),
        "depth beyond tables": (dict(depth_range=(1, 5)), ValueError, "max_steps >= 5"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing model", "corrupt weights", "corpus too small", "no text files", "seq_len over the limit", "split too deep",
     "rank too large", "depth beyond tables"],
)
def test_bad_input_fails_before_anything_is_written(base_dir, text_file, tmp_path, case):
    kw, exc, pattern = bad_inputs(base_dir, text_file, tmp_path)[case]
    out = tmp_path / "run"
    with pytest.raises(exc, match=pattern):
        train(config(base_dir, text_file, out, **kw))
    assert not out.exists()


def test_cli_train_then_eval_writes_the_results_schema(base_dir, text_file, tmp_path):
    from ouroboros_evaluate.evaluate import pruned_layers
    from ouroboros_plugins.cli import main
    from transformers import AutoModelForCausalLM

    manifest, chunks = random_manifest(tmp_path / "manifest.safetensors", n_chunks=3, seq_len=SEQ)
    common = ["--base", str(base_dir), "--train-text", str(text_file), "--prelude", "1", "--coda", "1", "--steps", "2",
              "--rank", "8", "--seq-len", str(SEQ), "--batch-size", "2", "--updates", "3", "--warmup", "1",
              "--eval-every", "3", "--eval-chunks", "2", "--manifest", str(manifest)]
    assert main(["train", "--out", str(tmp_path / "c")] + common) == 0
    assert main(["train", "--out", str(tmp_path / "s"), "--modulation", "static"] + common) == 0
    assert main(["train", "--out", str(tmp_path / "s")] + common) == 2  # exists, no --overwrite
    # --resume keeps the stored settings but takes --threads (a runtime setting); a finished run stays finished
    try:
        assert main(["train", "--out", str(tmp_path / "s"), "--resume", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(1)  # this module's setting
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["torch_threads"] == 2
    assert len([r for r in read_log(tmp_path / "s") if r["kind"] == "train"]) == 3
    assert json.loads((tmp_path / "s" / "config.json").read_text())["adapter"]["modulation"] == "static"
    evals = [r for r in read_log(tmp_path / "c") if r["kind"] == "eval"]
    assert len(evals) == 1 and set(evals[0]["heldout"]) == {"indist", "wikipedia", "reddit"}

    out = tmp_path / "eval"
    rc = main(["eval", "--base", str(base_dir), "--arm", f"controller={tmp_path / 'c'}", "--arm", f"static={tmp_path / 's'}",
               "--out", str(out), "--chunks", "3", "--manifest", str(manifest)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"model", "arms"}
    assert list(results["arms"]) == ["full", "pruned", "controller", "static"]
    for name, arm in results["arms"].items():
        assert set(arm) == {"trainable_params", "train_tokens", "heldout"}
        assert set(arm["heldout"]) == {"indist", "wikipedia", "reddit"}
        for v in arm["heldout"].values():
            assert set(v) == {"nll", "gap_recovery"} and math.isfinite(v["nll"])
    arms = results["arms"]
    assert arms["full"]["heldout"]["indist"]["gap_recovery"] == 1.0
    assert arms["pruned"]["heldout"]["reddit"]["gap_recovery"] == 0.0
    assert arms["controller"]["train_tokens"] == 3 * 2 * SEQ and arms["full"]["train_tokens"] == 0
    assert arms["controller"]["trainable_params"] > arms["static"]["trainable_params"] > 0

    # the numbers are what they claim: full = the base model, pruned = layers 0, 2 (recurrent), 5 only
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = chunks["wikipedia"]
    ce = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).item()  # noqa: E731
    with torch.no_grad():
        assert arms["full"]["heldout"]["wikipedia"]["nll"] == pytest.approx(ce(base(ids).logits), abs=1e-5)
        with pruned_layers(base, (0, 3, 5)):
            pruned = ce(base(ids).logits)
    assert arms["pruned"]["heldout"]["wikipedia"]["nll"] == pytest.approx(pruned, abs=1e-5)
    w = {name: arms[name]["heldout"]["wikipedia"]["nll"] for name in arms}
    gap = (w["pruned"] - w["controller"]) / (w["pruned"] - w["full"])
    assert arms["controller"]["heldout"]["wikipedia"]["gap_recovery"] == pytest.approx(gap)
    details = json.loads((out / "details.json").read_text())
    assert details["split"] == {"prelude": [0], "recurrent": 3, "coda": [5]}
    assert len(details["diagnostics"]["controller"]["gate_retention"]) == 2
    assert (out / "results.md").read_text().startswith("| arm |")
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "recurrence.png").stat().st_size > 1000


def test_evaluation_cache_reuses_only_the_same_adapter_on_the_same_tokens(base_dir, text_file, tmp_path, monkeypatch):
    """reuse_reference / reuse_arms: a second evaluation takes the full, pruned and arm NLLs from `<cache>/evals/`
    (proved by planting a value there), and an arm whose weights changed is scored again."""
    from ouroboros_evaluate.evaluate import evaluate

    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "cache"))
    manifest, _ = random_manifest(tmp_path / "manifest.safetensors", n_chunks=2, seq_len=SEQ)
    for name in ("a", "b"):
        train(config(base_dir, text_file, tmp_path / name, max_updates=2, seed={"a": 0, "b": 1}[name]))
    kw = dict(n_chunks=2, manifest=str(manifest), overwrite=True, plots=False, progress=False,
              reuse_reference=True, reuse_arms=True)

    first = evaluate(str(base_dir), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, str(tmp_path / "e1"), **kw)
    cached = sorted((tmp_path / "cache" / "evals").glob("*.json"))
    assert [p.name.split("-")[0] for p in cached] == ["arm", "arm", "reference"]
    details = json.loads((tmp_path / "e1" / "details.json").read_text())
    assert details["arms_reused"] == [] and details["reference_reused"] is False

    # plant a value in arm a's entry: a reused entry shows it, so a changed result proves the cache was read
    entry_a = next(p for p in cached if json.loads(p.read_text())["adapter"] == str(tmp_path / "a" / "adapter"))
    planted = json.loads(entry_a.read_text())
    planted["nll"]["wikipedia"] = 1.5
    entry_a.write_text(json.dumps(planted))
    second = evaluate(str(base_dir), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, str(tmp_path / "e2"), **kw)
    assert second["arms"]["a"]["heldout"]["wikipedia"]["nll"] == 1.5
    assert second["arms"]["b"] == first["arms"]["b"] and second["arms"]["full"] == first["arms"]["full"]
    details = json.loads((tmp_path / "e2" / "details.json").read_text())
    assert details["arms_reused"] == ["a", "b"] and details["reference_reused"] is True
    assert details["diagnostics"]["b"] == json.loads((tmp_path / "e1" / "details.json").read_text())["diagnostics"]["b"]

    # arm a retrained with another seed: other bytes, so it is scored again
    train(config(base_dir, text_file, tmp_path / "a", max_updates=2, seed=2), overwrite=True)
    third = evaluate(str(base_dir), {"a": str(tmp_path / "a")}, str(tmp_path / "e3"), **kw)
    assert json.loads((tmp_path / "e3" / "details.json").read_text())["arms_reused"] == []
    assert third["arms"]["a"]["heldout"]["wikipedia"]["nll"] not in (1.5, first["arms"]["a"]["heldout"]["wikipedia"]["nll"])

    # without the flags nothing is read from the cache
    fourth = evaluate(str(base_dir), {"a": str(tmp_path / "a")}, str(tmp_path / "e4"), n_chunks=2, manifest=str(manifest),
                      overwrite=True, plots=False, progress=False)
    assert json.loads((tmp_path / "e4" / "details.json").read_text())["arms_reused"] == []
    assert fourth["arms"]["a"]["heldout"] == third["arms"]["a"]["heldout"]
