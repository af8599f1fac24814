"""Which trainable parameters pure bf16 training leaves unmoved (the reference implementation's precision setup).

The reference trains everything, optimizer included, in bf16. A bf16 number keeps 8 significant bits, so an
AdamW step (about `lr` in size) is rounded away wherever it is smaller than half the spacing of bf16 numbers
around the parameter: at lr 2e-3 that is every element of magnitude >= 0.5 (the gate bias starts at
logit(0.12) = -1.99; the reference's per-step norms start at 1). This script trains the paper-faithful setup
(labels shifted twice, sequence_mean pooling, unit norms, constant lr like the reference) for a few updates
twice on the same data, once with fp32 trainables and once in pure bf16, and reports per parameter group the
share of elements that changed from their initial value.

bf16 matrix products have no fast path on an AVX2-only CPU (~46x slower than fp32 here), so the run is short
(default 8 updates of 1 x 64 tokens). The rounding of the optimizer step, which is what freezes parameters,
is the same on any hardware.

    OUROBOROS_CACHE=/tmp/ocache python evals/bf16_stall.py --out evals/results/bf16_stall.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from ouroboros_plugins.atomic import write_json

# (group, pattern on the trainable parameter's name); the first match names the group
GROUPS = (
    ("gate bias", r"gate.*\.bias$"),
    ("gate weight", r"gate.*\.weight$"),
    ("step norms", r"norm"),
    ("controller", r"controller"),
    ("static modulation", r"static"),
    ("other", r"."),
)
SPLIT = dict(num_prelude_layers=7, num_coda_layers=7, recurrent_layer_index=15, num_steps=4, r=32,
             controller_pooling="sequence_mean")


def group_of(name: str) -> str:
    return next(g for g, pattern in GROUPS if re.search(pattern, name))


def changed_share(initial: dict, final: dict) -> dict:
    """group -> {"elements", "changed", "share_changed", "max_abs_change"}; compares in the final tensors' dtype."""
    out: dict = {}
    for name, after in final.items():
        before = initial[name].to(after.dtype)
        g = out.setdefault(group_of(name), {"elements": 0, "changed": 0, "max_abs_change": 0.0})
        diff = (after.float() - before.float()).abs()
        g["elements"] += after.numel()
        g["changed"] += int((after != before).sum())
        g["max_abs_change"] = max(g["max_abs_change"], float(diff.max()))
    for g in out.values():
        g["share_changed"] = g["changed"] / g["elements"]
    return out


def trainables(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def initial_trainables(cfg) -> dict:
    """The trainable parameters `train(cfg)` starts from: a fresh adapter built with the seed train() builds with
    (exact when cfg.calibrate_norms is False; calibration changes the norms after the build)."""
    from ouroboros_train.train import build_model, load_base

    base, _, _ = load_base(cfg.base)
    torch.manual_seed(cfg.seed)
    return trainables(build_model(base, cfg.adapter))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="evals/results/bf16_stall.json")
    args = ap.parse_args(argv)

    from ouroboros_train.default_model import default_model_dir
    from ouroboros_train.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = str(default_model_dir())
    rows, wall = {}, {}
    with tempfile.TemporaryDirectory(prefix="bf16-stall-") as tmp:
        for label, pure_bf16 in (("fp32 trainables", False), ("pure bf16", True)):
            cfg = TrainConfig(base=model_dir, out=os.path.join(tmp, label.replace(" ", "_")), adapter=dict(SPLIT),
                              max_updates=args.updates, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                              warmup=1, min_lr_ratio=1.0, label_offset=2, calibrate_norms=False, pure_bf16=pure_bf16,
                              checkpoint_every=args.updates, progress=False, threads=args.threads)
            initial = initial_trainables(cfg)
            t0 = time.perf_counter()
            result = train(cfg)
            wall[label] = time.perf_counter() - t0
            rows[label] = changed_share(initial, trainables(result.model))
            print(f"{label}: {wall[label]:.0f} s", flush=True)

    command = "python evals/bf16_stall.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "model": model_dir, "setup": {**SPLIT, "label_offset": 2, "calibrate_norms": False,
              "updates": args.updates, "tokens_per_update": args.batch_size * args.seq_len, "lr": args.lr,
              "schedule": "1 warmup update, then constant"}, "wall_s": wall, "groups": rows,
              "torch": torch.__version__}
    write_json(Path(args.out), report)
    print("| group | elements | changed, fp32 trainables | changed, pure bf16 |")
    print("|---|---|---|---|")
    for g in rows["fp32 trainables"]:
        a, b = rows["fp32 trainables"][g], rows["pure bf16"][g]
        print(f"| {g} | {a['elements']:,} | {a['share_changed']:.1%} | {b['share_changed']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
