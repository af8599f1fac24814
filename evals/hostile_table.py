"""The hostile-input suite's table (issue 20 item 8): every parametrised case of tests/test_hostile_*.py, counted per
surface and by what the test asserts about it. Counts come from `pytest --collect-only` (nothing is run: the counts
say what the suite asserts, `make test` says whether it holds).

    .venv/bin/python evals/hostile_table.py            # writes evals/results/hostile_table.json, prints the table

Every test function must be classified below; an unclassified one stops the script, so a new test cannot be counted
as something it does not assert.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "evals" / "results" / "hostile_table.json"

SURFACES = {  # file -> surface, in the order of the table
    "tests/test_hostile_config.py": "config",
    "tests/test_hostile_load.py": "load",
    "tests/test_hostile_export.py": "export",
    "tests/test_hostile_run.py": "train run folder",
    "tests/test_hostile_numerics.py": "numerics",
}

CLEAR = "clear error"  # our exception, the message names the field or file (asserted), nothing modified (asserted)
HANDLED = "handled correctly"  # accepted / recovered / finite, and the result checked exactly
LIBRARY = "library error"  # an exception raised inside PEFT / json before Ouroboros code runs; the model is untouched
CONTROL = "negative control"  # shows a fix is what makes a case pass; not a hostile input itself

# test function -> outcome of each of its cases (a callable: case id -> outcome, where one test mixes outcomes)
OUTCOMES = {
    # config
    "test_spec_refuses": CLEAR,
    "test_peft_refuses_before_the_model_changes": CLEAR,
    "test_the_edges_of_each_range_are_accepted": HANDLED,
    # load
    "test_a_bad_adapter_file_is_refused_and_the_model_is_untouched": CLEAR,
    "test_the_intact_file_still_loads_exactly": HANDLED,
    "test_an_adapter_is_refused_on_a_base_that_differs_in_any_kept_part": CLEAR,
    "test_the_right_base_in_half_precision_is_accepted": HANDLED,
    "test_the_base_check_cannot_be_switched_off_by_editing_the_file": CLEAR,
    "test_an_older_adapter_keeps_its_recurrent_layer_hash_check": CLEAR,
    "test_transformers_load_adapter_refuses_and_leaves_the_model_untouched": CLEAR,
    "test_transformers_load_adapter_of_the_intact_file_loads_it_exactly": HANDLED,
    "test_transformers_load_adapter_checks_a_state_dict_passed_in_too": CLEAR,
    "test_peft_load_adapter_of_a_bad_second_adapter_leaves_the_model_untouched": CLEAR,
    "test_unload_restores_the_base_exactly": HANDLED,
    "test_merging_is_refused_before_anything_changes": CLEAR,
    "test_a_bad_adapter_file_is_named_by_our_entry_points": CLEAR,
    # PeftModel.from_pretrained / load_adapter on a bad peft_type or invalid JSON: PEFT's own KeyError / TypeError /
    # JSONDecodeError (model untouched); the pickled .bin is ours
    "test_peft_and_transformers_loaders_on_a_bad_file_leave_the_model_untouched": lambda case: CLEAR if "pickled" in case else LIBRARY,
    "test_saving_a_pickle_is_refused": CLEAR,
    # export
    "test_out_that_is_inside_or_around_an_input_is_refused_with_overwrite": CLEAR,
    "test_a_bad_dtype_is_named_before_any_work": CLEAR,
    "test_the_command_line_refuses_them_too": CLEAR,
    "test_kill_9_during_overwrite_leaves_the_old_or_the_new_export": HANDLED,
    "test_a_bad_adapter_is_refused_by_export_naming_the_file": CLEAR,
    "test_the_command_line_names_a_nan_adapter_without_a_traceback": CLEAR,
    # train run folder
    "test_resume_falls_back_to_what_is_intact_and_finishes_exactly": HANDLED,
    "test_damage_that_cannot_be_resumed_is_named_and_nothing_changes": CLEAR,
    "test_a_full_disk_is_one_error_naming_the_last_intact_checkpoint": CLEAR,
    # numerics
    "test_half_precision_stays_finite_at_depth": HANDLED,
    "test_fp32_models_are_unchanged_by_the_stream_dtype": HANDLED,
    "test_the_fp32_stream_is_what_keeps_fp16_finite": CONTROL,
}

# the campaign before the fixes (issue 20): totals only, it was not reported per surface
BEFORE = {"cases": 268, "clear errors": 95, "correct acceptances": 98, "tracebacks": 34, "silent or lossy": 40, "hangs": 1}


def collect() -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *SURFACES]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"collection failed ({' '.join(cmd)}):\n{res.stdout}\n{res.stderr}")
    return [line.strip() for line in res.stdout.splitlines() if "::" in line]


def outcome(function: str, case: str) -> str:
    if function not in OUTCOMES:
        raise SystemExit(f"{function} is not classified in {Path(__file__).name} (OUTCOMES): say what its cases assert")
    rule = OUTCOMES[function]
    return rule(case) if callable(rule) else rule


def table(node_ids: list[str]) -> dict:
    surfaces = {}
    for node in node_ids:
        path, _, rest = node.partition("::")
        function, _, case = rest.partition("[")
        surface = surfaces.setdefault(SURFACES[path], {"cases": 0, CLEAR: 0, HANDLED: 0, LIBRARY: 0, CONTROL: 0, "by test": Counter()})
        kind = outcome(function, case.rstrip("]"))
        surface[kind] += 1
        surface["by test"][f"{function} ({kind})"] += 1
        if kind != CONTROL:
            surface["cases"] += 1
    for surface in surfaces.values():
        surface["by test"] = dict(surface["by test"])
    total = {key: sum(s[key] for s in surfaces.values()) for key in ("cases", CLEAR, HANDLED, LIBRARY, CONTROL)}
    return {"surfaces": {name: surfaces[name] for name in SURFACES.values() if name in surfaces}, "total": total}


def markdown(result: dict) -> str:
    rows = ["| surface | cases | clear errors | handled correctly | library errors (model untouched) | silent |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, s in [*result["surfaces"].items(), ("**total**", result["total"])]:
        rows.append(f"| {name} | {s['cases']} | {s[CLEAR]} | {s[HANDLED]} | {s[LIBRARY]} | 0 |")
    return "\n".join(rows)


def main() -> int:
    result = table(collect())
    result["before"] = BEFORE
    result["command"] = "python evals/hostile_table.py"
    result["outcomes"] = {CLEAR: "our exception; the test asserts its type, that the message names the field or file, and "
                                 "that the model / files are unchanged",
                          HANDLED: "accepted, recovered or finite; the test checks the result exactly",
                          LIBRARY: "an exception raised inside PEFT (or json) before any Ouroboros code runs; the test "
                                   "asserts its type and that the model is unchanged",
                          CONTROL: "a negative control, not counted as a case"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
