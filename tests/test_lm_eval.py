"""lm-evaluation-harness adapter (adapters/ouroboros-lm-eval): `lm_eval --model ouroboros`, its registration,
the offline task files under evals/tasks/, and bad input. Tiny random models; the subprocess tests run the real,
unmodified `lm_eval` console script of this environment."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import load_script, ouro_config, randomize_adapter, save_base, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ADAPTER_SRC = REPO / "adapters" / "ouroboros-lm-eval"
TASKS_DIR = REPO / "evals" / "tasks"
BIN = Path(sys.executable).parent
PTH_NAME = "ouroboros_lm_eval.pth"


prepare_tasks = load_script("prepare_tasks", TASKS_DIR / "prepare_tasks.py")
bench = load_script("lm_eval_bench", REPO / "evals" / "lm_eval_bench.py")


def words(rng, low, high):
    return " ".join(f"w{int(i)}" for i in torch.randint(4, 96, (int(torch.randint(low, high + 1, (1,), generator=rng)),), generator=rng))


def subprocess_env(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(root / "hf-datasets"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("OUROBOROS_LM_EVAL_NO_HOOK", None)
    env.update(extra)
    return env


def console_script(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable} (install adapters/ouroboros-lm-eval)"
    return str(path)


# ---------------------------------------------------------------------------------------------------
# fixtures (module scope: built once)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from ouroboros_peft import export

    root = tmp_path_factory.mktemp("lm-eval")
    base = save_base(root / "base", "llama")
    model = randomize_adapter(get_peft_model(base, ouro_config(max_steps=4)), scale=0.5)
    model.save_pretrained(root / "adapter")
    export(root / "base", root / "adapter", root / "exported")
    save_base(root / "other", "llama", seed=7)  # same shapes, other weights
    save_base(root / "qwen", "qwen2")
    get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(root / "lora")
    get_peft_model(tiny_model("llama"), ouro_config(controller_pooling="sequence_mean")).save_pretrained(root / "seqmean")
    (root / "empty").mkdir()
    (root / "afile").write_text("not a model\n")
    return SimpleNamespace(root=root, base=str(root / "base"), adapter=str(root / "adapter"), exported=str(root / "exported"))


@pytest.fixture(scope="module")
def refs(art):
    """The models computed directly, without lm-eval."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ouroboros_peft  # noqa: F401

    base = AutoModelForCausalLM.from_pretrained(art.base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(art.base, dtype=torch.float32), art.adapter).eval()
    return SimpleNamespace(base=base, peft=peft, tok=AutoTokenizer.from_pretrained(art.base))


def make_lm(arg_string: str, batch_size: int = 1):
    from lm_eval.api.registry import get_model

    return get_model("ouroboros").create_from_arg_string(arg_string, {"batch_size": batch_size, "device": "cpu"})


@pytest.fixture(scope="module")
def lm_peft(art):
    return make_lm(f"pretrained={art.base},peft={art.adapter}")


@pytest.fixture(scope="module")
def lm_exported(art):
    return make_lm(f"pretrained={art.exported}")


