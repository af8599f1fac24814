"""The `ouroboros` command. Sub-commands beyond `plugins` come from plugins (`ouroboros_register_commands`)."""

from __future__ import annotations

import argparse
import sys

from .plugins import CORE_DISTRIBUTION, _version, describe_plugins, get_plugin_manager, register_commands

_IMPORTABLE = {
    "ok": "yes",
    "version out of range": "yes, version out of range",
    "version unknown": "yes, version unknown",
    "not installed": "no",
    "not importable": "no (metadata only)",
}


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _origin(row: dict) -> str:
    return f"{row['distribution']} {row['version']}".strip() or "(registered in-process)"


def cmd_plugins(args) -> int:
    rows = describe_plugins()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    lines = ["plugins:"]
    lines += _table([[r["name"], _origin(r), "hooks: " + (", ".join(r["hooks"]) or "-")
                      + ("  (broken: see below)" if r["problems"] else "")]
                     for r in rows if r["loaded"]]) if any(r["loaded"] for r in rows) else ["  none"]

    backbones = [[b["name"], "model types: " + ", ".join(b["model_types"]), f"(plugin {r['name']}, {_origin(r)})"]
                 for r in rows for b in r["backbones"]]
    lines += ["backbones:"] + (_table(sorted(backbones)) if backbones else ["  none"])

    hosts = [h for r in rows for h in r["host_adapters"]]
    lines.append("host adapters:")
    if hosts:
        table = [["adapter", "distribution", "host", "supported", "installed", "importable"]]
        for h in sorted(hosts, key=lambda h: (h["adapter"], h["host"])):
            installed = h["installed"] or "not installed"
            if h["installed"] and h["installed_distribution"] not in (None, h["host"]):
                installed += f" ({h['installed_distribution']})"
            table.append([h["adapter"], f"{h['distribution']} {h['adapter_version'] or '(not installed)'}",
                          h["host"], h["supported"] or "any", installed, _IMPORTABLE.get(h["status"], h["status"])])
        lines += _table(table)
    else:
        lines.append("  none")

    commands = [["plugins", f"{CORE_DISTRIBUTION} {_version(CORE_DISTRIBUTION)} (built in)"]]
    commands += [[c, f"{_origin(r)} (plugin {r['name']})"] for r in rows for c in r["commands"]]
    lines += ["commands:"] + _table(sorted(commands))

    problems = [p for r in rows for p in r["problems"]]
    if problems:
        lines.append("broken plugins:")
        lines += _table([[p["name"], f"{p['distribution']} {p['version']}".strip() or "-",
                          p["stage"], p["error"]] for p in problems])
    else:
        lines.append("broken plugins: none")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ouroboros", description="Ouroboros recurrent-depth LoRA modulation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list installed plugins, their backbones, host adapters (supported host "
                                       "versions, importable here or not), commands and broken plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    register_commands(sub)  # one plugin at a time: a failing one is recorded, not fatal
    return parser


def _warn_about_broken_plugins(argv: list[str]) -> None:
    """One stderr line per plugin problem, except for `ouroboros plugins`, which lists them itself."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "plugins":
        return
    for problem in get_plugin_manager().problems:
        print(f"ouroboros: warning: {problem.describe()} (skipped; see `ouroboros plugins`)", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _warn_about_broken_plugins(argv)  # before parsing: --help exits there
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
