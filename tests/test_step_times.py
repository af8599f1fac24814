"""evals/step_times.py: the Controller / static step-time ratio over the same updates of two runs' logs."""

import json
from pathlib import Path

import pytest

from conftest import load_script

step_times = load_script("step_times", Path(__file__).resolve().parents[1] / "evals" / "step_times.py")


def write_log(run: Path, seconds: dict) -> Path:
    run.mkdir(parents=True)
    lines = [{"kind": "train", "update": u, "step_s": s, "loss": 1.0} for u, s in seconds.items()]
    lines.insert(3, {"kind": "eval", "update": 3, "heldout": {"indist": 5.0}})  # eval records are skipped
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.fixture
def pair(tmp_path):
    # static: 1 s per update; controller: 1.1 s, except a slow third stretch (another job on the machine) at 1.5 s,
    # and 50 s for the first update (caches warming up), outside the default range
    static = write_log(tmp_path / "static", {u: 1.0 for u in range(1, 14)})
    controller = write_log(tmp_path / "controller", {u: 50.0 if u == 1 else 1.5 if u >= 10 else 1.1 for u in range(1, 14)})
    return controller, static


def test_ratio_over_a_range_and_its_thirds(pair, tmp_path, capsys):
    controller, static = pair
    out = tmp_path / "ratio.json"
    argv = ["--pair", "p", str(controller), str(static), "--updates", "2-9", "--out", str(out)]
    assert step_times.main(argv) == 0
    saved = json.loads(out.read_text())
    p = saved["pairs"]["p"]
    assert p["updates"] == [2, 9] and p["n_updates"] == 8
    assert p["ratio"] == pytest.approx(1.1) and p["ratio_by_third"] == pytest.approx([1.1, 1.1, 1.1])
    assert saved["command"] == "python evals/step_times.py " + " ".join(argv)
    assert "| p | 2-9 | 1.10 | 1.00 | 1.100x |" in capsys.readouterr().out

    # default range: update 3 to the last both logged; the slow stretch shows in the last third
    step_times.main(["--pair", "p", str(controller), str(static), "--out", str(out)])
    p = json.loads(out.read_text())["pairs"]["p"]
    assert p["updates"] == [3, 13]
    assert p["ratio_by_third"][0] == pytest.approx(1.1) and p["ratio_by_third"][-1] == pytest.approx(1.5)
    assert p["ratio"] == pytest.approx((7 * 1.1 + 4 * 1.5) / 11)


def test_updates_missing_from_a_log_are_refused(pair, tmp_path):
    controller, static = pair
    short = write_log(tmp_path / "short", {u: 1.0 for u in range(1, 8)})  # e.g. a run stopped at update 7
    with pytest.raises(SystemExit, match=r"updates 2-10: 3 are not logged by both runs \(first: 8; both have 1-7\)"):
        step_times.main(["--pair", "p", str(controller), str(short), "--updates", "2-10"])
    with pytest.raises(SystemExit, match="no log.jsonl"):
        step_times.main(["--pair", "p", str(controller), str(tmp_path / "nowhere")])


@pytest.mark.parametrize("argv, message", [
    (["--updates", "10-2"], "need 1 <= FIRST <= LAST"),
    (["--updates", "5"], "FIRST-LAST"),
    (["--pair", "p", "a", "b"], "pair names must differ"),
])
def test_bad_arguments_are_named(pair, capsys, argv, message):
    controller, static = pair
    with pytest.raises(SystemExit):
        step_times.main(["--pair", "p", str(controller), str(static), *argv])
    assert message in capsys.readouterr().err
