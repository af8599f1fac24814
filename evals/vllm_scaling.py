"""How close served Ouroboros is to its arithmetic limit, and what tensor parallelism does on this machine.

1. The exported Ouroboros model (prelude + N steps + coda layer applications) against the plain base it was cut
   from (all its layers), served by the same vLLM with the same prompts and settings, in one run: the tokens/s
   ratio, beside its limit, the ratio of multiply-adds per generated token (layers, lm_head and the per-step extras:
   gate, modulated low-rank paths, Controller; attention over the context is left out, it is the same per layer
   application and small at these lengths).
2. An export at tensor_parallel_size 2 against 1 (mp executor for both, so only TP differs). SmolLM2-135M has 9
   attention heads and 3 KV heads, which 2 ranks cannot split (ouroboros-vllm refuses it at config time), so this
   part runs on a random-weight Llama of SmolLM2's depth and a similar size whose heads split in two (hidden 512,
   8 heads, 4 KV heads, MLP 1536, 30 layers, SmolLM2's vocabulary), exported with the same settings.

    OUROBOROS_CACHE=~/.cache/ouroboros python evals/vllm_scaling.py --out evals/results/vllm_scaling.json --docs docs/performance.md

Default checkpoint: as evals/vllm_bench.py builds it (SmolLM2-135M, prelude 7, 4 steps, coda 7, r 32, causal_mean
Controller, heads moved off zero). fp32, enforce_eager, greedy, 16 prompts x 64 random tokens, 64 new tokens
(EOS ignored), prefix cache off, best of --repeats after a warm-up; the two engines of a comparison run
alternately (A, B, A, B, ...) so a change of load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ouroboros_plugins.atomic import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_bench import build_export, make_prompts, setup_env, write_section  # noqa: E402

START, END = "<!-- vllm_scaling:start -->", "<!-- vllm_scaling:end -->"


def macs_per_token(config: dict, spec: dict | None) -> dict:
    """Multiply-adds per generated token: the decoder layers applied, lm_head, and (Ouroboros) the per-step extras."""
    d, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    layer = sum(o * i for o, i in shapes.values())
    head = config["vocab_size"] * d
    if spec is None:
        return dict(layer=layer, lm_head=head, applications=config["num_hidden_layers"], extras_per_step=0,
                    total=config["num_hidden_layers"] * layer + head)
    r, steps = spec["r"], spec["num_steps"]
    targets = spec.get("target_modules") or list(shapes)
    lora = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    gate = 2 * d * d if spec.get("use_gate", True) else 0
    controller = 0
    if spec.get("modulation", "controller") == "controller":
        state, width = spec.get("controller_state_dim", 256), spec.get("controller_hidden", 128)
        controller = d * state + (state + width) * state + state * width + width * r * len(targets)
    extras = lora + gate + controller
    applications = spec["num_prelude_layers"] + steps + spec["num_coda_layers"]
    coda_lora = spec.get("coda_lora_r", 0) * sum(o + i for o, i in shapes.values()) * spec["num_coda_layers"]
    return dict(layer=layer, lm_head=head, applications=applications, extras_per_step=extras,
                lora=lora, gate=gate, controller=controller, coda_lora=coda_lora,
                total=applications * layer + steps * extras + coda_lora + head)


def random_tp_base(work: Path, like: dict) -> Path:
    """A random-weight Llama of `like`'s depth and vocabulary, shaped so tensor_parallel_size 2 divides it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=like["vocab_size"], hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=like["num_hidden_layers"], num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    out = work / "tp-base"
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # `ouroboros export` ships the base's tokenizer
        shutil.copy(Path(like["_dir"]) / name, out / name)
    return out


def start_engine(path: Path, **overrides):
    from vllm import LLM

    kw = dict(model=str(path), dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=512, seed=0,
              skip_tokenizer_init=True)  # token ids in and out
    kw.update(overrides)
    start = time.perf_counter()
    llm = LLM(**kw)
    return llm, time.perf_counter() - start


def run_once(llm, prompts, new_tokens: int):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == new_tokens for t in tokens)
    return seconds, tokens