def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """What lm-eval computes for one (context, continuation) pair, done by hand."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, token] for j, token in enumerate(cont)))


def direct_rolling(model, tok, text: str) -> float:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([[tok.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inputs, use_cache=False).logits[0].float(), dim=-1)
    return float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


PAIRS = [
    ("w4 w5 w6", " w7 w8"),
    ("w9 w10 w11 w12 w13 w14 w15 w16 w17", " w18"),
    ("w20", " w21 w22 w23 w24"),
    ("w40 w41 w42 w43", " w44 w45 w46"),
]
TEXTS = ["w4 w5 w6 w7 w8 w9 w10 w11 w12", "w30 w31 w32", "w50 w60 w70 w80 w90 w51 w61 w71 w81 w91 w52 w62"]


# ---------------------------------------------------------------------------------------------------
# scores: lm-eval == the model computed directly, != the base model
# ---------------------------------------------------------------------------------------------------
def test_loglikelihoods_equal_the_ouroboros_model_and_differ_from_the_base(lm_peft, lm_exported, refs):
    want = [direct_loglikelihood(refs.peft, refs.tok, c, x) for c, x in PAIRS]
    base = [direct_loglikelihood(refs.base, refs.tok, c, x) for c, x in PAIRS]
    for lm in (lm_peft, lm_exported):
        got = [score for score, _ in lm.loglikelihood(requests("loglikelihood", PAIRS))]
        assert got == pytest.approx(want, abs=1e-4)
    assert lm_peft.ouroboros_info()["kind"] == "peft" and lm_exported.ouroboros_info()["kind"] == "exported"
    # the adapter is really applied: every score moves well beyond numerical noise
    assert min(abs(w - b) for w, b in zip(want, base)) > 0.05


def test_rolling_loglikelihood_equals_the_model(lm_peft, refs):
    got = lm_peft.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    assert got == pytest.approx([direct_rolling(refs.peft, refs.tok, t) for t in TEXTS], abs=1e-4)
    assert got != pytest.approx([direct_rolling(refs.base, refs.tok, t) for t in TEXTS], abs=0.05)


def test_batched_requests_score_like_unbatched_ones(lm_peft):
    """lm-eval right-pads loglikelihood batches (no mask) and left-pads generation batches (with a mask)."""
    gen_args = {"until": ["w2"], "max_gen_toks": 6, "do_sample": False}
    prompts = [("w4 w5 w6", dict(gen_args)), ("w9 w10 w11 w12 w13 w14 w15", dict(gen_args)), ("w60", dict(gen_args))]
    outputs = {}
    try:
        for size in (1, 4):
            lm_peft.batch_size_per_gpu = size
            outputs[size] = (
                [s for s, _ in lm_peft.loglikelihood(requests("loglikelihood", PAIRS))],
                lm_peft.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS])),
                lm_peft.generate_until(requests("generate_until", prompts)),
            )
    finally:
        lm_peft.batch_size_per_gpu = 1
    assert outputs[4][0] == pytest.approx(outputs[1][0], abs=1e-4)
    assert outputs[4][1] == pytest.approx(outputs[1][1], abs=1e-4)
    assert outputs[4][2] == outputs[1][2] and any(outputs[1][2])


def test_left_padded_batch_matches_single_rows(lm_peft):
    """The property generation relies on: causal_mean pooling and positions ignore left padding."""
    texts = ["w4 w5 w6", "w9 w10 w11 w12 w13 w14 w15"]
    ids, mask = lm_peft.tok_batch_encode(texts, padding_side="left")
    assert (mask == 0).any()
    with torch.no_grad():
        batched = lm_peft.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        for row, text in enumerate(texts):
            single, _ = lm_peft.tok_batch_encode([text])
            alone = lm_peft.model(input_ids=single, use_cache=False).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=0)


def test_num_steps_override_for_adapter_and_exported_checkpoint(art, lm_peft):
    shallow_peft = make_lm(f"pretrained={art.base},peft={art.adapter},num_steps=2")
    shallow_exported = make_lm(f"pretrained={art.exported},num_steps=2")
    assert shallow_peft.active_plan().num_steps == 2 and shallow_exported.active_plan().num_steps == 2
    assert lm_peft.active_plan().num_steps == 3
    a = [s for s, _ in shallow_peft.loglikelihood(requests("loglikelihood", PAIRS))]
    b = [s for s, _ in shallow_exported.loglikelihood(requests("loglikelihood", PAIRS))]
    default = [s for s, _ in lm_peft.loglikelihood(requests("loglikelihood", PAIRS))]
    assert a == pytest.approx(b, abs=1e-4)
    assert min(abs(x - y) for x, y in zip(a, default)) > 1e-3
    deepest = make_lm(f"pretrained={art.exported},num_steps=4")  # max_steps rows are all usable
    assert deepest.active_plan().num_steps == 4


def test_bfloat16_keeps_the_ouroboros_modules_in_float32(art, lm_peft):
    """dtype=bfloat16 casts the base layers only, for the adapter and the exported checkpoint alike."""
    half_peft = make_lm(f"pretrained={art.base},peft={art.adapter},dtype=bfloat16")
    half_exported = make_lm(f"pretrained={art.exported},dtype=bfloat16")
    assert half_exported.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in half_exported.model.ouroboros.parameters()} == {torch.float32}
    a = [s for s, _ in half_peft.loglikelihood(requests("loglikelihood", PAIRS))]
    b = [s for s, _ in half_exported.loglikelihood(requests("loglikelihood", PAIRS))]
    full = [s for s, _ in lm_peft.loglikelihood(requests("loglikelihood", PAIRS))]
    # bf16 layers: a few ulps at these magnitudes (the exported model's embeddings, lm_head and logits are fp32, the
    # PEFT base is bf16 throughout, so the two differ from each other by about as much as from fp32)
    assert b == pytest.approx(full, abs=0.25)
    assert a == pytest.approx(full, abs=0.25)
    assert a != b


def test_plain_base_model_is_evaluated_unchanged(art, refs):
    lm = make_lm(f"pretrained={art.base}")
    got = [s for s, _ in lm.loglikelihood(requests("loglikelihood", PAIRS))]
    assert got == pytest.approx([direct_loglikelihood(refs.base, refs.tok, c, x) for c, x in PAIRS], abs=1e-4)
    assert lm.ouroboros_info() == {"kind": "base", "pretrained": art.base, "peft": None}


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error from the constructor
# ---------------------------------------------------------------------------------------------------
BAD = {
    "unknown-key": ("pretrained={base},peft={adapter},nm_steps=2", ["unknown model_args", "nm_steps", "num_steps"]),
    "no-pretrained": ("peft={adapter}", ["needs pretrained="]),
    "pretrained-file": ("pretrained={root}/afile", ["is a file"]),
    "pretrained-no-config": ("pretrained={root}/empty", ["without config.json"]),
    "peft-not-adapter": ("pretrained={base},peft={root}/empty", ["is not an adapter directory"]),
    "peft-lora": ("pretrained={base},peft={root}/lora", ["not an Ouroboros adapter", "LORA", "--model hf"]),
    "peft-other-family": ("pretrained={root}/qwen,peft={adapter}", ["different base model", "model_type"]),
    "peft-other-weights": ("pretrained={root}/other,peft={adapter}", ["different base model", "weights of layers."]),
    "peft-on-exported": ("pretrained={exported},peft={adapter}", ["already an exported Ouroboros checkpoint"]),
    "steps-on-base": ("pretrained={base},num_steps=2", ["only applies to Ouroboros"]),
    "steps-too-deep": ("pretrained={exported},num_steps=5", ["max_steps=4"]),
    "steps-too-deep-peft": ("pretrained={base},peft={adapter},num_steps=9", ["max_steps=4"]),
    "steps-zero": ("pretrained={base},peft={adapter},num_steps=0", ["positive integer"]),
    "steps-fraction": ("pretrained={exported},num_steps=2.5", ["positive integer"]),
    "sequence-mean": ("pretrained={base},peft={root}/seqmean", ["sequence_mean", "continuation"]),
    "bad-dtype": ("pretrained={exported},dtype=float33", ["not a torch dtype"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_args_give_a_clear_error(art, case):
    template, fragments = BAD[case]
    args = template.format(base=art.base, adapter=art.adapter, exported=art.exported, root=art.root)
    with pytest.raises(ValueError) as info:
        make_lm(args)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---------------------------------------------------------------------------------------------------
# registration: the start-up hook, the installed files, the builds
# ---------------------------------------------------------------------------------------------------
REGISTRY_PROBE = (
    "import sys, lm_eval.models\n"
    "from lm_eval.api.registry import model_registry as r\n"
    "print(repr(r._objs.get('ouroboros')), 'hf' in r, len(r), 'torch' in sys.modules)\n"
)


def test_startup_hook_registers_ouroboros_lazily_after_the_builtin_models(tmp_path):
    on = subprocess.run([sys.executable, "-c", REGISTRY_PROBE], capture_output=True, text=True, env=subprocess_env(tmp_path))
    assert on.returncode == 0, on.stderr
    placeholder, has_hf, count, torch_loaded = on.stdout.split()
    assert placeholder == "'ouroboros_lm_eval.model:OuroborosLM'"  # lazy: nothing heavy imported
    assert has_hf == "True" and torch_loaded == "False"
    off = subprocess.run(
        [sys.executable, "-c", REGISTRY_PROBE], capture_output=True, text=True, env=subprocess_env(tmp_path, OUROBOROS_LM_EVAL_NO_HOOK="1")
    )
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[:2] == ["None", "True"] and int(off.stdout.split()[2]) == int(count) - 1


def installed_hook() -> Path:
    from importlib.metadata import distribution

    dist = distribution("ouroboros-lm-eval")
    entries = [f for f in dist.files or [] if str(f) == PTH_NAME]
    assert entries, f"{PTH_NAME} is not in the RECORD of the installed ouroboros-lm-eval"
    return Path(dist.locate_file(entries[0])).resolve()


def test_the_installation_carries_the_startup_file_in_site_packages():
    import site

    path = installed_hook()
    assert path.is_file()
    site_dirs = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    assert path.parent in site_dirs, f"{path} is not directly in a site-packages folder"
    text = path.read_text()
    assert text.startswith("import ") and "ouroboros_lm_eval._startup" in text and "OUROBOROS_LM_EVAL_NO_HOOK" in text


def test_wheel_and_editable_builds_both_carry_the_startup_file(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ADAPTER_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = tmp_path / "dist"
    wheel = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert wheel.returncode == 0, wheel.stdout[-2000:] + wheel.stderr[-2000:]
    editable = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_editable({str(out / 'e')!r}))"],
        capture_output=True, text=True, cwd=src,
    )
    assert editable.returncode == 0, editable.stderr[-3000:]
    built = {}
    for path in list(out.glob("*.whl")) + list((out / "e").glob("*.whl")):
        with zipfile.ZipFile(path) as archive:
            built["editable" if "editable" in path.name else "wheel"] = archive.read(PTH_NAME).decode()
    assert set(built) == {"wheel", "editable"}
    assert built["wheel"] == built["editable"] == installed_hook().read_text()


# ---------------------------------------------------------------------------------------------------
# the offline task files (evals/tasks/prepare_tasks.py)
# ---------------------------------------------------------------------------------------------------
def fake_bigbench_sdist(path: Path, tasks: dict, extra_member: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra_member:
            info = tarfile.TarInfo(extra_member)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return path


def tiny_mc_task(n=6, seed=0):
    rng = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        choices = [f"w{4 + (7 * i + 3 * j) % 90} w{50 + j}" for j in range(3)]  # distinct by construction
        examples.append({"input": words(rng, 3, 8), "target_scores": {c: int(j == i % 3) for j, c in enumerate(choices)}})
    return {"name": "social_iqa", "examples": examples}


def test_bigbench_tasks_become_hellaswag_style_records(tmp_path):
    task = tiny_mc_task()
    task["task_prefix"] = "w90 w91\n"
    task["examples"].append({"input": "w4", "target_scores": {"w5": 1, "w6": 1}})  # shared best: skipped
    sdist = fake_bigbench_sdist(tmp_path / "bb.tar.gz", {"social_iqa": task, "strategyqa": tiny_mc_task(seed=1)})
    summary = prepare_tasks.prepare_bigbench(tmp_path / "data", sdist, ["social_iqa"])
    assert summary == {"social_iqa": {"examples": 6, "skipped": 1}}
    rows = [json.loads(line) for line in (tmp_path / "data/bigbench/social_iqa.jsonl").read_text().splitlines()]
    first = task["examples"][0]
    assert rows[0]["query"] == f"w90 w91\nQ: {first['input']}\nA:"
    assert rows[0]["choices"] == list(first["target_scores"])
    assert [r["label"] for r in rows] == [list(e["target_scores"].values()).index(1) for e in task["examples"][:6]]
    with pytest.raises(FileNotFoundError, match="causal_judgment"):
        prepare_tasks.read_bigbench_tasks(sdist, ["social_iqa", "causal_judgment"])
    evil = fake_bigbench_sdist(tmp_path / "evil.tar.gz", {"social_iqa": task}, extra_member="../escape.txt")
    with pytest.raises(ValueError, match="unsafe member"):
        prepare_tasks.read_bigbench_tasks(evil, ["social_iqa"])


def fake_manifest(path: Path, tokenizer, n=4, length=24, seed=0):
    from ouroboros_train.data import _tokenizer_info, write_heldout_manifest

    rng = torch.Generator().manual_seed(seed)
    chunks = {c: torch.randint(4, 96, (n, length), generator=rng) for c in prepare_tasks.HELDOUT_CORPORA}
    return write_heldout_manifest(chunks, {"format": 1, "tokenizer": _tokenizer_info(tokenizer)}, path), chunks


def test_heldout_chunks_become_perplexity_documents(tmp_path, art):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(art.base)
    manifest, chunks = fake_manifest(tmp_path / "m.safetensors", tok)
    summary = prepare_tasks.prepare_heldout(tmp_path / "data", manifest, art.base)
    assert summary["indist"] == {"chunks": 4, "exact_roundtrip": 4, "tokens": 96}
    rows = [json.loads(line) for line in (tmp_path / "data/heldout/reddit.jsonl").read_text().splitlines()]
    assert [tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows] == chunks["reddit"].tolist()
    other = tiny_tokenizer()
    other.add_tokens(["extra"])
    manifest2, _ = fake_manifest(tmp_path / "m2.safetensors", other)
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare_tasks.prepare_heldout(tmp_path / "data2", manifest2, art.base)


def test_hellaswag_file_is_checked_before_it_is_used(tmp_path):
    good = tmp_path / "val.jsonl"
    good.write_text(json.dumps({"activity_label": "w4", "ctx_a": "w5", "ctx_b": "", "endings": ["w6", "w7"], "label": "1"}) + "\n")
    assert prepare_tasks.prepare_hellaswag(tmp_path / "data", good) == {"hellaswag": {"examples": 1}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "w5", "endings": ["w6"], "label": "0"}) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        prepare_tasks.prepare_hellaswag(tmp_path / "data", bad)
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text(json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "", "endings": ["c"], "label": ""}) + "\n")
    with pytest.raises(ValueError, match="no label"):
        prepare_tasks.prepare_hellaswag(tmp_path / "data", unlabelled)


# ---------------------------------------------------------------------------------------------------
# the benchmark script's own logic (evals/lm_eval_bench.py)
# ---------------------------------------------------------------------------------------------------
def test_pruned_baseline_checkpoint_keeps_prelude_recurrent_and_coda(art, tmp_path):
    from torch import nn
    from transformers import AutoModelForCausalLM

    split = json.loads((Path(art.adapter) / "adapter_config.json").read_text())
    out = bench.build_pruned_checkpoint(art.base, split, tmp_path / "pruned")
    assert json.loads((out / "ouroboros_pruned.json").read_text())["layers"] == [0, 3, 5]  # 1 + layer 3 + 1 of 6
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(art.base).eval()
    ref.model.layers = nn.ModuleList([ref.model.layers[i] for i in (0, 3, 5)])
    ids = torch.randint(4, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)
        full = AutoModelForCausalLM.from_pretrained(art.base).eval()(ids, use_cache=False).logits
    assert pruned.config.num_hidden_layers == 3 and not torch.allclose(full, ref(ids, use_cache=False).logits, atol=1e-3)


def test_benchmark_table_and_doc_section(tmp_path):
    row = lambda name, nll, acc: {"name": name, "source": name, "wall_s": 1.0, "ouroboros": None,  # noqa: E731
                                  "metrics": {"ouro_heldout_indist": {"nll": nll}, "ouro_bigbench_social_iqa": {"acc": acc}}}
    report = {"arms": [row("full", 2.0, 0.5), row("pruned", 6.0, 0.3), row("ctrl", 4.0, 0.4)], "limit": None,
              "tasks": "t", "command": "c", "machine": "m", "lm_eval_version": "0.4.13"}
    table = bench.markdown(report)
    assert "| ctrl | full | 0.400 | 4.0000 | 50.0 % | 1 |" in table  # gap recovery (6 - 4) / (6 - 2)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nkeep me\n")
    bench.update_doc(doc, "## lm-eval\n\nfirst\n")
    bench.update_doc(doc, "## lm-eval\n\nsecond\n")
    text = doc.read_text()
    assert text.startswith("# Results\n\nkeep me\n") and text.count(bench.DOC_START) == 1 == text.count(bench.DOC_END)
    assert "second" in text and "first" not in text
    with pytest.raises(FileNotFoundError):
        bench.update_doc(tmp_path / "missing.md", "x")


# ---------------------------------------------------------------------------------------------------
# the literal command lines
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(art, tmp_path_factory):
    """A working directory laid out like the repository root: evals/tasks/data/... made by prepare_tasks.py from
    tiny-vocabulary inputs, so the repository's own task YAMLs run on them."""
    from transformers import AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    data = run / "evals" / "tasks" / "data"
    sdist = fake_bigbench_sdist(run / "bb.tar.gz", {"social_iqa": tiny_mc_task(n=5)})
    prepare_tasks.prepare_bigbench(data, sdist, ["social_iqa"])
    manifest, _ = fake_manifest(run / "m.safetensors", AutoTokenizer.from_pretrained(art.base), n=3, length=20)
    prepare_tasks.prepare_heldout(data, manifest, art.base)
    rows = [{"activity_label": "w4", "ctx_a": "w5 w6 w7", "ctx_b": "", "endings": ["w8 w9", "w10", "w11 w12"], "label": str(i % 3)} for i in range(3)]
    hs = run / "hellaswag_val.jsonl"
    hs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_tasks.prepare_hellaswag(data, hs)
    return run


