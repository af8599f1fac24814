"""The ouroboros-train plugin for the `ouroboros` command: `ouroboros train`. A top-level module, so listing plugins
and `ouroboros --help` import neither torch nor peft; the command imports what it needs when it runs."""

from __future__ import annotations

import argparse

from ouroboros_plugins.hookspecs import hookimpl


def _adapter_options(args) -> dict:
    opts = dict(
        num_prelude_layers=args.prelude,
        num_coda_layers=args.coda,
        recurrent_layer_index=args.recurrent_layer,
        num_steps=args.steps,
        max_steps=args.max_steps,
        r=args.rank,
        lora_alpha=args.lora_alpha,
        modulation=args.modulation,
        controller_pooling=args.pooling,
        use_gate=not args.no_gate,
    )
    if getattr(args, "controller_head", "normalised") != "normalised":
        opts["controller_head"] = args.controller_head
    if args.targets:
        opts["target_modules"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    if getattr(args, "coda_lora_r", 0):
        opts["coda_lora_r"] = args.coda_lora_r
    return opts


def cmd_train(args) -> int:
    import os
    import sys
    from pathlib import Path

    from ouroboros_train.run_folder import DiskFull, read_json
    from ouroboros_train.train import TrainConfig, TrainingDiverged, train

    if args.resume:
        stored = Path(args.out) / "config.json"
        if not stored.is_file():
            raise FileNotFoundError(f"nothing to resume: {stored} does not exist")
        cfg = TrainConfig.from_json(read_json(stored))
        # the loss is the run's: a distillation flag that contradicts it is refused rather than ignored
        for flag, name in (("--distill", "distill"), ("--distill-weight", "distill_weight"),
                           ("--distill-temperature", "distill_temperature"), ("--method", "method"), ("--lora-r", "lora_r"),
                           ("--lora-layers", "lora_layers")):
            asked = getattr(args, name)
            if asked is not None and asked != getattr(cfg, name):
                raise ValueError(f"{flag}: the run in {args.out} was trained with {name} = {getattr(cfg, name)!r}, asked "
                                 f"{asked!r}; --resume continues a run with its own settings")
        cfg.out = args.out  # the folder given now, also when the run was moved or copied
        if args.threads:  # a runtime setting, not a training one: a run may continue on another machine
            cfg.threads = args.threads
        if args.keep_checkpoints:
            cfg.keep_checkpoints = args.keep_checkpoints
        print(f"resuming {args.out} with its stored settings (command-line training options other than --threads are ignored)")
    else:
        depth_range = None
        if args.sample_depth:
            lo, _, hi = args.sample_depth.partition(":")
            try:
                depth_range = (int(lo), int(hi))
            except ValueError:
                raise ValueError(f"--sample-depth must look like LO:HI, got {args.sample_depth!r}") from None
        for flag, value in (("--distill-weight", args.distill_weight), ("--distill-temperature", args.distill_temperature)):
            if value is not None and args.distill is False:
                raise ValueError(f"{flag} sets the distillation loss, which --no-distill turns off")
        if args.lora_r is not None and args.method != "pruned_lora":
            raise ValueError("--lora-r is the rank of --method pruned_lora (an Ouroboros adapter's rank is --rank)")
        if args.lora_layers is not None and args.method != "pruned_lora":
            raise ValueError("--lora-layers places the LoRA of --method pruned_lora (an Ouroboros adapter's layers are its split)")
        cfg = TrainConfig(
            base=args.base,
            out=args.out,
            adapter=_adapter_options(args),
            train_text=args.train_text,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_updates=args.updates,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            seed=args.seed,
            depth_range=depth_range,
            bf16=args.bf16,
            calibrate_norms=not args.no_calibrate_norms,
            label_offset=args.label_offset,
            pure_bf16=args.pure_bf16,
            eval_every=args.eval_every,
            eval_chunks=args.eval_chunks,
            manifest=args.manifest,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints or 2,
            progress=not args.no_progress,
            threads=args.threads,
            method=args.method or "ouroboros",
            lora_r=args.lora_r,
            lora_layers=args.lora_layers or "kept",
            distill=args.distill is not False,  # on unless --no-distill
            distill_weight=0.5 if args.distill_weight is None else args.distill_weight,
            distill_temperature=1.0 if args.distill_temperature is None else args.distill_temperature,
        )
    try:
        result = train(cfg, overwrite=args.overwrite, resume=args.resume)
    except (TrainingDiverged, DiskFull) as exc:
        print(f"ouroboros train: {exc}", file=sys.stderr)
        return 1
    s = result.summary
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and wrote the run folder)
        return 0
    print(f"trained {s['updates']} updates ({s['train_tokens']:,} tokens) in {s['wall_s']:.0f}s; "
          f"final train loss {s['final_train_loss']:.4f}; adapter: {result.run_dir / 'adapter'}")
    return 0


