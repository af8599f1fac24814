"""The ouroboros-peft plugin for the `ouroboros` command: `ouroboros export`, and the PEFT and transformers host
adapters for `ouroboros plugins`. A top-level module, so listing plugins does not import peft/transformers; the
command imports what it needs when it runs."""

from __future__ import annotations

from ouroboros_plugins.hookspecs import HostAdapter, hookimpl


def cmd_export(args) -> int:
    from ouroboros_peft import export

    out = export(args.base, args.adapter, args.out, overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


@hookimpl
def ouroboros_register_commands(subparsers):
    p = subparsers.add_parser("export", help="write a standalone checkpoint (base model + Ouroboros adapter)")
    p.add_argument("--base", required=True, help="base model directory (Hugging Face format, with tokenizer)")
    p.add_argument("--adapter", required=True, help="Ouroboros adapter directory (save_pretrained output)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="load/export dtype (default: the base checkpoint's)")
    p.set_defaults(func=cmd_export)


@hookimpl
def ouroboros_host_adapters():
    # `supported` is the fallback for a source tree; installed, the range comes from this distribution's metadata
    # (pyproject.toml's dependencies). tests/test_plugins.py checks that the two agree.
    return [
        HostAdapter(name="peft", distribution="ouroboros-peft", host="peft", module="peft",
                    supported=">=0.21.2,<0.22", provides="PEFT tuner type OUROBOROS (get_peft_model, PeftModel)"),
        HostAdapter(name="peft", distribution="ouroboros-peft", host="transformers", module="transformers",
                    supported=">=5.16.1,<5.20",
                    provides="exported model OuroborosForCausalLM (AutoModelForCausalLM, no trust_remote_code)"),
    ]