def read_run(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = sorted(out.rglob("results_*.json"))
    assert results, f"no results under {out}"
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert samples, f"no samples for {task} under {out}"
    return json.loads(results[-1].read_text()), [json.loads(line) for line in samples[-1].read_text().splitlines()]


def run_lm_eval(script: str, run: Path, model: str, model_args: str, tasks: str, out: Path, **env):
    cmd = [
        console_script(script), "--model", model, "--model_args", model_args, "--tasks", tasks,
        "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "4",
        "--output_path", str(out), "--log_samples",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=run, env=subprocess_env(run, **env), timeout=900)


@pytest.mark.slow
def test_lm_eval_command_line_with_an_ouroboros_adapter(art, refs, run_dir):
    out = run_dir / "out-ouroboros"
    tasks = "ouro_bigbench_social_iqa,ouro_heldout_indist,hellaswag"
    proc = run_lm_eval("lm_eval", run_dir, "ouroboros", f"pretrained={art.base},peft={art.adapter}", tasks, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "overrides existing task" in proc.stderr  # the local hellaswag replaced the Hub one

    results, samples = read_run(out, "ouro_bigbench_social_iqa")
    assert results["config"]["ouroboros"]["kind"] == "peft" and results["config"]["ouroboros"]["num_steps"] == 3
    correct = []
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        reported = [float(r[0][0]) for r in sample["resps"]]
        direct = [direct_loglikelihood(refs.peft, refs.tok, c, x) for c, x in pairs]
        assert reported == pytest.approx(direct, abs=1e-4)
        assert reported != pytest.approx([direct_loglikelihood(refs.base, refs.tok, c, x) for c, x in pairs], abs=1e-3)
        correct.append(float(max(range(len(direct)), key=direct.__getitem__) == int(sample["target"])))
    assert results["results"]["ouro_bigbench_social_iqa"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    _, rolling = read_run(out, "ouro_heldout_indist")
    total, tokens = 0.0, 0
    for sample in rolling:
        text = sample["arguments"]["gen_args_0"]["arg_0"]
        assert float(sample["resps"][0][0]) == pytest.approx(direct_rolling(refs.peft, refs.tok, text), abs=1e-3)
        total += direct_rolling(refs.peft, refs.tok, text)
        tokens += sample["doc"]["n_tokens"]
    reported = results["results"]["ouro_heldout_indist"]["token_perplexity,none"]
    assert reported == pytest.approx(float(torch.exp(torch.tensor(-total / tokens, dtype=torch.float64))), rel=1e-4)
    assert "acc,none" in results["results"]["hellaswag"]


@pytest.mark.slow
def test_lm_eval_model_hf_still_works_with_the_adapter_installed(art, refs, run_dir):
    out = run_dir / "out-hf"
    proc = run_lm_eval("lm_eval", run_dir, "hf", f"pretrained={art.base},dtype=float32", "ouro_bigbench_social_iqa", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, samples = read_run(out, "ouro_bigbench_social_iqa")
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        reported = [float(r[0][0]) for r in sample["resps"]]
        assert reported == pytest.approx([direct_loglikelihood(refs.base, refs.tok, c, x) for c, x in pairs], abs=1e-4)


@pytest.mark.slow
def test_ouroboros_eval_registers_the_model_without_the_hook(art, run_dir):
    """With the start-up hook switched off, `lm_eval` no longer knows the model (the probe in
    test_startup_hook_registers_ouroboros_lazily_after_the_builtin_models shows that), while `ouroboros-eval`
    registers it itself: a bad argument then reaches our constructor and its message."""
    proc = run_lm_eval(
        "ouroboros-eval", run_dir, "ouroboros", f"pretrained={art.exported},peft={art.adapter}", "ouro_bigbench_social_iqa",
        run_dir / "out-explicit", OUROBOROS_LM_EVAL_NO_HOOK="1",
    )
    assert proc.returncode != 0 and "no model for this name found" not in proc.stderr
    assert "ValueError: pretrained=" in proc.stderr and "already an exported Ouroboros checkpoint" in proc.stderr
