"""evals/seeds.py: the seed-spread summary of saved study results."""

import json
import statistics
from pathlib import Path

import pytest

from conftest import load_script

seeds = load_script("seeds", Path(__file__).resolve().parents[1] / "evals" / "seeds.py")


def results(controller_nll, static_nll, full=(2.0, 3.0), pruned=(8.0, 7.0)):
    def arm(nlls):
        return {"trainable_params": 1, "train_tokens": 1, "heldout": {
            c: {"nll": n, "gap_recovery": (p - n) / (p - f)} for c, n, f, p in zip(("indist", "wiki"), nlls, full, pruned)}}
    return {"model": "m", "arms": {"full": arm(full), "pruned": arm(pruned),
                                   "controller": arm(controller_nll), "static": arm(static_nll)}}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_spread_and_paired_difference_per_seed(tmp_path, capsys):
    files = [write(tmp_path, "s0.json", results((4.0, 5.0), (4.5, 5.2))),
             write(tmp_path, "s1.json", results((4.2, 5.1), (4.4, 5.0))),
             write(tmp_path, "s2.json", results((4.1, 4.9), (4.6, 5.3)))]
    out = tmp_path / "summary.json"
    assert seeds.main([*files, "--compare", "controller", "static", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    nll = summary["arms"]["controller"]["indist"]["nll"]
    assert nll["per_seed"] == [4.0, 4.2, 4.1]
    assert nll["mean"] == pytest.approx(4.1) and nll["sd"] == pytest.approx(statistics.stdev([4.0, 4.2, 4.1]))
    assert summary["arms"]["static"]["wiki"]["gap_recovery"]["per_seed"] == pytest.approx([0.45, 0.5, 0.425])
    (pair,) = summary["compare"]
    diff = pair["nll_difference"]["wiki"]
    assert diff["per_seed"] == pytest.approx([-0.2, 0.1, -0.4]) and diff["max"] == pytest.approx(0.1)
    # indist: controller lower in every seed by 0.4 on average, more than either arm's sd (0.1): ahead.
    # wiki: one seed the other way round: within the spread.
    assert pair["verdict"] == {"indist": "controller ahead", "wiki": "within spread"}
    assert summary["command"].startswith("python evals/seeds.py")
    assert "| controller - static NLL (nats) |" in capsys.readouterr().out


def test_several_comparisons_each_with_a_verdict(tmp_path):
    def three_arms(c, s, k):
        data = results(c, s)
        data["arms"]["static_kd"] = results(k, k)["arms"]["static"]
        return data
    files = [write(tmp_path, f"s{i}.json", three_arms(c, s, k)) for i, (c, s, k) in enumerate(
        [((4.0, 5.0), (4.5, 5.2), (3.0, 5.5)), ((4.2, 5.1), (4.4, 5.0), (3.1, 5.6)), ((4.1, 4.9), (4.6, 5.3), (3.2, 5.4))])]
    out = tmp_path / "summary.json"
    assert seeds.main([*files, "--arms", "controller", "--compare", "controller", "static",
                       "--compare", "controller", "static_kd", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert list(summary["arms"]) == ["controller", "static", "static_kd"]
    first, second = summary["compare"]
    assert first["arms"] == ["controller", "static"] and second["arms"] == ["controller", "static_kd"]
    # static_kd is 1 nat better in-distribution in every seed (B ahead), 0.5 worse on wiki in every seed (A ahead)
    assert second["verdict"] == {"indist": "static_kd ahead", "wiki": "controller ahead"}
    assert second["nll_difference"]["indist"]["mean"] == pytest.approx(1.0)


def test_a_small_consistent_difference_inside_the_spread_is_not_a_win(tmp_path):
    # in-distribution the controller is lower in every seed, by 0.14 on average, but static's seeds spread by 0.28 (sd)
    files = [write(tmp_path, f"s{i}.json", results(c, s)) for i, (c, s) in enumerate(
        [((4.0, 5.0), (4.01, 5.3)), ((4.2, 5.1), (4.55, 5.4)), ((4.1, 4.9), (3.9 + 0.25, 5.5))])]
    summary = seeds.summarise(files, ["controller", "static"], [("controller", "static")])
    assert summary["compare"][0]["verdict"]["indist"] == "within spread"
    assert summary["compare"][0]["verdict"]["wiki"] == "controller ahead"


def test_files_scored_on_other_heldout_tokens_are_refused(tmp_path):
    files = [write(tmp_path, "a.json", results((4.0, 5.0), (4.5, 5.2))),
             write(tmp_path, "b.json", results((4.0, 5.0), (4.5, 5.2), full=(2.1, 3.0)))]
    with pytest.raises(SystemExit, match="full NLL on indist differs"):
        seeds.main(files)


def test_missing_arm_is_named(tmp_path):
    data = results((4.0, 5.0), (4.5, 5.2))
    del data["arms"]["static"]
    files = [write(tmp_path, "a.json", data), write(tmp_path, "b.json", results((4.0, 5.0), (4.5, 5.2)))]
    with pytest.raises(SystemExit, match=r"has no arm\(s\) \['static'\]"):
        seeds.main(files)