def alternate(engines: dict, prompts, new_tokens: int, repeats: int) -> dict:
    """Warm every engine, then run them in turn `repeats` times; best (minimum) wall time each."""
    from vllm import SamplingParams

    for llm in engines.values():
        llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False), use_tqdm=False)
    times = {name: [] for name in engines}
    outputs = {}
    for _ in range(repeats):
        for name, llm in engines.items():
            seconds, outputs[name] = run_once(llm, prompts, new_tokens)
            times[name].append(seconds)
            print(f"  {name}: {seconds:.2f} s", flush=True)
    tokens = len(prompts) * new_tokens
    return {name: dict(seconds=min(t), all_seconds=t, tokens_per_s=tokens / min(t), outputs=outputs[name]) for name, t in times.items()}


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def report(result: dict) -> str:
    a, t = result["against_base"], result["tensor_parallel"]
    m = result["macs"]
    lines = [
        "| served model | layer applications | M multiply-adds / token | tokens/s (best of %d) |" % result["repeats"],
        "| --- | ---: | ---: | ---: |",
        f"| plain base (all layers) | {m['base']['applications']} | {m['base']['total'] / 1e6:.1f} | {a['base']['tokens_per_s']:.1f} |",
        f"| Ouroboros export | {m['ouroboros']['applications']} | {m['ouroboros']['total'] / 1e6:.1f} | {a['ouroboros']['tokens_per_s']:.1f} |",
        "",
        f"Ratio Ouroboros / base: **{a['ratio']:.2f}x**; limit (ratio of multiply-adds): {a['limit']:.2f}x; "
        f"target >= {a['target']:.2f}x (95 % of the limit): **{'met' if a['ratio'] >= a['target'] else 'missed'}** "
        f"({a['ratio'] / a['limit'] * 100:.0f} % of the limit). Extras per step: gate {m['ouroboros']['gate'] / 1e6:.2f} M, "
        f"low-rank paths {m['ouroboros']['lora'] / 1e6:.2f} M, Controller {m['ouroboros']['controller'] / 1e6:.2f} M "
        f"(a layer: {m['ouroboros']['layer'] / 1e6:.2f} M).",
    ]
    if t:
        lines += [
            "",
            "Tensor parallel, on a random-weight Llama of SmolLM2's depth whose heads split in two (hidden 512, 8 heads, "
            "4 KV heads, MLP 1536; SmolLM2-135M's 9 / 3 heads cannot be split), plain and exported with the same "
            "settings; mp executor at both sizes, TP 1 on cores 0-1, TP 2 one core per worker (`VLLM_CPU_OMP_THREADS_BIND`):",
            "",
            "| model | TP 1 tokens/s | TP 2 tokens/s | TP 2 / TP 1 | greedy outputs TP 2 = TP 1 |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for label, row in t.items():
            lines.append(f"| {'plain base' if label == 'base' else 'Ouroboros export'} | {row['tp1']['tokens_per_s']:.1f} | "
                         f"{row['tp2']['tokens_per_s']:.1f} | **{row['ratio']:.2f}x** | {row['identical_prompts']}/{result['prompts']} |")
    return "\n".join(lines)


def write_docs(path: Path, result: dict) -> None:
    body = "\n".join([
        START,
        "## Served recurrence against its limit, and tensor parallel (evals/vllm_scaling.py)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']} (1-min load average before/after: {result['load_average_before_after']}). "
        f"vLLM {result['vllm_version']} (CPU), fp32, enforce_eager, prefix cache off; {result['prompts']} prompts x "
        f"{result['prompt_length']} random tokens, {result['new_tokens']} new tokens each (EOS ignored), greedy; the engines of "
        "a comparison run alternately after a warm-up. Checkpoint: SmolLM2-135M exported with prelude "
        f"{result['checkpoint']['num_prelude_layers']}, {result['checkpoint']['num_steps']} steps, coda "
        f"{result['checkpoint']['num_coda_layers']}, r {result['checkpoint']['r']}, {result['checkpoint']['controller_pooling']} Controller.",
        "",
        report(result),
        END,
    ])
    write_section(path, START, END, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model directory (default: default_model_dir())")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pooling", default="causal_mean", choices=["causal_mean", "token"],
                        help="the exported Controller's pooling (causal_mean adds attention slots per step in vLLM)")
    parser.add_argument("--no-tp", dest="tp", action="store_false", help="skip the tensor-parallel comparison")
    parser.add_argument("--out", default="evals/results/vllm_scaling.json")
    parser.add_argument("--docs", help="markdown file whose vllm_scaling section is rewritten")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vllm-scaling-"))
    setup_env(work)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # TP workers on a 1-NUMA-node CPU
    from ouroboros_train.default_model import default_model_dir

    base_dir = Path(args.base or default_model_dir())
    export_dir, checkpoint = build_export(work, str(base_dir), args.pooling)
    export_config = json.loads((export_dir / "config.json").read_text())
    base_config = json.loads((base_dir / "config.json").read_text())
    prompts = make_prompts(args.prompts, args.prompt_length, base_config["vocab_size"])
    macs = {"base": macs_per_token(base_config, None), "ouroboros": macs_per_token(base_config, export_config)}
    limit = macs["base"]["total"] / macs["ouroboros"]["total"]
    load_before = os.getloadavg()

    import vllm

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # both engines in this process, alternating
    engines, starts = {}, {}
    for name, path in (("base", base_dir), ("ouroboros", export_dir)):
        engines[name], starts[name] = start_engine(path)
    measured = alternate(engines, prompts, args.new_tokens, args.repeats)
    for llm in engines.values():
        close(llm)
    engines.clear()
    ratio = measured["ouroboros"]["tokens_per_s"] / measured["base"]["tokens_per_s"]
    against_base = dict(ratio=ratio, limit=limit, target=0.95 * limit,
                        **{k: {kk: vv for kk, vv in v.items() if kk != "outputs"} | {"engine_start_s": starts[k]} for k, v in measured.items()})
    print(f"Ouroboros / base: {ratio:.3f}x (limit {limit:.3f}x)", flush=True)

    tensor_parallel = None
    if args.tp:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        tp_base = random_tp_base(work, dict(base_config, _dir=str(base_dir)))
        tp_export, _ = build_export(work / "tp", str(tp_base), args.pooling)
        tensor_parallel = {}
        for label, path in (("base", tp_base), ("ouroboros", tp_export)):
            tp_engines, tp_starts = {}, {}
            for size, bind in ((1, "0-1"), (2, "0|1")):  # TP 2: one core per worker, as vLLM's CPU docs advise
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
                tp_engines[f"tp{size}"], tp_starts[f"tp{size}"] = start_engine(
                    path, tensor_parallel_size=size, distributed_executor_backend="mp")
            tp = alternate(tp_engines, prompts, args.new_tokens, args.repeats)
            for llm in tp_engines.values():
                close(llm)
            identical = sum(a == b for a, b in zip(tp["tp1"]["outputs"], tp["tp2"]["outputs"]))
            tensor_parallel[label] = dict(
                ratio=tp["tp2"]["tokens_per_s"] / tp["tp1"]["tokens_per_s"], identical_prompts=identical,
                **{k: {kk: vv for kk, vv in v.items() if kk != "outputs"} | {"engine_start_s": tp_starts[k]} for k, v in tp.items()})
            print(f"{label}: TP2 / TP1: {tensor_parallel[label]['ratio']:.3f}x", flush=True)


    result = dict(
        command=" ".join(
            ([f"OUROBOROS_CACHE={shlex.quote(os.environ['OUROBOROS_CACHE'])}"] if "OUROBOROS_CACHE" in os.environ else [])
            + ["python", "evals/vllm_scaling.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        ),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        load_average_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        vllm_version=vllm.__version__, checkpoint=checkpoint, prompts=args.prompts, prompt_length=args.prompt_length,
        new_tokens=args.new_tokens, repeats=args.repeats, macs=macs, against_base=against_base, tensor_parallel=tensor_parallel,
    )
    write_json(Path(args.out), result)
    print(report(result))
    if args.docs:
        write_docs(Path(args.docs), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
