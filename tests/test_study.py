"""evals/study.py: the provenance it records when arms are trained by separate calls and evaluated by a later one
(training and evaluation replaced by stand-ins: what is under test is what the script writes around them), and one
experiment run end to end on a tiny model given as --base with its own split, training text and manifest."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_script

study = load_script("study", Path(__file__).resolve().parents[1] / "evals" / "study.py")


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Stand-ins for the base model, training and evaluation; returns the list of (arm, resumed) trainings."""
    import ouroboros_train.default_model as default_model
    import ouroboros_evaluate.evaluate as evaluate
    import ouroboros_train.train as train

    trained = []

    def fake_train(cfg, overwrite=False, resume=False):
        run = Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        trained.append((run.name, resume))
        summary = {"step_s_mean": 1.0, "wall_s": 2.0, "train_tokens": 4, "final_train_loss": 3.0,
                   "resumed_from_update": 5 if resume else None, "updates": cfg.max_updates}
        (run / "summary.json").write_text(json.dumps(summary))
        return SimpleNamespace(summary=summary)  # as train.TrainResult

    def fake_evaluate(base, arms, out, **kw):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        results = {"model": "m", "arms": {arm: {"trainable_params": 1} for arm in arms}}
        (out / "results.json").write_text(json.dumps(results))
        (out / "details.json").write_text(json.dumps(kw["extra_details"]))
        return results

    monkeypatch.setattr(default_model, "default_model_dir", lambda: tmp_path / "base")
    monkeypatch.setattr(study, "check_arms", lambda model_dir, arms, split: None)  # no base model on disk here
    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluate, "markdown_table", lambda results, details: "")
    monkeypatch.setenv("OUROBOROS_CACHE", "/some/cache")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return trained


def test_training_calls_and_evaluations_are_recorded_across_saves(stubbed, tmp_path, monkeypatch):
    out, results = str(tmp_path / "runs"), tmp_path / "results"
    common = ["--updates", "3", "--out", out, "--resume"]
    # two processes train one arm each; the static arm continues an interrupted run
    checkpoint = tmp_path / "runs" / "headline" / "static" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 5}')
    assert study.main(["headline", "--arms", "controller", "--train-only", *common]) == 0
    assert study.main(["headline", "--arms", "static", "--train-only", *common]) == 0
    assert stubbed == [("controller", False), ("static", True)]

    save = ["headline", "--arms", "controller,static", *common, "--save", "--save-as", "h", "--results-dir", str(results)]
    assert study.main(save) == 0
    assert stubbed == [("controller", False), ("static", True)]  # finished arms are kept, not trained again
    details = json.loads((results / "h.details.json").read_text())["study"]
    runs = details["train_runs"]
    assert [r["command"] for r in runs["controller"]] == [
        f"OUROBOROS_CACHE=/some/cache python evals/study.py headline --arms controller --train-only {' '.join(common)}"]
    assert runs["static"][0]["command"].endswith("--arms static --train-only " + " ".join(common))
    assert [r["resumed_from_update"] for r in runs["static"]] == [5]
    assert runs["controller"][0]["started"] <= runs["controller"][0]["ended"]
    first_eval = "OUROBOROS_CACHE=/some/cache python evals/study.py " + " ".join(save)
    assert details["eval_commands"] == [first_eval]
    assert "how_run" not in details
    assert json.loads((results / "h.json").read_text())["arms"].keys() == {"controller", "static"}

    # a later save of the same file (here: with one thread and a note) keeps what the first one recorded,
    # including fields written by hand such as the training commands of arms trained before this was recorded
    path = results / "h.details.json"
    kept = json.loads(path.read_text())
    kept["study"]["train_commands"] = ["python evals/study.py headline --arms no_gate --train-only"]
    kept["study"]["how_run"] = "First run alone."
    path.write_text(json.dumps(kept))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert study.main(save + ["--note", "Second run beside a CI job."]) == 0
    details = json.loads(path.read_text())["study"]
    assert details["eval_commands"] == [first_eval, "OUROBOROS_CACHE=/some/cache OMP_NUM_THREADS=1 "
                                        "python evals/study.py " + " ".join(save + ["--note", "'Second run beside a CI job.'"])]
    assert details["how_run"] == "First run alone. Second run beside a CI job."
    assert details["train_commands"] == ["python evals/study.py headline --arms no_gate --train-only"]
    assert [r["resumed_from_update"] for r in details["train_runs"]["static"]] == [5]


