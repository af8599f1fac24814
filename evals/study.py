"""The study (longer than the demo, not run in CI): the paper's comparisons at small scale on SmolLM2-135M.

Every experiment trains its arms one after another with the same budget and data, then evaluates them together
(full and pruned references included) with `ouroboros_evaluate.evaluate.evaluate`. Outputs:
    <out>/<experiment>/<arm>/            training runs (log.jsonl, checkpoints, adapter/, summary.json)
    <out>/<experiment>/eval/             results.json, details.json, results.md, plots
    evals/results/<experiment>.json      results.json (schema of `ouroboros eval`), when --save is given
    evals/results/<experiment>.details.json  details + the exact command

Provenance: arms are often trained by separate `--train-only` processes (two at a time) and evaluated later, so
every call that trains an arm appends its command, start/end time and resume point to <arm>/study_runs.json; the
evaluation collects those into details["study"]["train_runs"]. `--save` keeps what an earlier save of the same
file recorded (`eval_commands`, `how_run`, hand-kept `train_commands`), appends this command to `eval_commands`
and `--note TEXT` to `how_run`.

Experiments
    headline    controller, static, no_gate at the default split (7 + layer 15 + 7, depth 4, r 32)
    depth_rank  controller (and static with --with-static) at depth {1,4,8,16} x rank {8,32,64}
    pooling     controller with causal_mean / token / sequence_mean pooling
    faithful    the reference implementation's setup (labels shifted twice, pure bf16, sequence_mean pooling,
                unit norm init) beside the corrected controller; controller_reference_fp32 is that setup in fp32
    coda        controller with and without a trainable coda LoRA (rank 8), and static with it
    equal_params  controller_tiny (Controller width 16, state 16: trainable parameters within 2 % of static's) beside
                controller and static
    lr          controller and static at lr {5e-4, 1e-3, 2e-3, 4e-3} (--arms picks a subset)
    distill_sweep  controller without distillation and distilled at weight W in {0.5, 1} x temperature T in {1, 2}
                (arms controller_kd_w<W>_t<T>; W 1 is pure distillation)
    quality     issue 19: controller and static with and without distillation from the full model (`_kd`: --distill,
                weight and temperature from --distill-weight / --distill-temperature); controller_kd_w1 (the KL alone,
                weight 1); controller with the coda LoRA distilled; the practitioner's baseline pruned_lora (the same
                7 + 1 + 7 layers as a plain model with a standard PEFT LoRA on all seven projections of every kept
                layer, rank matched to the controller arm's trainable parameters within 5 %), with and without
                distillation (its teacher: the unpruned base); pruned_lora_recurrent_kd (the same budget on the
                recurrent layer alone: the control that separates where the trainable update sits from how often its
                layer runs); and the deviations from the paper beside controller: controller_paper_head
                (SiLU(Linear(pooled)) on the raw stream) and controller_alpha16 (lora_alpha 16 at r 32, scale 0.5)

Example (the headline at the anchors' budget, 221 updates of 4 x 256 tokens):
    python evals/study.py headline --updates 221 --batch-size 4 --chunks 64 --save

Another base model: `--base PATH` (a local Hugging Face folder, Llama or Qwen2 family) with `--split P,L,C` (prelude
layers, recurrent layer index, coda layers; default 7,15,7 for SmolLM2-135M's 30 layers), and `--train-text` /
`--manifest` for other training text and held-out tokens (a manifest built with that model's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from ouroboros_plugins.atomic import write_json, write_text

SPLIT = dict(num_prelude_layers=7, num_coda_layers=7, recurrent_layer_index=15, num_steps=4, r=32)


def parse_split(text: str) -> dict:
    """'P,L,C' -> SPLIT with that prelude length, recurrent layer index and coda length."""
    try:
        prelude, layer, coda = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants three integers PRELUDE,LAYER,CODA (e.g. 7,15,7), got {text!r}")
    if prelude < 0 or coda < 0 or layer < prelude:
        raise argparse.ArgumentTypeError(f"--split {text}: the recurrent layer index must be >= the prelude length, "
                                         f"and both lengths >= 0")
    return {**SPLIT, "num_prelude_layers": prelude, "recurrent_layer_index": layer, "num_coda_layers": coda}


def check_arms(model_dir: Path, arms: dict, split: dict) -> None:
    """Resolve every arm's adapter config against the base model's layers and projection sizes before any training,
    on the meta device (no weights loaded), so a bad split or rank stops the study at once, not at its fifth arm.
    A pruned_lora arm's LoRA rank is matched here too (within 5 % of the Ouroboros adapter its options describe)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ouroboros_evaluate.evaluate import pruned_plan
    from ouroboros_train.pruned import pruned_lora_plan

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for arm, (adapter_over, train_over) in arms.items():
        try:
            pruned_plan(model, {**split, **adapter_over})
            if train_over.get("method") == "pruned_lora":
                pruned_lora_plan(model, {**split, **adapter_over}, train_over.get("lora_r"),
                                 train_over.get("lora_layers", "kept"))
        except ValueError as exc:
            raise SystemExit(f"arm {arm} does not fit the base model {model_dir}: {exc}")


