"""lm-eval benchmark: the offline tasks of evals/tasks/ for the full model, the pruned baseline and trained
Ouroboros arms, through the `ouroboros` lm-eval model (`lm_eval --model ouroboros`), in one process.

    python evals/tasks/prepare_tasks.py all                       # once: the local task data
    python evals/lm_eval_bench.py --arm controller=RUN_OR_ADAPTER --arm static=RUN_OR_ADAPTER \
        [--base DIR] [--limit 64] [--tasks ouro_bigbench,ouro_heldout] [--update-doc docs/results.md]

Arms
    full        the base model (--base; default: the project's default model, SmolLM2-135M-Instruct)
    pruned      prelude + the recurrent layer once + coda of the base, untrained (no gate, no step norm): the
                split is read from the first --arm adapter (or --pruned-from); written once as a plain checkpoint
                folder under --work and evaluated like any Hugging Face model
    NAME=PATH   a training run folder (with adapter/), an Ouroboros adapter folder, or an exported checkpoint

Every arm runs exactly what `lm_eval --model ouroboros --model_args <model_args> --tasks <tasks> --include_path
evals/tasks [--limit N]` runs (the JSON records that command line per arm). Writes --out (JSON) and the same
path with .md (the table); --update-doc replaces, or appends, the section between the markers below in an
existing markdown file (it never creates one).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from ouroboros_plugins.atomic import atomic_dir, write_json, write_text

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "evals" / "tasks"
DATA_DIR = TASKS_DIR / "data"
DEFAULT_TASKS = "ouro_bigbench,ouro_heldout"
DOC_START = "<!-- lm-eval-bench:start (written by evals/lm_eval_bench.py; edits inside are overwritten) -->"
DOC_END = "<!-- lm-eval-bench:end -->"
BIGBENCH = ("social_iqa", "strategyqa", "causal_judgment", "physical_intuition")
HELDOUT = ("indist", "wikipedia", "reddit")


def log(msg: str) -> None:
    print(f"[lm-eval-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# arms
# ---------------------------------------------------------------------------------------------------
def resolve_path_arm(path: str) -> dict:
    """A run folder, an adapter folder or an exported checkpoint -> {"kind", "dir", "config"}."""
    p = Path(path).expanduser().resolve()
    if (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    if (p / "adapter_config.json").is_file():
        config = json.loads((p / "adapter_config.json").read_text())
        if config.get("peft_type") != "OUROBOROS":
            raise ValueError(f"{p} is not an Ouroboros adapter (peft_type={config.get('peft_type')!r})")
        return {"kind": "peft", "dir": str(p), "config": config}
    if (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text())
        if config.get("model_type") != "ouroboros":
            raise ValueError(f"{p} is a {config.get('model_type')!r} model, not an exported Ouroboros checkpoint")
        return {"kind": "exported", "dir": str(p), "config": config}
    raise FileNotFoundError(f"{p} is neither a training run (adapter/), an adapter folder nor an exported checkpoint")


def build_pruned_checkpoint(base_dir: str, split: dict, out: Path) -> Path:
    """Save prelude + recurrent layer + coda of the base as an ordinary checkpoint (done once per split)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ouroboros_plugins import OuroborosSpec, find_backbone, plan_for

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fields = {k: split[k] for k in OuroborosSpec.__dataclass_fields__ if k in split}
    fields.pop("max_steps", None)
    backbone = find_backbone(model.config.model_type)
    decoder = backbone.decoder(model)
    plan = plan_for(backbone, model.config, decoder, OuroborosSpec(**fields))
    keep = plan.prelude + (plan.recurrent,) + plan.coda
    decoder.layers = nn.ModuleList([decoder.layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        (tmp / "ouroboros_pruned.json").write_text(json.dumps({"base": str(base_dir), "layers": list(keep)}) + "\n")
    return out


def plan_arms(args) -> tuple[str, list[dict]]:
    base = args.base
    if base is None:
        from ouroboros_train.default_model import default_model_dir

        base = str(default_model_dir())
    base = str(Path(base).expanduser().resolve())
    trained = []
    for spec in args.arm:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--arm takes NAME=PATH, got {spec!r}")
        if name in ("full", "pruned") or name in [a["name"] for a in trained]:
            raise ValueError(f"arm name {name!r} is reserved or repeated")
        arm = resolve_path_arm(path)
        args_str = f"pretrained={base},peft={arm['dir']}" if arm["kind"] == "peft" else f"pretrained={arm['dir']}"
        if args.num_steps:
            args_str += f",num_steps={args.num_steps}"
        trained.append({"name": name, "model_args": args_str, "source": arm["dir"], "config": arm["config"]})
    arms = []
    if not args.no_full:
        arms.append({"name": "full", "model_args": f"pretrained={base}", "source": base})
    if not args.no_pruned:
        donor = next((a for a in trained if a["name"] == args.pruned_from), None) if args.pruned_from else (trained[0] if trained else None)
        if donor is None:
            raise ValueError("the pruned baseline needs a split: pass an --arm (or --pruned-from NAME), or --no-pruned")
        arms.append({"name": "pruned", "model_args": None, "source": base, "split_from": donor["name"], "split": donor["config"]})
    return base, arms + trained


# ---------------------------------------------------------------------------------------------------
# running and reporting
# ---------------------------------------------------------------------------------------------------
def check_task_data(tasks: list[str]) -> None:
    need = []
    if any(t.startswith("ouro_bigbench") for t in tasks):
        need += [DATA_DIR / "bigbench" / f"{t}.jsonl" for t in BIGBENCH]
    if any(t.startswith("ouro_heldout") for t in tasks):
        need += [DATA_DIR / "heldout" / f"{c}.jsonl" for c in HELDOUT]
    if "hellaswag" in tasks:
        need.append(DATA_DIR / "hellaswag" / "hellaswag_val.jsonl")
    missing = [str(p.relative_to(REPO)) for p in need if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"task data missing: {', '.join(missing)}; run `python evals/tasks/prepare_tasks.py all` first")


def cli_command(model_args: str, tasks: str, args) -> str:
    cmd = f"lm_eval --model ouroboros --model_args {model_args} --tasks {tasks} --include_path evals/tasks --batch_size {args.batch_size}"
    return cmd + (f" --limit {args.limit}" if args.limit else "")


def run_arm(arm: dict, tasks: list[str], args, task_manager) -> dict:
    from lm_eval import simple_evaluate

    start = time.time()
    out = simple_evaluate(
        model="ouroboros",
        model_args=arm["model_args"],
        tasks=tasks,
        task_manager=task_manager,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        log_samples=False,
        bootstrap_iters=args.bootstrap_iters,
    )
    wall = time.time() - start
    metrics = {}
    for task, values in out["results"].items():
        metrics[task] = {k.replace(",none", ""): v for k, v in values.items() if k.endswith(",none")}
        if "token_perplexity" in metrics[task]:
            metrics[task]["nll"] = math.log(metrics[task]["token_perplexity"])
    return {
        "name": arm["name"],
        "model_args": arm["model_args"],
        "command": cli_command(arm["model_args"], ",".join(tasks), args),
        "source": arm["source"],
        "ouroboros": out["config"].get("ouroboros"),
        "n_samples": {t: v.get("effective") for t, v in out.get("n-samples", {}).items()},
        "metrics": metrics,
        "wall_s": round(wall, 1),
    }


def fmt(value, digits=3):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    rows = report["arms"]
    cols_acc = [f"ouro_bigbench_{t}" for t in BIGBENCH]
    cols_nll = [f"ouro_heldout_{c}" for c in HELDOUT]
    present = lambda col: any(col in r["metrics"] for r in rows)  # noqa: E731
    cols_acc = [c for c in cols_acc if present(c)]
    cols_nll = [c for c in cols_nll if present(c)]
    head = ["arm", "depth"]
    head += [c.replace("ouro_bigbench_", "") + " acc" for c in cols_acc]
    head += ["BIG-bench mean acc"] if present("ouro_bigbench") else []
    head += [c.replace("ouro_heldout_", "") + " NLL" for c in cols_nll]
    by_name = {r["name"]: r for r in rows}
    gap_cols = [c for c in cols_nll if "full" in by_name and "pruned" in by_name
                and c in by_name["full"]["metrics"] and c in by_name["pruned"]["metrics"]]
    head += [c.replace("ouro_heldout_", "") + " gap rec." for c in gap_cols]
    head += ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        info = r.get("ouroboros") or {}
        depth = str(info.get("num_steps")) if info.get("num_steps") else ("pruned" if r["name"] == "pruned" else "full")
        cells = [r["name"], depth]
        cells += [fmt(r["metrics"].get(c, {}).get("acc")) for c in cols_acc]
        cells += [fmt(r["metrics"].get("ouro_bigbench", {}).get("acc"))] if present("ouro_bigbench") else []
        cells += [fmt(r["metrics"].get(c, {}).get("nll"), 4) for c in cols_nll]
        for c in gap_cols:
            l_full, l_pruned = by_name["full"]["metrics"][c]["nll"], by_name["pruned"]["metrics"][c]["nll"]
            arm = r["metrics"].get(c, {}).get("nll")
            cells.append("–" if arm is None else f"{100 * (l_pruned - arm) / (l_pruned - l_full):.1f} %")
        cells += [f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    limit = report["limit"]
    arms_line = "; ".join(f"{r['name']} = `{r['source']}`" for r in rows)
    notes = [
        "",
        *([report["note"], ""] if report.get("note") else []),
        f"Arms: {arms_line}.",
        f"Tasks: `{report['tasks']}` from `evals/tasks/` ({'first ' + str(limit) + ' documents per task' if limit else 'all documents'}); "
        "acc = lm-eval multiple-choice accuracy (zero-shot, hellaswag-style: each choice scored as a continuation); "
        "NLL = ln(token_perplexity) = mean next-token NLL in nats over the held-out chunks as lm-eval scores them "
        "(256 predictions per chunk, the first one conditioned on the tokenizer's BOS/EOS prefix; the training "
        "issue's `heldout_nll` scores 255, so values differ slightly from its table).",
        f"Produced by: `{report['command']}` ({report['machine']}; lm-eval {report['lm_eval_version']}).",
        "Gap recovery = (NLL_pruned - NLL_arm) / (NLL_pruned - NLL_full) per corpus, from these NLLs. "
        "Per-arm `lm_eval` command lines are in the JSON (`arms[].command`).",
    ]
    return "\n".join(lines + notes) + "\n"


def update_doc(path: Path, section: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; --update-doc only edits an existing file")
    text = path.read_text(encoding="utf-8")
    block = f"{DOC_START}\n{section.rstrip()}\n{DOC_END}\n"
    if DOC_START in text and DOC_END in text:
        before, rest = text.split(DOC_START, 1)
        after = rest.split(DOC_END, 1)[1].lstrip("\n")
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_text(path, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=PATH", help="a trained arm (repeatable)")
    parser.add_argument("--base", help="base model folder (default: the default model)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated lm-eval tasks/groups (default {DEFAULT_TASKS})")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--num-steps", type=int, default=None, help="evaluate the trained arms at this depth")
    parser.add_argument("--pruned-from", help="arm whose split defines the pruned baseline (default: the first --arm)")
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--no-pruned", action="store_true")
    parser.add_argument("--bootstrap-iters", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None, help="where the pruned checkpoint is written (default: <cache>/lm_eval_bench)")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results" / "lm_eval_bench.json")
    parser.add_argument("--update-doc", type=Path, default=None, help="an existing markdown file to put the table in")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reuse", type=Path, default=None, metavar="JSON",
                        help="take the full/pruned rows from an earlier JSON of this script (same base, tasks and limit)")
    parser.add_argument("--note", default=None, help="a paragraph to print with the table (stored in the JSON)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="evaluate nothing: re-render the table (and --update-doc) from a JSON this script wrote")
    args = parser.parse_args(argv)

    if args.render is not None:
        report = json.loads(args.render.read_text())
        if args.note is not None:
            report["note"] = args.note
            write_json(args.render, report)
        return publish(report, args.render, args.update_doc)

    tasks = [t for t in args.tasks.split(",") if t]
    check_task_data(tasks)
    if args.update_doc is not None and not args.update_doc.is_file():
        raise FileNotFoundError(f"{args.update_doc} does not exist; --update-doc only edits an existing file")
    base, arms = plan_arms(args)  # every path checked before any model is loaded
    reused = {}
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        same = (earlier.get("base"), earlier.get("tasks"), earlier.get("limit")) == (base, ",".join(tasks), args.limit)
        if not same:
            raise ValueError(f"{args.reuse} was made with another base, task list or limit; it cannot be reused")
        reused = {r["name"]: dict(r, reused_from=str(args.reuse)) for r in earlier["arms"] if r["name"] in ("full", "pruned")}
        arms = [a for a in arms if a["name"] not in reused] if reused else arms

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the task YAMLs name their data relative to the repository root
    import lm_eval
    from lm_eval.tasks import TaskManager

    import ouroboros_lm_eval

    ouroboros_lm_eval.register()
    task_manager = TaskManager(include_path=str(TASKS_DIR))

    if any(a["name"] == "pruned" for a in arms):
        from ouroboros_train.data import cache_root

        work = args.work or cache_root() / "lm_eval_bench"
        for arm in arms:
            if arm["name"] == "pruned":
                s = arm["split"]
                key = f"pruned-{Path(base).name}-p{s['num_prelude_layers']}-c{s['num_coda_layers']}-r{s.get('recurrent_layer_index')}"
                log(f"pruned baseline from {arm['split_from']}'s split -> {work / key}")
                arm["source"] = str(build_pruned_checkpoint(base, s, work / key))
                arm["model_args"] = f"pretrained={arm['source']}"

    results = [reused[name] for name in ("full", "pruned") if name in reused]
    for arm in arms:
        log(f"{arm['name']}: {arm['model_args']}")
        results.append(run_arm(arm, tasks, args, task_manager))
        log(f"{arm['name']}: done in {results[-1]['wall_s']:.0f} s")
        gc.collect()

    report = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO)) if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0], *sys.argv[1:]]),
        "tasks": ",".join(tasks),
        "limit": args.limit,
        "batch_size": args.batch_size,
        "base": base,
        "lm_eval_version": lm_eval.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "note": args.note,
        "arms": results,
    }
    write_json(args.out, report)  # creates the folder
    return publish(report, args.out, args.update_doc)


def publish(report: dict, json_path: Path, doc: Path | None) -> int:
    table = markdown(report)
    write_text(json_path.with_suffix(".md"), table)
    print(table)
    if doc is not None:
        update_doc(doc, "## lm-eval-harness benchmark\n\n" + table)
        log(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
