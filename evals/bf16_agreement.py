"""Half-precision fidelity of a trained adapter: top-1 next-token agreement and largest logit difference against
fp32, on held-out chunks, with the recurrence's residual stream in fp32 (the default) and in the model's own dtype
(the behaviour before; `ouroboros_plugins.recurrence.RECURRENCE_DTYPE = None`), beside the full base model's own
half-precision agreement (adapter disabled: what half precision costs any model), side by side in one run.

    python evals/bf16_agreement.py --adapter RUN/adapter --chunks 4 --out evals/results/bf16_agreement.json

bf16 matrix products have no fast path on an AVX2-only CPU (tens of times slower than fp32), so the default is a
few chunks of the in-distribution corpus; the fp32 reference and every half-precision arm read the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from ouroboros_plugins.atomic import write_json, write_text

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder (save_pretrained output) trained on --base")
    ap.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M)")
    ap.add_argument("--corpus", default="indist")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON results (and a .md table beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import ouroboros_peft  # noqa: F401  (registers the PEFT type)
    import ouroboros_plugins.recurrence as recurrence
    from ouroboros_train.data import default_manifest_path, load_heldout_manifest
    from ouroboros_train.default_model import default_model_dir

    base = default_model_dir() if args.base == "default" else Path(args.base)
    chunks = load_heldout_manifest(default_manifest_path())[0][args.corpus][: args.chunks].to(torch.long)

    adapter = args.adapter

    def logits(dtype, stream, full=False, exported=None):
        recurrence.RECURRENCE_DTYPE = stream
        if exported is not None:  # the standalone exported model (`ouroboros export`), which computes fp32 logits
            model = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).eval()
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()
        t0 = time.perf_counter()
        with torch.no_grad(), (model.disable_adapter() if full else contextlib.nullcontext()):
            out = torch.cat([model(input_ids=chunks[i : i + 1]).logits.float() for i in range(len(chunks))])
        return out, time.perf_counter() - t0

    reference, ref_s = logits(torch.float32, torch.float32)
    full_reference, _ = logits(torch.float32, torch.float32, full=True)
    # an adapter saved before weight signatures carries a bf16 hash of its base, which an fp16 load cannot match:
    # loaded once in fp32 (passing that check) and saved again, it carries signatures that every dtype passes
    upgraded = tempfile.mkdtemp(prefix="bf16_agreement-")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), args.adapter).save_pretrained(upgraded)
    adapter = upgraded
    from ouroboros_peft import export

    exported = export(base, adapter, Path(tempfile.mkdtemp(prefix="bf16_agreement-export-")) / "export")
    rows = {"float32": {"seconds": ref_s}}
    arms = (("fp32 recurrence stream", torch.float32, False, None), ("model-dtype stream (before)", None, False, None),
            ("the full base model (adapter disabled), for scale", None, True, None),
            ("exported model: fp32 recurrence stream and fp32 logits", torch.float32, False, exported))
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        for label, stream, full, export_dir in arms:
            out, seconds = logits(DTYPES[name], stream, full, export_dir)
            against = full_reference if full else reference
            rows[f"{name}, {label}"] = {
                "top1_agreement": float((out.argmax(-1) == against.argmax(-1)).float().mean()),
                "max_abs_logit_diff": float((out - against).abs().nan_to_num(float("inf")).max()),
                "finite": bool(torch.isfinite(out).all()),
                "seconds": seconds,
            }
            print(f"{name:9} {label:28} top-1 {rows[f'{name}, {label}']['top1_agreement']:.4f} "
                  f"max |dlogit| {rows[f'{name}, {label}']['max_abs_logit_diff']:.3f} ({seconds:.0f}s)", file=sys.stderr)
    recurrence.RECURRENCE_DTYPE = torch.float32
    result = {"adapter": args.adapter, "base": str(base), "corpus": args.corpus, "chunks": int(len(chunks)),
              "tokens": int(chunks.numel()), "command": "python evals/bf16_agreement.py " + " ".join(argv or sys.argv[1:]),
              "arms": rows}
    table = ["| dtype, recurrence stream | top-1 agreement with fp32 | max abs logit difference | seconds |", "|---|---:|---:|---:|"]
    table += [f"| {k} | {v['top1_agreement'] * 100:.1f} % | {v['max_abs_logit_diff']:.3f} | {v['seconds']:.0f} |"
              for k, v in rows.items() if k != "float32"]
    print("\n".join(table))
    if args.out:
        write_json(args.out, result, sort_keys=True)
        write_text(Path(args.out).with_suffix(".md"), "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