def experiments(with_static: bool, distill: dict | None = None) -> dict:
    """experiment -> {arm: (adapter overrides, training overrides)}. distill: the training overrides of the
    distilled (`_kd`) arms (default: --distill with the TrainConfig defaults)."""
    kd = dict(distill=True, **(distill or {}))
    depth_rank = {}
    for depth in (1, 4, 8, 16):
        for rank in (8, 32, 64):
            depth_rank[f"controller_d{depth}_r{rank}"] = (dict(num_steps=depth, r=rank), {})
            if with_static:
                depth_rank[f"static_d{depth}_r{rank}"] = (dict(num_steps=depth, r=rank, modulation="static"), {})
    return {
        "headline": {
            "controller": ({}, {}),
            "static": (dict(modulation="static"), {}),
            "no_gate": (dict(use_gate=False), {}),
        },
        "depth_rank": depth_rank,
        "pooling": {
            "controller": ({}, {}),
            "controller_token": (dict(controller_pooling="token"), {}),
            "controller_sequence_mean": (dict(controller_pooling="sequence_mean"), {}),
        },
        "faithful": {
            "controller": ({}, {}),
            "controller_reference": (dict(controller_pooling="sequence_mean"),
                                     dict(label_offset=2, pure_bf16=True, calibrate_norms=False)),
            # the same without pure bf16: bf16 matmuls have no fast path on an AVX2-only CPU (~46x slower than fp32
            # here), so on CPU the precision effect is measured apart (evals/bf16_stall.py)
            "controller_reference_fp32": (dict(controller_pooling="sequence_mean"),
                                          dict(label_offset=2, calibrate_norms=False)),
            "controller_unit_norm_init": ({}, dict(calibrate_norms=False)),
        },
        "coda": {
            "controller": ({}, {}),
            "controller_coda_r8": (dict(coda_lora_r=8), {}),
            "static_coda_r8": (dict(modulation="static", coda_lora_r=8), {}),
        },
        "equal_params": {
            "controller": ({}, {}),
            "static": (dict(modulation="static"), {}),
            "controller_tiny": (dict(controller_hidden=16, controller_state_dim=16), {}),
        },
        "lr": {f"{kind}_lr{lr:g}": (over, dict(lr=lr))
               for kind, over in (("controller", {}), ("static", dict(modulation="static")))
               for lr in (5e-4, 1e-3, 2e-3, 4e-3)},
        "quality": {
            "controller": ({}, {}),
            "static": (dict(modulation="static"), {}),
            "controller_kd": ({}, dict(kd)),
            "static_kd": (dict(modulation="static"), dict(kd)),
            "controller_coda_r8_kd": (dict(coda_lora_r=8), dict(kd)),
            # the sweep's best setting out of distribution (W 1: the KL alone) at this budget
            "controller_kd_w1": ({}, {**kd, "distill_weight": 1.0}),
            # the adapter options (the split; the controller arm's defaults) set the parameter budget the LoRA matches
            "pruned_lora": ({}, dict(method="pruned_lora")),
            "pruned_lora_kd": ({}, dict(method="pruned_lora", **kd)),
            # the control: the same budget on the recurrent layer alone, applied once (why the baseline wins)
            "pruned_lora_recurrent_kd": ({}, dict(method="pruned_lora", lora_layers="recurrent", **kd)),
            # the deviations from the paper, each measured beside `controller` (issue 19, item 4)
            "controller_paper_head": (dict(controller_head="paper"), {}),
            "controller_alpha16": (dict(lora_alpha=16.0), {}),
        },
        # the distillation weight W and temperature T around the quality arms' 0.5 / 1 (issue 19: "sweep a few")
        "distill_sweep": {
            "controller": ({}, {}),
            **{f"controller_kd_w{w:g}_t{t:g}": ({}, dict(distill=True, distill_weight=w, distill_temperature=t))
               for t in (1.0, 2.0) for w in (0.5, 1.0)},
        },
    }


