"""Controller / static step-time ratio of study pairs, read from the runs' per-update logs over a chosen update range.

A run's summary.json averages the step times of the process that finished it, so a pair that was interrupted and
resumed at different updates, or that shared the machine with other jobs for part of the run, has summary means over
different stretches and loads. This script takes the `step_s` of each update from `<run>/log.jsonl` (a resumed run's
log holds every update once) and compares the two arms over the same updates: over the whole range and over its
thirds, so a change of load during the range shows up as a spread. Nothing is trained here.

    python evals/step_times.py --pair d8_r64 /tmp/runs/study/depth_rank/controller_d8_r64 \\
        /tmp/runs/study/depth_rank/static_d8_r64 --updates 3-150 --out evals/results/step_times_d8_r64.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ouroboros_plugins.atomic import write_json


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--updates wants FIRST-LAST (e.g. 3-150), got {text!r}")
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--updates {text}: need 1 <= FIRST <= LAST")
    return lo, hi


def step_times(run: Path) -> dict[int, float]:
    """update -> seconds, from the training records of <run>/log.jsonl."""
    path = run / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no log.jsonl (not a training run folder)")
    times = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path} line {n} is not JSON: {exc}")
        if record.get("kind") == "train" and isinstance(record.get("step_s"), (int, float)):
            times[int(record["update"])] = float(record["step_s"])
    return times


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def compare(controller: Path, static: Path, updates: tuple[int, int] | None) -> dict:
    c, s = step_times(controller), step_times(static)
    common = sorted(set(c) & set(s))
    if not common:
        raise SystemExit(f"{controller} and {static} have no logged update in common")
    lo, hi = updates if updates else (min(3, common[-1]), common[-1])  # default: skip the first two (warm-up of caches)
    wanted = list(range(lo, hi + 1))
    missing = [u for u in wanted if u not in c or u not in s]
    if missing:
        raise SystemExit(f"updates {lo}-{hi}: {len(missing)} are not logged by both runs (first: {missing[0]}; "
                         f"both have {common[0]}-{common[-1]})")
    def ratio(updates: list[int]) -> float:
        return mean([c[u] for u in updates]) / mean([s[u] for u in updates])

    thirds = [wanted[i * len(wanted) // 3:(i + 1) * len(wanted) // 3] for i in range(3)]
    return {
        "controller_run": str(controller), "static_run": str(static), "updates": [lo, hi], "n_updates": len(wanted),
        "controller_step_s": mean([c[u] for u in wanted]), "static_step_s": mean([s[u] for u in wanted]),
        "ratio": ratio(wanted), "ratio_by_third": [ratio(t) for t in thirds if t],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "CONTROLLER_RUN", "STATIC_RUN"),
                    help="a name and the two run folders (repeat for more pairs)")
    ap.add_argument("--updates", type=parse_range, default=None, metavar="FIRST-LAST",
                    help="update range, the same for every pair (default: 3 to the last update both logged)")
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = ap.parse_args(argv)
    names = [p[0] for p in args.pair]
    if len(set(names)) != len(names):
        ap.error(f"pair names must differ: {names}")

    pairs = {name: compare(Path(c), Path(s), args.updates) for name, c, s in args.pair}
    print("| pair | updates | controller s/update | static s/update | ratio | ratio by third |")
    print("|---|---|---:|---:|---:|---|")
    for name, p in pairs.items():
        print(f"| {name} | {p['updates'][0]}-{p['updates'][1]} | {p['controller_step_s']:.2f} | {p['static_step_s']:.2f} | "
              f"{p['ratio']:.3f}x | " + " / ".join(f"{r:.3f}x" for r in p["ratio_by_third"]) + " |")
    if args.out:
        argv_list = list(argv if argv is not None else sys.argv[1:])
        write_json(Path(args.out), {"command": "python evals/step_times.py " + " ".join(shlex.quote(a) for a in argv_list),
                                    "pairs": pairs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
