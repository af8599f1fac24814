"""The practitioner's baseline `pruned_lora` (`ouroboros_train.pruned`, `ouroboros train --method pruned_lora`): the
same prelude + recurrent layer once + coda as a plain model with a standard PEFT LoRA, its rank matched to the
Controller arm's trainable parameters within 5 % (the default SmolLM2-135M config on the meta device, and tiny
configs), trained (only the LoRA moves), saved, resumed and scored by `ouroboros eval` and evals/study.py."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import load_script, ouro_config, random_manifest, save_base, tiny_config, tiny_model, write_word_text

SEQ = 32
SPLIT = dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3, r=8)
pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-135M-Instruct, the default base model (its config.json in the cache, when converted, says the same)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_theta=100000.0)
HEADLINE = dict(num_prelude_layers=7, num_coda_layers=7, recurrent_layer_index=15, num_steps=4, r=32)  # evals/study.py SPLIT


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def smollm2_config():
    """The default model's config.json from the cache when it has been converted, else the same shapes written here."""
    from transformers import AutoConfig, LlamaConfig

    cached = Path(os.environ.get("OUROBOROS_CACHE", Path.home() / ".cache" / "ouroboros")) / "smollm2-135m-instruct"
    if not (cached / "config.json").is_file():
        return LlamaConfig(**SMOLLM2)
    config = AutoConfig.from_pretrained(cached)
    shapes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "tie_word_embeddings")
    assert {k: getattr(config, k) for k in shapes} == {k: SMOLLM2[k] for k in shapes}
    return config


# ----------------------------------------------------------------------------------------------------
# the rank: within 5 % of the Controller arm's trainable parameters
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arm", [{}, dict(modulation="static"), dict(coda_lora_r=8), dict(num_steps=8, r=64)],
                         ids=["controller", "static", "controller_coda_r8", "controller_d8_r64"])
def test_default_model_rank_is_within_5_percent_of_the_matched_arm(arm):
    from ouroboros_train.pruned import lora_trainable_params, pruned_lora_plan

    model = meta_model(smollm2_config())
    plan = pruned_lora_plan(model, {**HEADLINE, **arm})
    assert plan.kept == tuple(range(7)) + (15,) + tuple(range(23, 30))  # 7 + 1 + 7
    assert abs(plan.trainable_params - plan.target_params) <= 0.05 * plan.target_params
    # the counts are the real ones: the LoRA's from PEFT on the meta model, the arm's as the study reported it
    from peft import get_peft_model

    assert lora_trainable_params(get_peft_model(model, plan.lora_config())) == plan.trainable_params
    if not arm:
        headline = json.loads((Path(__file__).resolve().parents[1] / "evals" / "results" / "headline.json").read_text())
        assert plan.target_params == headline["arms"]["controller"]["trainable_params"] == 974784
        # no single rank fits (r 6: 6.0 % under, r 7: 9.6 % over): six of the fifteen layers get r 7 via rank_pattern
        assert (plan.r, len(plan.raised)) == (6, 6) and plan.trainable_params == 976896


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("adapter", [SPLIT, {**SPLIT, "modulation": "static"}, dict(num_prelude_layers=2, num_coda_layers=1, r=4)],
                         ids=["controller", "static", "split_2_1"])
def test_tiny_model_lora_is_within_5_percent_of_the_real_adapter(arch, adapter):
    from peft import get_peft_model

    from ouroboros_peft import OuroborosConfig
    from ouroboros_train.pruned import build_pruned_lora, lora_trainable_params

    torch.manual_seed(0)
    ouroboros = get_peft_model(tiny_model(arch), OuroborosConfig(**adapter))
    target = sum(p.numel() for p in ouroboros.parameters() if p.requires_grad)
    model = build_pruned_lora(tiny_model(arch), adapter)
    got = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got == lora_trainable_params(model) == model.pruned_lora_plan.trainable_params
    assert model.pruned_lora_plan.target_params == target
    assert abs(got - target) <= 0.05 * target


