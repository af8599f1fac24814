"""Seed spread of a study pair: the same arms trained with different seeds, read from saved results files.

Each results file (schema of `ouroboros eval`) is one seed of the same experiment. The script checks that every file
was evaluated on the same held-out tokens (identical full / pruned NLLs), then reports per arm and corpus the NLL and
gap recovery of each seed, their mean and sample standard deviation, and per seed the difference between two arms
(`--compare A B`, repeatable: NLL_A - NLL_B, negative = A better) with a verdict per corpus: "A ahead" when A's NLL
is lower in every seed and the mean difference is larger than either arm's seed spread (sample sd), "B ahead" the
other way round, else "within spread". Nothing is trained or evaluated here.

    python evals/seeds.py evals/results/headline.json evals/results/headline_seed1.json \\
        evals/results/headline_seed2.json --compare controller static --out evals/results/headline_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ouroboros_plugins.atomic import write_json

REFERENCE_ARMS = ("full", "pruned")


def load(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read results file {path}: {exc}")
        if not isinstance(data, dict) or not isinstance(data.get("arms"), dict):
            raise SystemExit(f"{path} is not a results file (no 'arms' mapping)")
        runs.append(data)
    return runs


def check_same_heldout(paths: list[str], runs: list[dict], tol: float = 1e-6) -> None:
    first = runs[0]["arms"]
    for path, run in zip(paths[1:], runs[1:]):
        for ref in REFERENCE_ARMS:
            for corpus, row in first[ref]["heldout"].items():
                other = run["arms"][ref]["heldout"].get(corpus)  # summarise() checked that the arm exists
                if other is None or abs(other["nll"] - row["nll"]) > tol:
                    raise SystemExit(f"{path}: {ref} NLL on {corpus} differs from {paths[0]}'s, so the seeds were not "
                                     "evaluated on the same held-out tokens")


def spread(values: list[float]) -> dict:
    return {"per_seed": values, "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def verdict(diffs: list[float], sd_a: float, sd_b: float, a: str, b: str) -> str:
    """Who is ahead beyond the seed spread: every seed on one side and |mean difference| > both arms' sd."""
    mean = statistics.fmean(diffs)
    if abs(mean) > max(sd_a, sd_b):
        if all(d < 0 for d in diffs):
            return f"{a} ahead"
        if all(d > 0 for d in diffs):
            return f"{b} ahead"
    return "within spread"


def compare_pair(runs: list[dict], corpora: list[str], arms: dict, a: str, b: str) -> dict:
    """NLL_A - NLL_B per seed and corpus, with its spread and the verdict."""
    out = {"arms": [a, b], "nll_difference": {}, "verdict": {}}
    for corpus in corpora:
        diffs = [run["arms"][a]["heldout"][corpus]["nll"] - run["arms"][b]["heldout"][corpus]["nll"] for run in runs]
        out["nll_difference"][corpus] = spread(diffs)
        out["verdict"][corpus] = verdict(diffs, arms[a][corpus]["nll"]["sd"], arms[b][corpus]["nll"]["sd"], a, b)
    return out


def summarise(paths: list[str], arms: list[str], compare: list[tuple[str, str]] = ()) -> dict:
    runs = load(paths)
    for path, run in zip(paths, runs):
        missing = [a for a in (*REFERENCE_ARMS, *arms) if a not in run["arms"]]
        if missing:
            raise SystemExit(f"{path} has no arm(s) {missing}; it has {sorted(run['arms'])}")
    check_same_heldout(paths, runs)
    corpora = list(runs[0]["arms"]["full"]["heldout"])
    out = {"files": paths, "corpora": corpora, "arms": {}}
    for arm in arms:
        out["arms"][arm] = {
            corpus: {key: spread([run["arms"][arm]["heldout"][corpus][key] for run in runs])
                     for key in ("nll", "gap_recovery")}
            for corpus in corpora
        }
    out["compare"] = [compare_pair(runs, corpora, out["arms"], a, b) for a, b in compare]
    return out


def markdown(summary: dict) -> str:
    corpora = summary["corpora"]
    lines = ["| arm | " + " | ".join(f"{c} gap rec. per seed | {c} mean (sd)" for c in corpora) + " |",
             "|---|" + "---|---|" * len(corpora)]
    for arm, rows in summary["arms"].items():
        cells = []
        for c in corpora:
            g = rows[c]["gap_recovery"]
            cells += [" / ".join(f"{100 * v:.1f}" for v in g["per_seed"]), f"{100 * g['mean']:.1f} ({100 * g['sd']:.1f})"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for pair in summary.get("compare", []):
        a, b = pair["arms"]
        cells = []
        for c in corpora:
            d = pair["nll_difference"][c]
            cells += [" / ".join(f"{v:+.3f}" for v in d["per_seed"]), f"{d['mean']:+.3f} ({d['sd']:.3f}): {pair['verdict'][c]}"]
        lines.append(f"| {a} - {b} NLL (nats) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results files, one per seed")
    ap.add_argument("--arms", default="controller,static", help="comma-separated arms to summarise")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), action="append", default=[],
                    help="report NLL_A - NLL_B per seed and who is ahead beyond the spread (repeatable)")
    ap.add_argument("--out", default=None, help="write the summary JSON here (with the command)")
    args = ap.parse_args(argv)
    if len(args.results) < 2:
        ap.error("give at least two results files (one per seed)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for pair in args.compare:
        arms += [a for a in pair if a not in arms]
    summary = summarise(args.results, arms, [tuple(pair) for pair in args.compare])
    summary["command"] = "python evals/seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(summary))
    if args.out:
        write_json(Path(args.out), summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
