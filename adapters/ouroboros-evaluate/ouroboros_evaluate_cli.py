"""The ouroboros-evaluate plugin for the `ouroboros` command: `ouroboros eval`. A top-level module, so listing
plugins and `ouroboros --help` import neither torch nor peft; the command imports what it needs when it runs."""

from __future__ import annotations

from ouroboros_plugins.hookspecs import hookimpl


def cmd_eval(args) -> int:
    from ouroboros_evaluate.evaluate import evaluate, markdown_table

    arms = {}
    for item in args.arm:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--arm takes NAME=RUN_OR_ADAPTER_DIR, got {item!r}")
        if name in arms:
            raise ValueError(f"arm {name!r} given twice")
        arms[name] = path
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    results = evaluate(args.base, arms, args.out, corpora=corpora, n_chunks=args.chunks, manifest=args.manifest,
                       overwrite=args.overwrite, reuse_reference=args.reuse_reference, reuse_arms=args.reuse_arms,
                       plots=not args.no_plots)
    print(markdown_table(results))
    print(f"wrote {args.out}/results.json")
    return 0


@hookimpl
def ouroboros_register_commands(subparsers):
    p = subparsers.add_parser("eval", help="held-out NLL / gap recovery of trained arms against the full and pruned model")
    p.add_argument("--base", default="default", help="base model folder, or 'default'")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=DIR",
                   help="a trained arm: run folder (from `ouroboros train`) or adapter folder; repeat (static, controller, no_gate, ...)")
    p.add_argument("--out", required=True, help="folder for results.json, details.json, results.md and the plots")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--corpora", default="indist,wikipedia,reddit")
    p.add_argument("--chunks", type=int, default=64, help="chunks per corpus (64 = the full protocol)")
    p.add_argument("--manifest", default=None, help="held-out manifest (default: the cached one)")
    p.add_argument("--reuse-reference", action="store_true", help="cache/reuse the full and pruned NLLs for these exact tokens")
    p.add_argument("--reuse-arms", action="store_true",
                   help="cache/reuse each trained arm's NLLs for these exact tokens and this exact adapter")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval)