def test_default_model_recurrent_only_lora_matches_the_same_budget_on_one_layer():
    from peft import get_peft_model

    from ouroboros_train.pruned import lora_trainable_params, pruned_lora_plan

    model = meta_model(smollm2_config())
    plan = pruned_lora_plan(model, HEADLINE, lora_layers="recurrent")
    assert plan.kept == tuple(range(7)) + (15,) + tuple(range(23, 30))  # still the 15 kept layers, run once each
    assert plan.adapted == plan.lora_layers == (15,) and plan.raised == ()
    # one layer at rank 96 costs what fifteen at rank 6-7 cost: 96 x 10,176 = 976,896, 0.2 % over the Controller arm
    assert (plan.r, plan.trainable_params, plan.target_params) == (96, 976896, 974784)
    peft_model = get_peft_model(model, plan.lora_config())
    assert lora_trainable_params(peft_model) == plan.trainable_params
    assert {n.split(".layers.")[1].split(".")[0] for n, _ in peft_model.named_parameters() if "lora_" in n} == {"15"}


STATIC = {**SPLIT, "modulation": "static"}  # small enough a budget for one 64-wide tiny layer (rank 16)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_sites(model) -> set:
    """(layer index, projection) of every LoRA in `model`."""
    return {re.search(r"\.layers\.(\d+)\.\w+\.(\w+_proj)\.lora_A", n).groups() for n, _ in model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recurrent_only_lora_sits_on_the_recurrent_layer_of_the_whole_pruned_stack(arch):
    from peft import get_peft_model

    from ouroboros_peft import OuroborosConfig
    from ouroboros_train.pruned import build_pruned_lora, lora_trainable_params, pruned_stack_of

    model = build_pruned_lora(tiny_model(arch), STATIC, lora_layers="recurrent")
    assert lora_sites(model) == {("3", proj) for proj in PROJECTIONS}
    target = sum(p.numel() for p in get_peft_model(tiny_model(arch), OuroborosConfig(**STATIC)).parameters() if p.requires_grad)
    assert abs(lora_trainable_params(model) - target) <= 0.05 * target and model.pruned_lora_plan.r == 16
    ran = []
    stack = pruned_stack_of(model)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(stack.all_layers)]
    with torch.no_grad():
        model(input_ids=torch.randint(4, 96, (1, SEQ), generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    assert ran == [0, 3, 5]  # the prelude and coda run too, without a LoRA


def test_a_budget_one_layer_cannot_hold_is_refused_naming_the_rank():
    from ouroboros_train.pruned import pruned_lora_plan

    # the tiny Controller arm's ~205k parameters would need rank 100 on one layer whose k/v projections are 64 wide
    with pytest.raises(ValueError, match="needs rank 100 on 1 layer\\(s\\) \\(recurrent\\) but the narrowest adapted projection has 64"):
        pruned_lora_plan(tiny_model("llama"), SPLIT, lora_layers="recurrent")
    with pytest.raises(ValueError, match="lora_layers \\(--lora-layers\\) must be one of \\['kept', 'recurrent'\\], got 'coda'"):
        pruned_lora_plan(tiny_model("llama"), SPLIT, lora_layers="coda")
    assert pruned_lora_plan(tiny_model("llama"), SPLIT).adapted == (0, 3, 5)  # spread over three layers it fits (rank 33)


def test_no_rank_within_5_percent_is_refused():
    from ouroboros_train.pruned import match_rank

    assert match_rank([100, 100, 100], 1210) == (4, ())  # 4 x 300
    assert match_rank([100, 100, 100], 1290) == (4, (0,))  # 4 x 300 + one layer at rank 5
    assert match_rank([100, 100, 100], 1390) == (4, (0, 1))
    with pytest.raises(ValueError, match="no LoRA rank gives 10 trainable parameters within 5%"):
        match_rank([100, 100, 100], 10)


# ----------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_model_runs_exactly_prelude_recurrent_once_coda_and_starts_as_the_pruned_model(arch):
    from ouroboros_evaluate.evaluate import pruned_layers
    from ouroboros_train.pruned import build_pruned_lora, full_model, pruned_stack_of

    model = build_pruned_lora(tiny_model(arch), SPLIT)
    stack = pruned_stack_of(model)
    assert stack.kept == (0, 3, 5) and len(stack.all_layers) == 6  # 1 + 1 + 1 of 6 layers; every layer kept in memory
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(stack.all_layers)]
    ids = torch.randint(4, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert ran == [0, 3, 5]
        ran.clear()
        with full_model(model), model.disable_adapter():
            full = model(input_ids=ids).logits
        assert ran == [0, 1, 2, 3, 4, 5]
        base = tiny_model(arch)
        assert torch.equal(full, base(input_ids=ids).logits)
        with pruned_layers(base, (0, 3, 5)):
            assert torch.allclose(logits, base(input_ids=ids).logits, atol=1e-6)  # LoRA B starts at zero
    for h in hooks:
        h.remove()
    assert stack.decoder.layers is stack.all_layers  # the whole list is back after every forward
    with pytest.raises(IndexError):  # ... also after one that failed (a token id beyond the vocabulary)
        model(input_ids=torch.full((1, 4), 1000))
    assert stack.decoder.layers is stack.all_layers
    # the LoRA: all seven projections of exactly the kept layers
    assert lora_sites(model) == {(i, proj) for i in ("0", "3", "5") for proj in PROJECTIONS}


def test_one_training_step_changes_only_the_lora_weights(base_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    from ouroboros_train.train import TrainConfig, read_log, train

    cfg = TrainConfig(base=str(base_dir), out=str(tmp_path / "run"), adapter=dict(SPLIT), train_text=str(text_file), seq_len=SEQ,
                      batch_size=2, max_updates=1, lr=1e-2, warmup=0, progress=False, method="pruned_lora")
    result = train(cfg)
    model = result.model
    before = tiny_model("llama").state_dict()
    changed, same = [], []
    for name, p in model.named_parameters():
        if "lora_" in name:
            (changed if "lora_B" in name and float(p.detach().abs().max()) > 0 else same).append(name)
            continue
        key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(p, before[key]), name  # every base weight, kept or removed, untouched
        assert not p.requires_grad
    assert len(changed) == 21  # every LoRA B moved off zero (A is random from the start)
    assert [r["depth"] for r in read_log(tmp_path / "run") if r["kind"] == "train"] == [None]
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 42 and all(".layers.0." in k or ".layers.3." in k or ".layers.5." in k for k in saved)
    record = json.loads((tmp_path / "run" / "adapter" / "pruned_stack.json").read_text())
    assert record["plan"]["kept"] == [0, 3, 5] and record["plan"]["trainable_params"] == result.summary["trainable_params"]
    assert result.summary["method"] == "pruned_lora" and result.summary["pruned_lora"]["kept"] == [0, 3, 5]


def test_an_interrupted_run_resumes_to_the_same_loss_curve(base_dir, text_file, tmp_path):
    from ouroboros_train.train import TrainConfig, read_log, train

    def cfg(out):
        return TrainConfig(base=str(base_dir), out=str(out), adapter=dict(SPLIT), train_text=str(text_file), seq_len=SEQ,
                           batch_size=2, max_updates=4, lr=3e-3, warmup=1, checkpoint_every=2, progress=False,
                           method="pruned_lora", distill=True)

    class Cut(Exception):
        pass

    def stop(update, loss):
        if update == 3:
            raise Cut

    train(cfg(tmp_path / "full"))
    with pytest.raises(Cut):
        train(cfg(tmp_path / "cut"), on_update=stop)
    train(cfg(tmp_path / "cut"), resume=True)
    losses = lambda run: [r["loss"] for r in read_log(run) if r["kind"] == "train"]  # noqa: E731
    assert len(losses(tmp_path / "full")) == 4 and losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_a_saved_adapter_is_refused_on_another_base(base_dir, text_file, tmp_path):
    from ouroboros_train.pruned import build_pruned_lora, load_pruned_lora, save_stack_record

    model = build_pruned_lora(tiny_model("llama"), SPLIT)
    model.save_pretrained(str(tmp_path / "a"))
    save_stack_record(model, tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a different base model"):
        load_pruned_lora(tiny_model("llama", seed=1), tmp_path / "a")
    loaded = load_pruned_lora(tiny_model("llama"), tmp_path / "a")
    assert loaded.pruned_lora_plan == model.pruned_lora_plan


def test_recurrent_only_arm_trains_saves_and_loads_as_itself(base_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    from ouroboros_train.pruned import load_pruned_lora
    from ouroboros_train.train import TrainConfig, train

    cfg = TrainConfig(base=str(base_dir), out=str(tmp_path / "run"), adapter=dict(STATIC), train_text=str(text_file), seq_len=SEQ,
                      batch_size=2, max_updates=1, lr=1e-2, warmup=0, progress=False, method="pruned_lora",
                      lora_layers="recurrent")
    result = train(cfg)
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(saved) == 14 and all(".layers.3." in k for k in saved)  # A and B of seven projections, one layer
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    record = json.loads((adapter / "pruned_stack.json").read_text())["plan"]
    assert record["kept"] == [0, 3, 5] and record["lora_layers"] == [3] and record["r"] == 16
    assert result.summary["pruned_lora"]["lora_layers"] == [3]
    loaded = load_pruned_lora(tiny_model("llama"), adapter)
    assert loaded.pruned_lora_plan == result.model.pruned_lora_plan
    ids = torch.randint(4, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-6)


def save_with_edited_plan(model, folder, edit) -> None:
    """Save a pruned_lora model as training does (adapter + pruned_stack.json), then apply `edit` to the record's plan."""
    from ouroboros_train.pruned import PRUNED_STACK_FILE, save_stack_record

    model.save_pretrained(str(folder))
    save_stack_record(model, folder)
    path = Path(folder) / PRUNED_STACK_FILE
    record = json.loads(path.read_text())
    edit(record["plan"])
    path.write_text(json.dumps(record))


def test_a_record_from_before_lora_layers_loads_with_every_kept_layer_adapted(tmp_path):
    from ouroboros_train.pruned import build_pruned_lora, load_pruned_lora

    model = build_pruned_lora(tiny_model("llama"), SPLIT)
    save_with_edited_plan(model, tmp_path / "a", lambda plan: plan.pop("lora_layers"))
    loaded = load_pruned_lora(tiny_model("llama"), tmp_path / "a")
    assert loaded.pruned_lora_plan.adapted == (0, 3, 5) and lora_sites(loaded) == lora_sites(model)


@pytest.mark.parametrize("lora_layers", [[2], [3, 9]], ids=["a removed layer", "beyond the model"])
def test_a_record_that_adapts_a_layer_it_does_not_run_is_refused(tmp_path, lora_layers):
    from ouroboros_train.pruned import build_pruned_lora, load_pruned_lora

    model = build_pruned_lora(tiny_model("llama"), STATIC, lora_layers="recurrent")
    save_with_edited_plan(model, tmp_path / "a", lambda plan: plan.update(lora_layers=lora_layers))
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="bad plan \\(LoRA on layers .* not all of them kept \\[0, 3, 5\\]\\)"):
        load_pruned_lora(base, tmp_path / "a")
    assert not hasattr(base, "peft_config") and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="pruned_lora", lora_layers="coda"), "lora_layers (--lora-layers) must be one of ['kept', 'recurrent'], got 'coda'"),
    (dict(lora_layers="recurrent"), "lora_layers (--lora-layers) 'recurrent' places the LoRA of method pruned_lora"),
])
def test_train_config_refuses_a_bad_lora_placement(tmp_path, kwargs, message):
    from ouroboros_train.train import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(base=str(tmp_path), out=str(tmp_path / "run"), adapter=dict(SPLIT), **kwargs)


