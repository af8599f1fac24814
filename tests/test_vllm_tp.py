"""Tensor-parallel serving of exported Ouroboros checkpoints (adapters/ouroboros-vllm) on CPU: TP=2 with the `mp`
executor (two worker processes, vLLM's CPU all-reduce), greedy tokens against transformers `generate`, through
`LLM(...)` and through the real `vllm serve --tensor-parallel-size 2`; plus the front-end refusals of parallel
layouts that cannot be served (these run before any engine or worker starts).

The tiny Llama base here has a single KV head, so at TP=2 both ranks hold a replica of it (vLLM's GQA KV-head
replication) and the k/v low-rank factors are not split; the Qwen2 base has two KV heads (one per rank).
Each engine start costs ~1 min on a 2-core machine: three starts in all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ouro_config, randomize_adapter, save_base
from test_vllm import (  # noqa: F401  (`work` is the shared environment fixture)
    BLOCK,
    NEW_TOKENS,
    close,
    engine,
    first_divergence,
    free_port,
    hf_greedy,
    prompts,
    stop_server,
    wait_until_ready,
    vllm_greedy,
    work,
)

TP = 2
# name -> (arch, Ouroboros settings, base overrides)
TP_CASES = {
    "qwen2-causal_mean+coda_lora": ("qwen2", dict(num_prelude_layers=1, num_coda_layers=1, num_steps=3, coda_lora_r=8), {}),
    "llama-static": ("llama", dict(modulation="static", num_prelude_layers=0, num_coda_layers=1, num_steps=3), dict(num_key_value_heads=1)),
    "llama-token": ("llama", dict(controller_pooling="token", num_prelude_layers=1, num_coda_layers=1, num_steps=3), dict(num_key_value_heads=1)),
}
_exports: dict = {}
_references: dict = {}


def exported(work: Path, case: str) -> Path:
    if case not in _exports:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from ouroboros_peft import export

        arch, settings, base_overrides = TP_CASES[case]
        base = work / f"tp-base-{arch}-{'-'.join(f'{k}{v}' for k, v in base_overrides.items())}"
        if not base.exists():
            save_base(base, arch, **base_overrides)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), ouro_config(**settings))
        randomize_adapter(model, seed=5, scale=0.1)
        adapter = work / f"tp-adapter-{case}"
        model.save_pretrained(adapter)
        _exports[case] = export(base, adapter, work / f"tp-export-{case}")
    return _exports[case]


def reference(work: Path, case: str) -> list[list[int]]:
    if case not in _references:
        _references[case] = hf_greedy(exported(work, case), prompts())
    return _references[case]


def tp_engine(path: Path, **overrides):
    return engine(path, tensor_parallel_size=TP, distributed_executor_backend="mp", **overrides)


def skip_row_reduce(model) -> bool:
    """`LLM.apply_model` function (runs in every TP worker): drop the all-reduce of the row-parallel z (o_proj,
    down_proj), i.e. each rank adds B (m * A_shard x_shard) of its own slice only: a wrong model."""
    model.model.row_reduce = False
    return model.model.tp.tp_size


# -- refusals before the engine -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(tensor_parallel_size=3), r"tensor_parallel_size=3 \(--tensor-parallel-size\) does not divide .*num_attention_heads=4"),
        (dict(pipeline_parallel_size=2), r"pipeline_parallel_size=2 \(--pipeline-parallel-size\) is not supported"),
    ],
    ids=["tp-not-dividing-heads", "pipeline-parallel"],
)
def test_unservable_parallel_layout_is_refused_before_the_engine(work, overrides, pattern):
    """Refused while vLLM builds its config, in the calling process (no engine core, no workers): fast, and the
    message names the setting."""
    path = exported(work, "llama-token")
    from vllm.engine.arg_utils import EngineArgs

    # warm-up: the same front-end config path for a servable layout (first-use imports are not the refusal's time)
    EngineArgs(model=str(path), dtype="float32", block_size=BLOCK, max_model_len=128).create_engine_config()
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        llm = engine(path, distributed_executor_backend="mp", **overrides)
        close(llm)
    elapsed = time.monotonic() - start
    assert re.search(pattern, str(info.value)), str(info.value)[-2000:]
    assert elapsed < 3, f"refused only after {elapsed:.0f} s (an engine was started?)"


def test_vllm_serve_refuses_tensor_parallel_not_dividing_heads(work):
    """The CLI exits at config time (no engine core, no worker: their start-up lines never appear), naming the setting."""
    path = exported(work, "llama-token")
    cli = Path(sys.executable).with_name("vllm")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    start = time.monotonic()
    proc = subprocess.run(
        [str(cli), "serve", str(path), "--dtype", "float32", "--max-model-len", "128", "--block-size", str(BLOCK),
         "--tensor-parallel-size", "3"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"tensor_parallel_size=3 \(--tensor-parallel-size\) does not divide .*num_attention_heads=4", out), out[-3000:]
    assert "Initializing a V1 LLM engine" not in out and "Worker" not in out, out[-3000:]
    assert elapsed < 60, f"refused only after {elapsed:.0f} s"


# -- TP=2 parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,warm_pass", [("qwen2-causal_mean+coda_lora", True), ("llama-static", False)])
def test_tp2_greedy_tokens_match_transformers(work, case, warm_pass):
    """TP=2 (mp executor): greedy tokens equal transformers' (chunked prefill), for causal_mean also on a second,
    prefix-cache pass (its pooling statistic lives in the KV cache). Negative control in the same engine: without
    the all-reduce of the row-parallel z the tokens diverge."""
    path = exported(work, case)
    batch = prompts()
    expected = reference(work, case)
    assert len({tuple(t) for t in expected}) == len(expected), "degenerate reference"
    llm = tp_engine(path)
    try:
        cold, _ = vllm_greedy(llm, batch)
        warm, cached = vllm_greedy(llm, batch) if warm_pass else (None, None)
        sizes = llm.apply_model(skip_row_reduce)
        llm.reset_prefix_cache()
        broken, _ = vllm_greedy(llm, batch)
    finally:
        close(llm)
    for i, ids in enumerate(expected):
        assert cold[i] == ids, f"prompt {i}: TP={TP} diverged from transformers at token {first_divergence(cold[i], ids)}"
    if warm_pass:
        for i, ids in enumerate(expected):
            assert warm[i] == ids, f"prompt {i} (prefix-cache pass): diverged at token {first_divergence(warm[i], ids)}"
        assert all(c >= BLOCK for c in cached[:5]), f"the second pass did not hit the prefix cache: {cached}"
    assert sizes == [TP] * TP, sizes
    diverged = [first_divergence(b, e) for b, e in zip(broken, expected) if b != e]
    assert len(diverged) >= len(expected) // 2, f"skipping the row-parallel all-reduce went unnoticed: {broken} vs {expected}"


def test_vllm_serve_tensor_parallel_completions_match(work):
    """The real CLI: `vllm serve DIR --tensor-parallel-size 2`, /v1/completions with greedy settings, tokens and
    text equal to transformers; the server and its children are stopped by PID."""
    from transformers import AutoTokenizer

    case = "llama-token"
    path = exported(work, case)
    expected = reference(work, case)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cli = Path(sys.executable).with_name("vllm")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    # kept: VLLM_CPU_OMP_THREADS_BIND=nobind. vLLM's default ("auto") binds each CPU worker to its own NUMA node and
    # refuses TP=2 on a one-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers").
    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    log_path = work / "serve-tp.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(cli), "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "128", "--block-size", str(BLOCK), "--max-num-seqs", "8",
         "--tensor-parallel-size", str(TP), "--distributed-executor-backend", "mp"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    leftover = []
    try:
        wait_until_ready(server, url, log_path)

        def complete(ids):
            body = dict(model=str(path), prompt=ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_token_ids=True)
            req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                choice = json.load(r)["choices"][0]
            return choice["token_ids"], choice["text"]

        with ThreadPoolExecutor(len(prompts())) as pool:  # concurrent requests: the server batches them
            got, texts = map(list, zip(*pool.map(complete, prompts())))
    finally:
        leftover = stop_server(server)
        log.close()
    assert "world_size=2" in log_path.read_text() or "tensor_parallel_size=2" in log_path.read_text()
    assert not leftover, f"processes left behind after stopping vllm serve: {leftover}"
    for i, ids in enumerate(expected):
        assert got[i] == ids, f"prompt {i}: diverged at token {first_divergence(got[i], ids)}"
    # the completion is decoded after the prompt, so it starts with the word separator
    assert [t.strip() for t in texts] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected], texts