# environment variables that change what a command does, written in front of it in the provenance
PROVENANCE_ENV = ("OUROBOROS_CACHE", "OMP_NUM_THREADS")


def shell_command(argv: list[str]) -> str:
    """This call as a shell line, with the environment variables that matter in front."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in PROVENANCE_ENV if os.environ.get(k)]
    return " ".join(env + ["python evals/study.py"] + [shlex.quote(a) for a in argv])


def record_training(run: Path, command: str, started: str, summary: dict) -> None:
    """Append one training call to <run>/study_runs.json (a list; a resumed arm has several)."""
    path = run / "study_runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append({"command": command, "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "resumed_from_update": summary.get("resumed_from_update"), "updates": summary.get("updates")})
    write_json(path, runs)


def carried_provenance(details_path: Path, experiment: str, command: str, note: str | None) -> dict:
    """The provenance fields of an earlier save of the same results file, with this call added."""
    old = {}
    if details_path.is_file():
        old = json.loads(details_path.read_text()).get("study", {})
        if old.get("experiment") not in (None, experiment):
            raise SystemExit(f"{details_path} holds experiment {old.get('experiment')!r}, not {experiment!r}; "
                             f"choose another --save-as")
    kept = {k: old[k] for k in ("train_commands",) if k in old}
    kept["eval_commands"] = [c for c in old.get("eval_commands", []) if c != command] + [command]
    how = " ".join(s for s in (old.get("how_run"), note) if s)
    if how:
        kept["how_run"] = how
    return kept


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=sorted(experiments(False)))
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--base", default="default",
                    help="base model folder (Hugging Face format with tokenizer); default: the embedded SmolLM2-135M")
    ap.add_argument("--split", type=parse_split, default=dict(SPLIT), metavar="P,L,C",
                    help="prelude layers, recurrent layer index, coda layers (default 7,15,7)")
    ap.add_argument("--train-text", default=None, help="training text file or folder (default: the Python docs training split)")
    ap.add_argument("--manifest", default=None, help="held-out manifest (default: the one built for the embedded model)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--arms", default=None, help="comma-separated subset of the experiment's arms")
    ap.add_argument("--updates", type=int, default=221)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=64, help="held-out chunks per corpus for the final evaluation")
    ap.add_argument("--eval-every", type=int, default=0, help="periodic held-out evaluation during training (0 = off)")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--with-static", action="store_true", help="depth_rank: also train the static arm at every point")
    ap.add_argument("--distill-weight", type=float, default=None,
                    help="quality: W of the distilled (_kd) arms, loss = (1 - W) * CE + W * T^2 * KL (default 0.5)")
    ap.add_argument("--distill-temperature", type=float, default=None,
                    help="quality: T of the distilled (_kd) arms (default 1.0)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue interrupted arms, skip finished ones")
    ap.add_argument("--train-only", action="store_true",
                    help="train the arms and stop (e.g. to train arms in parallel processes, then evaluate with --resume)")
    ap.add_argument("--save", action="store_true", help="copy the results to evals/results/<experiment>.json (+ .details.json)")
    ap.add_argument("--save-as", default=None, help="name under evals/results/ instead of the experiment's")
    ap.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"),
                    help="where --save writes (default: evals/results)")
    ap.add_argument("--note", default=None,
                    help="with --save: a sentence on how this run was made (machine sharing, times), appended to how_run")
    args = ap.parse_args(argv)

    from ouroboros_train.default_model import default_model_dir
    from ouroboros_evaluate.evaluate import evaluate, markdown_table
    from ouroboros_train.train import TrainConfig, last_checkpoint, train

    distill = {k: v for k, v in (("distill_weight", args.distill_weight), ("distill_temperature", args.distill_temperature))
               if v is not None}
    if distill:  # checked before anything else: a bad value names its flag
        from ouroboros_train.distill import check_distill_settings

        try:
            check_distill_settings(distill.get("distill_weight", 0.5), distill.get("distill_temperature", 1.0),
                                   names=("--distill-weight", "--distill-temperature"))
        except ValueError as exc:
            ap.error(str(exc))
    arms = experiments(args.with_static, distill)[args.experiment]
    if args.arms:
        wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in arms]
        if unknown:
            ap.error(f"unknown arms {unknown} for {args.experiment}: {list(arms)}")
        arms = {a: arms[a] for a in wanted}
    argv_list = list(argv if argv is not None else sys.argv[1:])
    command = "python evals/study.py " + " ".join(shlex.quote(a) for a in argv_list)
    full_command = shell_command(argv_list)
    if args.note and not args.save:
        ap.error("--note is written with --save; give --save too")
    if args.save:  # checked before any training: the file to add to must hold this experiment
        name = args.save_as or args.experiment
        dest = Path(args.results_dir)
        carried = carried_provenance(dest / f"{name}.details.json", args.experiment, full_command, args.note)
    if args.base == "default":
        model_dir = default_model_dir()
    elif not (Path(args.base) / "config.json").is_file():
        ap.error(f"--base {args.base}: no config.json there (give a Hugging Face model folder)")
    elif args.manifest is None:
        ap.error(f"--base {args.base}: give --manifest too, built with that model's tokenizer "
                 f"(ouroboros_train.data.build_heldout_manifest(tokenizer, PATH)); the default one holds SmolLM2 token ids")
    else:
        model_dir = Path(args.base)
    for flag, path in (("--train-text", args.train_text), ("--manifest", args.manifest)):
        if path is not None and not Path(path).exists():
            ap.error(f"{flag} {path}: no such file or folder")
    check_arms(model_dir, arms, args.split)
    root = Path(args.out) / args.experiment
    runs, step_s, wall_s = {}, {}, {}
    for arm, (adapter_over, train_over) in arms.items():
        run = root / arm
        values = dict(base=str(model_dir), out=str(run), adapter={**args.split, **adapter_over}, train_text=args.train_text,
                      manifest=args.manifest, seq_len=args.seq_len, max_updates=args.updates, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, seed=args.seed, eval_every=args.eval_every,
                      eval_chunks=args.eval_chunks, checkpoint_every=25, threads=args.threads,
                      distill=False)  # the loss is each arm's own (the `_kd` arms set it), whatever train's default
        values.update(train_over)
        cfg = TrainConfig(**values)
        if args.resume and (run / "summary.json").is_file():
            log(f"{arm}: finished earlier, kept")
            summary = json.loads((run / "summary.json").read_text())
        else:
            resume = args.resume and last_checkpoint(run) is not None
            log(f"{arm}: {'resuming' if resume else 'training'} {cfg.max_updates} updates x {cfg.tokens_per_update} tokens")
            started = time.strftime("%Y-%m-%dT%H:%M:%S")
            summary = train(cfg, overwrite=True, resume=resume).summary
            record_training(run, full_command, started, summary)
        runs[arm], step_s[arm], wall_s[arm] = str(run), summary["step_s_mean"], summary["wall_s"]
        log(f"{arm}: {summary['train_tokens']:,} tokens, {summary['wall_s']:.0f}s, {summary['step_s_mean']:.1f} s/update, "
            f"final train loss {summary['final_train_loss']:.3f}")
    if args.train_only:
        return 0
    extra = {"study": {"experiment": args.experiment, "command": command, "updates": args.updates,
                       "tokens_per_update": args.seq_len * args.batch_size * args.grad_accum,
                       "base": args.base, "lr": args.lr, "step_s_mean": step_s, "train_wall_s": wall_s,
                       "split": {k: args.split[k] for k in ("num_prelude_layers", "recurrent_layer_index", "num_coda_layers")},
                       # what each arm changes from the split and from the flags above (e.g. its own lr)
                       "arm_overrides": {arm: {"adapter": a, "training": t} for arm, (a, t) in arms.items()},
                       # every call that trained each arm (absent for arms trained before this was recorded)
                       "train_runs": {arm: json.loads((Path(r) / "study_runs.json").read_text())
                                      for arm, r in runs.items() if (Path(r) / "study_runs.json").is_file()}}}
    if args.save:
        extra["study"].update(carried)
    if "controller" in step_s and "static" in step_s:
        extra["study"]["controller_over_static_step_time"] = step_s["controller"] / step_s["static"]
    results = evaluate(str(model_dir), runs, str(root / "eval"), n_chunks=args.chunks, manifest=args.manifest,
                       overwrite=True, reuse_reference=True, reuse_arms=True, extra_details=extra)
    details = json.loads((root / "eval" / "details.json").read_text())
    print(markdown_table(results, details))
    if args.save:
        write_text(dest / f"{name}.json", (root / "eval" / "results.json").read_text())
        write_json(dest / f"{name}.details.json", details)
        log(f"saved {dest / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