# ----------------------------------------------------------------------------------------------------
# ouroboros eval, evals/study.py
# ----------------------------------------------------------------------------------------------------


def test_cli_trains_and_eval_scores_the_arm_as_the_pruned_stack_it_was_trained_as(base_dir, text_file, tmp_path):
    from ouroboros_plugins.cli import main
    from ouroboros_train.pruned import load_pruned_lora

    manifest, chunks = random_manifest(tmp_path / "manifest.safetensors", n_chunks=2, seq_len=SEQ)
    common = ["--base", str(base_dir), "--train-text", str(text_file), "--prelude", "1", "--coda", "1", "--steps", "2",
              "--rank", "8", "--seq-len", str(SEQ), "--batch-size", "2", "--updates", "2", "--warmup", "1", "--lr", "1e-2",
              "--no-progress", "--eval-every", "2", "--eval-chunks", "1", "--manifest", str(manifest)]
    assert main(["train", "--out", str(tmp_path / "p"), "--method", "pruned_lora", "--distill"] + common) == 0
    assert main(["train", "--out", str(tmp_path / "c")] + common) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(base_dir), "--arm", f"controller={tmp_path / 'c'}", "--arm", f"pruned_lora={tmp_path / 'p'}",
                 "--out", str(out), "--chunks", "2", "--manifest", str(manifest), "--no-plots"]) == 0
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert list(arms) == ["full", "pruned", "controller", "pruned_lora"]
    plan = json.loads((tmp_path / "p" / "adapter" / "pruned_stack.json").read_text())["plan"]
    assert arms["pruned_lora"]["trainable_params"] == plan["trainable_params"]
    assert abs(plan["trainable_params"] - arms["controller"]["trainable_params"]) <= 0.05 * arms["controller"]["trainable_params"]
    assert arms["pruned_lora"]["train_tokens"] == 2 * 2 * SEQ
    # the score is the trained pruned stack's NLL, computed here by hand
    from transformers import AutoModelForCausalLM

    model = load_pruned_lora(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "p" / "adapter")
    ids = chunks["reddit"][:2]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).item()
    assert arms["pruned_lora"]["heldout"]["reddit"]["nll"] == pytest.approx(nll, abs=1e-5)
    assert arms["pruned_lora"]["heldout"]["reddit"]["nll"] != pytest.approx(arms["pruned"]["heldout"]["reddit"]["nll"], abs=1e-4)
    evals = [json.loads(line) for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1 and all(math.isfinite(v) for v in evals[0]["heldout"].values())


def test_study_quality_experiment_trains_and_scores_pruned_lora_beside_the_controller(tmp_path, monkeypatch):
    study = load_script("study", Path(__file__).resolve().parents[1] / "evals" / "study.py")
    arms = study.experiments(False, {"distill_weight": 0.25})["quality"]
    assert set(arms) == {"controller", "static", "controller_kd", "static_kd", "controller_coda_r8_kd", "controller_kd_w1", "pruned_lora",
                         "pruned_lora_kd", "pruned_lora_recurrent_kd", "controller_paper_head", "controller_alpha16"}
    assert arms["pruned_lora_recurrent_kd"][1] == {"method": "pruned_lora", "lora_layers": "recurrent", "distill": True,
                                                   "distill_weight": 0.25}
    assert arms["controller_paper_head"][0] == {"controller_head": "paper"} and arms["controller_alpha16"][0] == {"lora_alpha": 16.0}
    assert arms["pruned_lora_kd"][1] == {"method": "pruned_lora", "distill": True, "distill_weight": 0.25}
    assert arms["controller_kd_w1"] == ({}, {"distill": True, "distill_weight": 1.0})  # W 1 whatever --distill-weight says
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "cache"))
    save_base(tmp_path / "base", "llama")
    text = write_word_text(tmp_path / "train.txt")
    manifest, _ = random_manifest(tmp_path / "manifest.safetensors", n_chunks=2, seq_len=SEQ)
    argv = ["quality", "--arms", "controller_kd,pruned_lora_kd", "--base", str(tmp_path / "base"), "--split", "1,3,1",
            "--train-text", str(text), "--manifest", str(manifest), "--seq-len", str(SEQ), "--batch-size", "2",
            "--updates", "2", "--warmup", "1", "--chunks", "2", "--distill-temperature", "2", "--out", str(tmp_path / "runs"),
            "--threads", "1"]
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "runs" / "quality" / "eval" / "results.json").read_text())["arms"]
    assert set(results) == {"full", "pruned", "controller_kd", "pruned_lora_kd"}
    for name in ("controller_kd", "pruned_lora_kd"):
        config = json.loads((tmp_path / "runs" / "quality" / name / "config.json").read_text())
        assert config["distill"] is True and config["distill_temperature"] == 2.0 and config["distill_weight"] == 0.5
    assert json.loads((tmp_path / "runs" / "quality" / "pruned_lora_kd" / "config.json").read_text())["method"] == "pruned_lora"
    c, p = results["controller_kd"]["trainable_params"], results["pruned_lora_kd"]["trainable_params"]
    assert abs(p - c) <= 0.05 * c
    # a bad distillation setting stops the study before any training, naming the flag
    with pytest.raises(SystemExit):
        study.main(argv[:-6] + ["--distill-weight", "2", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