@hookimpl
def ouroboros_register_commands(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train an Ouroboros adapter on transformers.Trainer (checkpoints, --resume, periodic held-out eval; "
        "several processes with torchrun --nproc-per-node N --no-python ouroboros train ...)",
    )
    p.add_argument("--base", default="default", help="base model folder, or 'default' for the embedded SmolLM2-135M (converted once)")
    p.add_argument("--out", required=True, help="run folder (config, log.jsonl, checkpoints, adapter/, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, with its stored settings")
    g = p.add_argument_group("adapter")
    g.add_argument("--prelude", type=int, default=7, help="prelude layers (default 7)")
    g.add_argument("--coda", type=int, default=7, help="coda layers (default 7)")
    g.add_argument("--recurrent-layer", type=int, default=None, help="recurrent layer index (default: middle of the removed span)")
    g.add_argument("--steps", type=int, default=4, help="recurrence depth (default 4)")
    g.add_argument("--max-steps", type=int, default=None, help="rows of the per-step tables (>= the deepest sampled depth)")
    g.add_argument("--rank", type=int, default=32, help="SVD LoRA rank r (default 32)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default r)")
    g.add_argument("--targets", default=None, help="comma-separated projections to modulate (default all seven)")
    g.add_argument("--modulation", choices=["controller", "static"], default="controller")
    g.add_argument("--pooling", choices=["causal_mean", "token", "sequence_mean"], default="causal_mean")
    g.add_argument("--controller-head", choices=["normalised", "paper"], default="normalised",
                   help="the Controller's state projection: 'normalised' (RMS-normalised input, linear; default) or "
                        "'paper' (SiLU(Linear(pooled)) on the raw stream, as in the paper)")
    g.add_argument("--no-gate", action="store_true", help="h' = n: the no-gate ablation")
    g.add_argument("--coda-lora-r", type=int, default=0, help="rank of a trainable LoRA on the coda layers (0 = none, the paper)")
    g = p.add_argument_group("method and loss")
    g.add_argument("--method", choices=["ouroboros", "pruned_lora"], default=None,
                   help="ouroboros (default): the adapter above. pruned_lora: the practitioner's baseline, the same prelude + "
                   "recurrent layer once + coda as a plain model with a standard PEFT LoRA on all seven projections of every "
                   "kept layer, rank matched (within 5 %%) to the trainable parameters of the Ouroboros adapter the options "
                   "above describe")
    g.add_argument("--lora-r", type=int, default=None, help="pruned_lora: one LoRA rank for every adapted layer instead of the matched one")
    g.add_argument("--lora-layers", choices=["kept", "recurrent"], default=None,
                   help="pruned_lora: the LoRA on every kept layer (default) or on the recurrent layer alone, rank matched "
                   "to the same budget")
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="distil from the full model (the default; --no-distill: cross-entropy alone): loss = (1 - W) * CE + "
                   "W * T^2 * KL(full || trained) on the next-token distributions; the teacher is the same model with the "
                   "adapter disabled (pruned_lora: the unpruned base)")
    g.add_argument("--distill-weight", type=float, default=None, metavar="W", help="W in [0, 1] (default 0.5)")
    g.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                   help="softmax temperature of both distributions, > 0; the KL is scaled by T^2 (default 1.0)")
    g = p.add_argument_group("training")
    g.add_argument("--train-text", default=None, help="text file or folder (default: the Python docs training split)")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=4, help="sequences per process per micro-batch (as in Trainer); the global "
                   "batch is batch-size x processes x grad-accum")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--updates", type=int, default=221, help="optimizer updates (default 221)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup", type=int, default=10, help="warmup updates")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sample-depth", default=None, metavar="LO:HI", help="sample the depth per update in [LO, HI]")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the frozen base (trainables stay fp32)")
    g.add_argument("--no-calibrate-norms", action="store_true",
                   help="keep the per-step norm weights at 1 (the paper's init) instead of calibrating them on the first batch")
    g.add_argument("--label-offset", type=int, choices=[1, 2], default=1,
                   help="2 reproduces the reference's double-shifted labels (comparison only)")
    g.add_argument("--pure-bf16", action="store_true", help="everything in bf16, trainables included (the reference's setup; comparison only)")
    g.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N updates (0 = never)")
    g.add_argument("--eval-chunks", type=int, default=8, help="chunks per corpus for the periodic evaluation")
    g.add_argument("--manifest", default=None, help="held-out manifest (default: the cached one)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="Trainer checkpoint every N updates (save_steps)")
    g.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints kept (save_total_limit; default 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or per-update console log")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_train)
