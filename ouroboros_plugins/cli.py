"""The `ouroboros` command. Sub-commands beyond `plugins` come from plugins (`ouroboros_register_commands`)."""

from __future__ import annotations

import argparse
import sys

from .plugins import describe_plugins, get_plugin_manager


def cmd_plugins(args) -> int:
    rows = describe_plugins()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['distribution']} {row['version']}  hooks: {', '.join(row['hooks'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ouroboros", description="Ouroboros recurrent-depth LoRA modulation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list installed plugins, their versions and the hooks they implement")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    get_plugin_manager().hook.ouroboros_register_commands(subparsers=sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"ouroboros {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
