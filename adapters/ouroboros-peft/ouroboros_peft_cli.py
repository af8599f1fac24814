"""The ouroboros-peft plugin for the `ouroboros` command: `ouroboros export`. A top-level module, so listing plugins
does not import peft/transformers; the command imports what it needs when it runs."""

from __future__ import annotations

from ouroboros_plugins.hookspecs import hookimpl


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