def test_saving_over_another_experiments_results_stops_before_training(stubbed, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "h.details.json").write_text(json.dumps({"study": {"experiment": "pooling"}}))
    with pytest.raises(SystemExit, match="holds experiment 'pooling', not 'headline'"):
        study.main(["headline", "--arms", "controller", "--updates", "3", "--out", str(tmp_path / "runs"),
                    "--save", "--save-as", "h", "--results-dir", str(results)])
    assert stubbed == []
    assert not (tmp_path / "runs").exists()


def test_note_without_save_is_refused(stubbed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["headline", "--arms", "controller", "--out", str(tmp_path / "runs"), "--note", "x"])
    assert "--note is written with --save" in capsys.readouterr().err
    assert stubbed == []


# ---- end to end on a tiny model: real training and evaluation, another base, split, training text and manifest ----

@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    import torch

    from conftest import random_manifest, save_base, write_word_text

    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    save_base(base, "llama")  # 6 layers, the tiny whitespace tokenizer of conftest (ids 4..99 are words w4..w99)
    text = write_word_text(tmp_path / "train.txt")
    manifest, _ = random_manifest(tmp_path / "manifest.safetensors", n_chunks=3, seq_len=32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ["--base", str(base), "--split", "2,2,2", "--train-text", str(text), "--manifest", str(manifest),
           "--seq-len", "32", "--batch-size", "2", "--updates", "3", "--warmup", "1", "--chunks", "2"]
    torch.set_num_threads(before)


def test_headline_runs_end_to_end_on_another_base_and_split(tiny_setup, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    assert study.main(["headline", *tiny_setup, "--out", str(out), "--save", "--save-as", "tiny",
                       "--results-dir", str(results)]) == 0

    saved = json.loads((results / "tiny.json").read_text())
    arms = saved["arms"]
    assert set(arms) == {"full", "pruned", "controller", "static", "no_gate"}
    for name in ("controller", "static", "no_gate"):
        assert arms[name]["train_tokens"] == 3 * 2 * 32
        for corpus in ("indist", "wikipedia", "reddit"):
            nll = arms[name]["heldout"][corpus]["nll"]
            assert nll == nll and 0 < nll < 20
    # each arm was trained as its name says, on the given split, text and manifest
    configs = {name: json.loads((out / "headline" / name / "adapter" / "adapter_config.json").read_text())
               for name in ("controller", "static", "no_gate")}
    for cfg in configs.values():
        assert (cfg["num_prelude_layers"], cfg["recurrent_layer_index"], cfg["num_coda_layers"]) == (2, 2, 2)
    assert configs["static"]["modulation"] == "static" and configs["controller"]["modulation"] != "static"
    assert configs["no_gate"]["use_gate"] is False and configs["controller"]["use_gate"] is True
    assert arms["static"]["trainable_params"] != arms["controller"]["trainable_params"]
    run_cfg = json.loads((out / "headline" / "controller" / "config.json").read_text())
    assert run_cfg["train_text"] == tiny_setup[5] and run_cfg["manifest"] == tiny_setup[7] and run_cfg["seq_len"] == 32

    study_details = json.loads((results / "tiny.details.json").read_text())["study"]
    assert study_details["split"] == {"num_prelude_layers": 2, "recurrent_layer_index": 2, "num_coda_layers": 2}
    assert study_details["base"] == tiny_setup[1] and study_details["tokens_per_update"] == 64
    assert set(study_details["train_runs"]) == {"controller", "static", "no_gate"}
    assert all(len(r) == 1 and r[0]["resumed_from_update"] is None for r in study_details["train_runs"].values())


@pytest.mark.parametrize("flag, value, message", [
    ("--split", "2,2", "three integers"),
    ("--split", "3,1,2", "recurrent layer index must be >="),
    ("--base", "nowhere", "no config.json"),
    ("--train-text", "missing.txt", "no such file"),
    ("--manifest", "missing.safetensors", "no such file"),
    ("--manifest", None, "give --manifest too"),  # another base with the default (SmolLM2) manifest
])
def test_bad_base_split_or_paths_stop_before_training(tiny_setup, tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.chdir(tmp_path)
    args = list(tiny_setup)
    i = args.index(flag)
    if value is None:
        del args[i:i + 2]
    else:
        args[i + 1] = value
    with pytest.raises(SystemExit):
        study.main(["headline", "--arms", "controller", *args, "--out", str(tmp_path / "runs")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_arm_that_does_not_fit_the_base_stops_the_study_before_its_first_arm(tiny_setup, tmp_path):
    """depth_rank's r 64 arms need projections at least 64 wide; a base whose k/v projections are 32 wide (one
    key-value head of 32) takes r 8 but not r 64, and the study says so before training the r-8 arm listed first."""
    from conftest import save_base

    narrow = tmp_path / "narrow"
    save_base(narrow, "llama", num_key_value_heads=1)
    args = list(tiny_setup)
    args[args.index("--base") + 1] = str(narrow)
    with pytest.raises(SystemExit, match=r"arm controller_d1_r64 does not fit the base model .*r=64 is larger than"):
        study.main(["depth_rank", "--arms", "controller_d1_r8,controller_d1_r64", *args, "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
    # a recurrent layer inside the coda: named before any training too
    args[args.index("--split") + 1] = "2,5,2"
    with pytest.raises(SystemExit, match="arm controller does not fit .*recurrent_layer_index=5 lies inside the prelude or coda"):
        study.main(["headline", *args, "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_each_arm_trains_with_its_own_loss_whatever_the_training_default(stubbed, tmp_path, monkeypatch):
    """The distillation sweep's arms carry their W and T; arms without `_kd` pass distill=False explicitly, so a
    change of `ouroboros train`'s default loss cannot change what an experiment measures."""
    import ouroboros_train.train as train

    seen = {}
    real_fake = train.train

    def capture(cfg, overwrite=False, resume=False):
        seen[Path(cfg.out).name] = (cfg.distill, cfg.distill_weight, cfg.distill_temperature)
        return real_fake(cfg, overwrite=overwrite, resume=resume)

    @dataclasses.dataclass
    class DistillByDefault(train.TrainConfig):  # as if `ouroboros train` distilled by default
        distill: bool = True

    monkeypatch.setattr(train, "train", capture)
    monkeypatch.setattr(train, "TrainConfig", DistillByDefault)
    out = str(tmp_path / "runs")
    assert study.main(["distill_sweep", "--updates", "3", "--out", out, "--train-only"]) == 0
    assert seen == {"controller": (False, 0.5, 1.0),
                    "controller_kd_w0.5_t1": (True, 0.5, 1.0), "controller_kd_w1_t1": (True, 1.0, 1.0),
                    "controller_kd_w0.5_t2": (True, 0.5, 2.0), "controller_kd_w1_t2": (True, 1.0, 2.0)}
    assert study.main(["quality", "--arms", "static,static_kd", "--updates", "3", "--out", out, "--train-only",
                       "--distill-temperature", "3"]) == 0
    assert seen["static"] == (False, 0.5, 1.0) and seen["static_kd"] == (True, 0.5, 3.0)
