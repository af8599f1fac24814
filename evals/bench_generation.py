"""Generation benchmarks (issue: generation with a KV cache through the recurrence).

1. Decode throughput with the KV cache vs without, 128 new tokens, batch 1 and 8 (target: cached >= 10x).
   Beside it, the same measurement on the unmodified base model (adapter disabled: all layers, transformers' code).
2. Overhead of the recurrence against the physical limit: prelude + N steps + coda with Controller, modulated
   LoRA, per-step norm and gate, against a plain stack of the same layer applications (same code path, no
   Controller/LoRA/norm/gate), measured interleaved in one run (target ratio <= 1.10, fp32, CPU).

    python evals/bench_generation.py --out evals/results/generation.json            # tiny + default model
    python evals/bench_generation.py --models tiny --out /tmp/gen.json             # quick
    python evals/bench_generation.py --models default --parts overhead --out evals/results/step_overhead.json

Writes JSON and prints a markdown table (docs/performance.md records it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ouroboros_plugins.atomic import write_json

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def build(model_name: str, num_steps: int):
    from peft import get_peft_model

    from ouroboros_peft import OuroborosConfig

    if model_name == "tiny":
        from conftest import randomize_adapter, tiny_model

        base = tiny_model("llama", layers=6)
        config = OuroborosConfig(num_prelude_layers=1, num_coda_layers=1, num_steps=num_steps, r=8)
        model = randomize_adapter(get_peft_model(base, config), scale=0.05)
    else:
        from transformers import AutoModelForCausalLM

        from ouroboros_train.default_model import default_model_dir

        base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
        config = OuroborosConfig(num_prelude_layers=7, num_coda_layers=7, num_steps=num_steps, r=32)
        model = get_peft_model(base, config)
        with torch.no_grad():  # move the zero-initialised heads off zero so the LoRA path really runs
            for name, p in model.named_parameters():
                if ".heads." in name:
                    p.normal_(0, 1e-3)
    return model.eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_inner(fn, inner: int) -> float:
    """Mean seconds per call over `inner` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def decode_throughput(model, batch: int, new_tokens: int, prompt_len: int, vocab: int, repeats: int) -> dict:
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # warm up (first-call allocations and kernel selection are not decode time)
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = {"repeats": repeats}
    for use_cache in (True, False):
        def go():
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               use_cache=use_cache, pad_token_id=0)
        seconds = timed(go, repeats)
        out["cached" if use_cache else "uncached"] = {"seconds": seconds, "tokens_per_s": batch * new_tokens / seconds}
    out["speedup"] = out["cached"]["tokens_per_s"] / out["uncached"]["tokens_per_s"]
    return out


def recurrence_overhead(model, batch: int, seq: int, vocab: int, repeats: int) -> dict:
    """Ouroboros forward vs the same layer applications with no Controller/LoRA/norm/gate, interleaved."""
    from ouroboros_plugins.layer import AttentionInputs, build_attention_mask
    from ouroboros_plugins.dense import run

    wrapper = model.base_model.model.model
    decoder, backbone = wrapper.base_layer, wrapper.backbone
    adapter, plan = wrapper.ouroboros_adapter["default"], wrapper.plans["default"]
    layers = backbone.layers(decoder)
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    embeds = backbone.embed(decoder, ids)
    sequence = [layers[i] for i in plan.prelude] + [layers[plan.recurrent]] * plan.num_steps + [layers[i] for i in plan.coda]

    def plain():
        pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)
        impl = backbone.attention_implementation(decoder)
        mask = build_attention_mask(None, batch, seq, 0, embeds.dtype, embeds.device, impl)
        cos, sin = backbone.rotary(decoder, embeds, pos)
        h = embeds
        for layer in sequence:
            h = backbone.run_layer(layer, h, AttentionInputs(cos, sin, mask, impl))
        return backbone.final_norm(decoder, h)

    def ouroboros():
        return run(backbone, decoder, adapter, plan, embeds)

    with torch.no_grad():
        plain(), ouroboros()  # warm up
        start = time.perf_counter()
        plain()
        inner = max(1, int(0.1 / max(time.perf_counter() - start, 1e-6)))  # each sample runs >= ~0.1 s
        p_times, o_times, ratios = [], [], []
        for _ in range(repeats):  # interleaved pairs so drift on a shared machine hits both alike
            p_times.append(timed_inner(plain, inner))
            o_times.append(timed_inner(ouroboros, inner))
            ratios.append(o_times[-1] / p_times[-1])
    p, o = statistics.median(p_times), statistics.median(o_times)
    return {"plain_seconds": p, "ouroboros_seconds": o, "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "pairs": repeats, "calls_per_sample": inner,
            "layer_applications": len(sequence)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,default", help="comma list of tiny,default")
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved plain/Ouroboros sample pairs")
    parser.add_argument("--parts", default="decode,overhead", help="comma list of decode,overhead")
    parser.add_argument("--out", default=str(HERE / "results" / "generation.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
               "load_average_before": round(os.getloadavg()[0], 2),
               "command": "python evals/bench_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "num_steps": args.num_steps, "new_tokens": args.new_tokens, "models": {}}
    for name in args.models.split(","):
        model = build(name, args.num_steps)
        vocab = model.config.vocab_size
        entry = {"decode": {}, "base_decode": {}, "overhead": {}}
        repeats = 3 if name == "tiny" else 1
        for batch in (1, 8) if "decode" in args.parts else ():
            entry["decode"][f"batch{batch}"] = decode_throughput(model, batch, args.new_tokens, 16, vocab, repeats)
            print(name, "decode batch", batch, json.dumps(entry["decode"][f"batch{batch}"]), flush=True)
            # Reference: the unmodified base model (all its layers, transformers' own code) under the same
            # protocol, i.e. what the same cache buys a plain model on this machine.
            with model.disable_adapter():
                entry["base_decode"][f"batch{batch}"] = decode_throughput(model, batch, args.new_tokens, 16, vocab, repeats)
            print(name, "base model decode batch", batch, json.dumps(entry["base_decode"][f"batch{batch}"]), flush=True)
        seq = 256 if name == "default" else 128
        if "overhead" in args.parts:
            entry["overhead"] = recurrence_overhead(model, 1, seq, vocab, args.repeats)
            print(name, "overhead", json.dumps(entry["overhead"]), flush=True)
        results["models"][name] = entry
        write_json(Path(args.out), results)  # after every model, so a long run keeps what it measured
    print("\n| model | batch | cached tok/s | uncached tok/s | speedup (target >= 10x) | base model (all layers, no adapter): cached / uncached tok/s, speedup |")
    print("|---|---|---|---|---|---|")
    for name, entry in results["models"].items():
        for key, d in entry["decode"].items():
            b = entry["base_decode"][key]
            print(f"| {name} | {key[5:]} | {d['cached']['tokens_per_s']:.1f} | {d['uncached']['tokens_per_s']:.1f} | {d['speedup']:.1f}x | "
                  f"{b['cached']['tokens_per_s']:.1f} / {b['uncached']['tokens_per_s']:.1f}, {b['speedup']:.1f}x |")
    print("\n| model | layer applications | plain ms | Ouroboros ms | ratio, median (min-max) of pairs (target <= 1.10) |")
    print("|---|---|---|---|---|")
    for name, entry in results["models"].items():
        o = entry["overhead"]
        if not o:
            continue
        print(f"| {name} | {o['layer_applications']} | {o['plain_seconds'] * 1e3:.1f} | {o['ouroboros_seconds'] * 1e3:.1f} | "
              f"{o['ratio']:.3f} ({o['ratio_min']:.3f}-{o['ratio_max']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
