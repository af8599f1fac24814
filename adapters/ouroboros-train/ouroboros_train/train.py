"""Training an Ouroboros adapter on `transformers.Trainer`: `train(TrainConfig(...))` or `ouroboros train`.

What Trainer does (scheduler, checkpoints and resume, logging and progress, gradient accumulation, bf16
autocast, clipping, several processes) is Trainer's; this module adds what is Ouroboros-specific:
    * Next-token labels shifted once: the batch is passed as ``labels=input_ids`` and the transformers
      causal-LM loss shifts internally (``label_offset=2`` reproduces the reference's double shift, for comparison).
    * Trainable parameters (the adapter) stay fp32; ``bf16=True`` only autocasts the forward pass.
    * Deterministic data order: the stream is cut into ``seq_len`` windows visited in a seeded order redrawn every
      epoch; the dataset is that order (Trainer samples it sequentially), so the global batch and its order do not
      depend on the number of processes (``batch_size`` is per process, as in Trainer) and a resume continues it.
    * `OuroborosCallback`: calibration on the global first batch, per-update depth sampling, divergence stop.
    * ``distill=True`` (the default): the loss mixes the cross-entropy with the KL from the full model (the same
      model with the adapter disabled; `distill.OuroborosDistillTrainer`); ``distill=False`` is the cross-entropy alone.
    * ``method="pruned_lora"``: the practitioner's baseline instead of an Ouroboros adapter (`pruned`): the same
      prelude + recurrent layer once + coda as a plain model with a standard PEFT LoRA, rank matched to the
      Ouroboros adapter ``adapter`` describes; its distillation teacher is the whole unpruned base.
    * Several processes (``torchrun --nproc-per-node N --no-python ouroboros train ...``): only rank 0 writes
      the run folder; every rank ends with the same adapter.
    * Bad input (missing/corrupt model, too little text, seq_len over the model's limit, a split/rank/depth
      the model cannot take, an existing run folder without ``overwrite``, a resume with another number of
      processes) fails before any training and before anything is written.

Run folder
    config.json (this TrainConfig), log.jsonl (one ``{"kind": "train", "update": k, "loss": ...}`` record per update,
    plus ``"kind": "eval"`` records), checkpoints/checkpoint-K/ (Trainer's: adapter safetensors, optimizer, scheduler,
    RNG state, trainer_state.json; the non-safetensors files are read back only with torch's ``weights_only`` loader,
    and training_args.bin is never read), adapter/ (PEFT ``save_pretrained`` output: loadable with
    ``PeftModel.from_pretrained`` and ``ouroboros export``), summary.json (tokens, wall time, step time, peak RSS).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from ouroboros_plugins.atomic import atomic_dir, write_json, write_jsonl

from ouroboros_peft.calibration import active_ouroboros, calibrate_step_norms

from .callback import DivergenceCallback, OuroborosCallback, TrainingDiverged, depth_at
from .pruned import LORA_LAYERS  # torch only at import time; peft is imported where a LoRA is built
from .run_folder import (DiskFull, checkpoint_problem, checkpoints, is_disk_full, last_checkpoint, read_json, read_log,
                         resume_checkpoint)

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "TrainResult",
    "train",
    "load_base",
    "build_model",
    "depth_at",
    "batch_at",
    "text_token_stream",
    "calibrate_step_norms",
    "last_checkpoint",
    "peak_rss_mb",
]

ADAPTER_DEFAULTS = dict(num_prelude_layers=7, num_coda_layers=7, num_steps=4, r=32)
# Settings a resumed run may change: bookkeeping and the CPU thread count (a run may continue on another machine or
# beside another job; the loss curve then matches to float rounding, not bit for bit). Everything else must match.
RESUME_FREE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_chunks", "progress", "threads")
METHODS = ("ouroboros", "pruned_lora")


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict  # what RUN/summary.json holds
    model: object  # the PEFT model with the trained adapter (eval mode)


@dataclass
class TrainConfig:
    base: str = field(metadata={"help": "base model folder (Hugging Face format with tokenizer), or 'default' (SmolLM2-135M)"})
    out: str = field(metadata={"help": "run folder"})
    adapter: dict = field(default_factory=lambda: dict(ADAPTER_DEFAULTS), metadata={"help": "OuroborosConfig fields"})
    train_text: Optional[str] = field(default=None, metadata={"help": "text file or folder of text files; None = the Python docs training split"})
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    max_updates: int = 221
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    depth_range: Optional[tuple] = field(default=None, metadata={"help": "(lo, hi): sample the depth per update; None = adapter num_steps"})
    bf16: bool = False
    label_offset: int = field(
        default=1,
        metadata={"help": "1 = predict the next token (correct). 2 reproduces the reference implementation's labels shifted "
                  "twice (predicting two tokens ahead); for the paper-faithful comparison only"},
    )
    pure_bf16: bool = field(
        default=False,
        metadata={"help": "run everything, trainable parameters and optimizer included, in bf16 (the reference's setup; "
                  "for comparison only). Default: fp32 trainables"},
    )
    calibrate_norms: bool = field(
        default=True,
        metadata={"help": "before training, set each per-step norm row to the median RMS of that step's layer output on the "
                  "first batch (instead of 1), so the recurrence starts at the hidden-state scale the coda expects"},
    )
    eval_every: int = 0
    eval_chunks: int = 8
    eval_corpora: tuple = ("indist", "wikipedia", "reddit")
    manifest: Optional[str] = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    threads: Optional[int] = None
    method: str = field(
        default="ouroboros",
        metadata={"help": "'ouroboros' (the adapter `adapter` describes) or 'pruned_lora' (the practitioner's baseline: the "
                  "same prelude + recurrent layer once + coda as a plain model with a standard PEFT LoRA on all seven "
                  "projections of every kept layer, rank matched to the trainable parameters of the Ouroboros adapter "
                  "`adapter` describes, within 5 %)"},
    )
    lora_r: Optional[int] = field(
        default=None,
        metadata={"help": "pruned_lora only: one LoRA rank for every adapted layer instead of the matched one"},
    )
    lora_layers: str = field(
        default="kept",
        metadata={"help": "pruned_lora only: which kept layers carry the LoRA, 'kept' (all of them: the practitioner's "
                  "baseline) or 'recurrent' (the recurrent layer alone, the control that separates where the update "
                  "sits from how often its layer runs)"},
    )
    distill: bool = field(
        default=True,
        metadata={"help": "mix the cross-entropy with KL(full model || trained model) on the next-token distributions; "
                  "the teacher is the same model with the adapter disabled (pruned_lora: the whole unpruned base). On by "
                  "default, as measured in docs/results.md ('Quality'); False trains on the cross-entropy alone"},
    )
    distill_weight: float = field(
        default=0.5, metadata={"help": "w in loss = (1 - w) * CE + w * T^2 * KL, in [0, 1] (with distill)"})
    distill_temperature: float = field(
        default=1.0, metadata={"help": "T: both distributions are softmax(logits / T); the KL is scaled by T^2 (with distill)"})
    world_size: int = field(
        default=1,
        metadata={"help": "processes the run was started with (set by train() from the launcher's environment; a resume "
                  "must use the same number, since batch_size is per process)"},
    )

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.eval_corpora = tuple(self.eval_corpora)
        if self.depth_range is not None:
            self.depth_range = tuple(int(x) for x in self.depth_range)
        self.adapter = dict(self.adapter)
        for name in ("seq_len", "batch_size", "grad_accum", "max_updates", "checkpoint_every", "keep_checkpoints", "log_every", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        for name in ("warmup", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.label_offset not in (1, 2):
            raise ValueError(f"label_offset must be 1 (next token) or 2 (the reference's double shift), got {self.label_offset!r}")
        if self.depth_range is not None:
            lo, hi = self.depth_range
            if lo < 1 or hi < lo:
                raise ValueError(f"depth_range must be (lo, hi) with 1 <= lo <= hi, got {self.depth_range}")
        from .distill import check_distill_settings

        if not isinstance(self.distill, bool):
            raise ValueError(f"distill must be True or False, got {self.distill!r}")
        check_distill_settings(self.distill_weight, self.distill_temperature,
                               names=("distill_weight (--distill-weight)", "distill_temperature (--distill-temperature)"))
        self.distill_weight, self.distill_temperature = float(self.distill_weight), float(self.distill_temperature)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.method == "pruned_lora":
            if self.depth_range is not None:
                raise ValueError("depth_range (--sample-depth) needs an Ouroboros adapter; method pruned_lora has no recurrence")
            if self.lora_r is not None and (isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1):
                raise ValueError(f"lora_r (--lora-r) must be an integer >= 1 or None (matched), got {self.lora_r!r}")
            if self.lora_layers not in LORA_LAYERS:
                raise ValueError(f"lora_layers (--lora-layers) must be one of {list(LORA_LAYERS)}, got {self.lora_layers!r}")
        elif self.lora_r is not None:
            raise ValueError("lora_r (--lora-r) is the rank of method pruned_lora; an Ouroboros adapter's rank is adapter r (--rank)")
        elif self.lora_layers != "kept":
            raise ValueError(f"lora_layers (--lora-layers) {self.lora_layers!r} places the LoRA of method pruned_lora; an "
                             "Ouroboros adapter's layers are its split")

    @property
    def sequences_per_update(self) -> int:
        """The global batch: batch_size per process x processes x gradient accumulation."""
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def tokens_per_update(self) -> int:
        return self.seq_len * self.sequences_per_update

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}")
        # a run folder written before `distill` existed trained on the cross-entropy alone: resume it that way
        return cls(**{"distill": False, **data})


# ----------------------------------------------------------------------------------------------------
# schedule, data order, depth: pure functions of counters (what makes resume exact)
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # SequenceWindows asks for one row at a time: draw each epoch's order once
def _epoch_order(n_seq: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def batch_at(stream: torch.Tensor, position: int, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """`count` training sequences starting at global sequence position `position`: the stream is cut into
    non-overlapping `seq_len` windows, visited in a seeded random order that is redrawn every epoch."""
    n_seq = stream.numel() // seq_len
    rows = []
    order, order_epoch = None, -1
    for p in range(position, position + count):
        epoch, i = divmod(p, n_seq)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(n_seq, seed, epoch), epoch
        j = int(order[i])
        rows.append(stream[j * seq_len : (j + 1) * seq_len])
    return torch.stack(rows).to(torch.long)


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------


def _resolve_base(base: str) -> Path:
    if base == "default":
        from .default_model import default_model_dir

        return default_model_dir()
    return Path(base)


def load_base(base: str, dtype=torch.float32):
    """(model, tokenizer, folder) with clear errors for a missing or unreadable model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _resolve_base(base)
    if not folder.is_dir():
        raise FileNotFoundError(f"base model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad model folder
        raise ValueError(f"{folder}/config.json cannot be read: {exc}") from exc
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{w} is corrupt or truncated: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot load the model in {folder}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot load the tokenizer in {folder}: {exc}") from exc
    return model, tokenizer, folder


def build_model(base_model, adapter_kwargs: dict):
    """PEFT-wrap `base_model` with a fresh Ouroboros adapter (SVD bases from the removed layers)."""
    from peft import get_peft_model

    from ouroboros_peft import OuroborosConfig

    try:
        config = OuroborosConfig(**adapter_kwargs)
    except TypeError as exc:
        raise ValueError(f"bad adapter option: {exc}") from exc
    return get_peft_model(base_model, config)


TEXT_SUFFIXES = (".txt", ".rst", ".md", ".py")


def text_token_stream(tokenizer, path: str) -> torch.Tensor:
    """A text file, or every text file under a folder (sorted), tokenized with EOS after each."""
    from .data import tokenize_documents

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {p}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"training text not found: {p}")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return torch.tensor(tokenize_documents(tokenizer, texts), dtype=torch.long)


def _training_stream(cfg: TrainConfig, tokenizer) -> torch.Tensor:
    if cfg.train_text is not None:
        stream = text_token_stream(tokenizer, cfg.train_text)
        what = cfg.train_text
    else:
        from .data import training_token_stream

        stream = training_token_stream(tokenizer)
        what = "the Python docs training split"
    need = cfg.tokens_per_update
    if stream.numel() < need:
        raise ValueError(
            f"training corpus too small: {what} holds {stream.numel()} tokens ({stream.numel() // cfg.seq_len} sequences of "
            f"{cfg.seq_len}), one update needs {need} (seq_len {cfg.seq_len} x batch_size {cfg.batch_size} per process x "
            f"{cfg.world_size} processes x grad_accum {cfg.grad_accum})"
        )
    return stream


def _heldout_chunks(cfg: TrainConfig, vocab_size: int) -> dict:
    if not cfg.eval_every:
        return {}
    from .data import default_manifest_path, load_heldout_manifest

    path = Path(cfg.manifest) if cfg.manifest else default_manifest_path()
    chunks, _ = load_heldout_manifest(path)
    missing = [c for c in cfg.eval_corpora if c not in chunks]
    if missing:
        raise ValueError(f"held-out manifest {path} has no corpora {missing}; it has {sorted(chunks)}")
    out = {c: chunks[c][: cfg.eval_chunks] for c in cfg.eval_corpora}
    for c, t in out.items():
        if int(t.max()) >= vocab_size:
            raise ValueError(f"held-out corpus {c!r} has token ids >= the model's vocab ({vocab_size}): built with another tokenizer?")
    return out


def _labels(ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Labels for the transformers causal-LM loss, which shifts by one itself: the ids unchanged (offset 1), or
    pre-shifted once more (offset 2, the reference implementation's bug: the target is two tokens ahead)."""
    if offset == 1:
        return ids
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _check_against_model(cfg: TrainConfig, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.seq_len > limit:
        raise ValueError(f"seq_len {cfg.seq_len} is above the model's max_position_embeddings ({limit})")




# ----------------------------------------------------------------------------------------------------
# the dataset: the training order itself
# ----------------------------------------------------------------------------------------------------


class SequenceWindows(torch.utils.data.Dataset):
    """Item p = the training sequence at global position p of the run (`batch_at`), with its labels. Sampled
    sequentially, this is the old loop's order whatever the number of processes: accelerate gives process r the
    batches r, r + N, r + 2N, ... of the sequence, so one global batch is the same rows as one process would take."""

    def __init__(self, stream: torch.Tensor, cfg: TrainConfig):
        self.stream, self.seq_len, self.seed, self.label_offset = stream, cfg.seq_len, cfg.seed, cfg.label_offset
        self.length = cfg.max_updates * cfg.sequences_per_update

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, p: int) -> dict:
        ids = batch_at(self.stream, int(p), 1, self.seq_len, self.seed)[0]
        return {"input_ids": ids, "labels": _labels(ids[None], self.label_offset)[0]}


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


def _save_adapter(model, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        if getattr(model, "pruned_lora_plan", None) is not None:
            from .pruned import save_stack_record

            save_stack_record(model, tmp)


def _prepare_run_dir(cfg: TrainConfig, overwrite: bool, resume: bool) -> Path:
    """Check the run folder against the request (read only: every process runs this before any writes)."""
    run = Path(cfg.out)
    if resume:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {run} has no config.json")
        stored = TrainConfig.from_json(read_json(run / "config.json"))
        diffs = [
            f"{f.name}: run has {getattr(stored, f.name)!r}, asked {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_FREE_FIELDS and f.name != "out" and getattr(stored, f.name) != getattr(cfg, f.name)
        ]
        if diffs:
            hint = " (batch_size is per process: resume with the run's number of processes)" if stored.world_size != cfg.world_size else ""
            raise ValueError("--resume needs the run's own settings; these differ: " + "; ".join(diffs) + hint)
        old = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*"))
        if old and last_checkpoint(run) is None:
            raise ValueError(
                f"{run} holds checkpoints of the hand-written training loop ({', '.join(old)}), which the Trainer engine "
                "cannot resume; its adapter/ (if the run finished) still loads and evaluates. Nothing was changed."
            )
        return run
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        if not overwrite:
            raise FileExistsError(f"run folder {run} exists and is not empty; pass --overwrite to replace it or --resume to continue it")
    return run


def _start_run_dir(cfg: TrainConfig, run: Path, resume: bool, update: int) -> None:
    """Rank 0 only: a fresh folder with config.json and an empty log, or (resuming) the log cut back to the
    checkpoint's update (to nothing when the run stopped before its first checkpoint)."""
    if not resume:
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        write_json(run / "config.json", cfg.to_json(), sort_keys=True)
        write_jsonl(run / "log.jsonl", [])
        return
    rows = read_log(run, torn_tail=lambda note: print(f"ouroboros train: {note}", file=sys.stderr))
    write_jsonl(run / "log.jsonl", [r for r in rows if r["update"] <= update], sort_keys=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------
# Trainer: arguments and the run-folder callback
# ----------------------------------------------------------------------------------------------------


def launcher_world_size() -> int:
    """Processes started by torchrun / accelerate launch (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(cfg: TrainConfig, run: Path):
    """TrainingArguments for `cfg`: Trainer's AdamW, warmup + cosine to lr * min_lr_ratio, clipping, accumulation,
    bf16 autocast, checkpoints every `checkpoint_every` updates keeping `keep_checkpoints`, one log per update."""
    from transformers import TrainingArguments

    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_updates,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        optim="adamw_torch",
        max_grad_norm=cfg.grad_clip if cfg.grad_clip else 0.0,
        bf16=cfg.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="sequential",  # the order is in SequenceWindows
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=cfg.keep_checkpoints,
        logging_strategy="steps",
        logging_steps=1,  # one log.jsonl record per update
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        disable_tqdm=not cfg.progress,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if on_cpu and cfg.world_size > 1 else None,
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # frozen bases and rotary tables are identical on every process
        use_cpu=on_cpu,
    )


class RunFolderCallback(TrainerCallback):
    """Writes the run folder's log.jsonl (rank 0), times each update, runs the periodic held-out evaluation and
    calls `on_update(update, loss)` after each update's log record (raising from it interrupts the run)."""

    def __init__(self, cfg: TrainConfig, run: Path, ouroboros: Optional[OuroborosCallback], heldout: dict, is_main: bool,
                 on_update: Optional[Callable[[int, float], None]]):
        self.cfg, self.run, self.ouroboros, self.heldout, self.is_main, self.on_update = cfg, run, ouroboros, heldout, is_main, on_update
        self.step_times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs and "loss" in logs:  # Trainer's per-update log (the end-of-training summary has no "loss")
            self.record(state.global_step, logs, model)

    def record(self, update: int, logs: dict, model) -> None:
        dt = time.perf_counter() - self._t0
        self.step_times.append(dt)
        loss = float(logs["loss"])
        record = {"kind": "train", "update": update, "loss": loss, "lr": logs.get("learning_rate"),
                  "depth": self.ouroboros.depth if self.ouroboros is not None else None, "grad_norm": logs.get("grad_norm"),
                  "tokens": update * self.cfg.tokens_per_update, "step_s": dt}
        if "distill_ce" in logs:  # the two terms of the distillation loss (per-target means, rank 0's share)
            record["ce"], record["kl"] = logs["distill_ce"], logs["distill_kl"]
        rows = [record]
        if self.cfg.eval_every and self.is_main and (update % self.cfg.eval_every == 0 or update == self.cfg.max_updates):
            rows.append({"kind": "eval", "update": update, "tokens": record["tokens"], "heldout": self.evaluate(model)})
        if self.is_main:
            with open(self.run / "log.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.on_update is not None:
            self.on_update(update, loss)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Held-out NLL per corpus at the trained depth (not this update's sampled one)."""
        from .data import heldout_nll

        if self.ouroboros is None:  # pruned_lora: the model runs its pruned stack on every forward
            model.eval()
            try:
                return {c: heldout_nll(lambda ids: model(input_ids=ids, use_cache=False).logits, chunks, batch_size=8)
                        for c, chunks in self.heldout.items()}
            finally:
                model.train()
        decoder, name = active_ouroboros(model)
        sampled = decoder.plans[name]
        self.ouroboros.restore_depth(model)
        model.eval()
        try:
            return {c: heldout_nll(lambda ids: model(input_ids=ids).logits, chunks, batch_size=8) for c, chunks in self.heldout.items()}
        finally:
            decoder.plans[name] = sampled
            model.train()


# ----------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------


def _build(cfg: TrainConfig, base_model, tokenizer):
    """Model with a fresh adapter, training stream and held-out chunks; every check on the inputs."""
    if base_model is None:
        base_model, tokenizer, _ = load_base(cfg.base)
    _check_against_model(cfg, base_model)
    torch.manual_seed(cfg.seed)
    if cfg.method == "pruned_lora":
        from .pruned import build_pruned_lora

        model = build_pruned_lora(base_model, cfg.adapter, cfg.lora_r, cfg.lora_layers)
    else:
        model = build_model(base_model, cfg.adapter)
    spec = model.peft_config["default"]
    if cfg.method == "ouroboros" and cfg.depth_range is not None and cfg.depth_range[1] > spec.rows:
        raise ValueError(
            f"depth_range {cfg.depth_range} goes deeper than the adapter's per-step tables ({spec.rows} rows); "
            f"set max_steps >= {cfg.depth_range[1]} in the adapter options"
        )
    stream = _training_stream(cfg, tokenizer)
    heldout = _heldout_chunks(cfg, base_model.config.vocab_size)
    return model, stream, heldout


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _summary(cfg: TrainConfig, run: Path, model, log: RunFolderCallback, wall_s: float, start_update: Optional[int]) -> dict:
    steady = log.step_times[2:] if len(log.step_times) > 4 else log.step_times
    return {
        "updates": cfg.max_updates,
        "train_tokens": cfg.max_updates * cfg.tokens_per_update,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_s": wall_s,
        "step_s_mean": (sum(steady) / len(steady)) if steady else None,
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": next((r["loss"] for r in reversed(read_log(run)) if r["kind"] == "train"), None),
        "resumed_from_update": start_update,
        "adapter": dict(cfg.adapter),
        "method": cfg.method,
        **({"pruned_lora": model.pruned_lora_plan.to_json()} if getattr(model, "pruned_lora_plan", None) is not None else {}),
        "distill": ({"weight": cfg.distill_weight, "temperature": cfg.distill_temperature} if cfg.distill else None),
        "torch_threads": torch.get_num_threads(),
        "world_size": cfg.world_size,
    }


def train(
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_update: Optional[Callable[[int, float], None]] = None,
    base_model=None,
    tokenizer=None,
) -> "TrainResult":
    """Train one adapter with `transformers.Trainer`; returns a `TrainResult` (its summary is also RUN/summary.json).

    Under torchrun / accelerate launch every process calls this with the same `cfg`; `cfg.batch_size` is per
    process. on_update(update, loss) is called after each update's log record; raising from it interrupts the run
    (what the resume test does). `base_model`/`tokenizer` may be passed to skip loading `cfg.base` (the caller's
    model is modified in place: it gets the adapter)."""
    from transformers import Trainer

    cfg = dataclasses.replace(cfg, world_size=launcher_world_size())
    run = _prepare_run_dir(cfg, overwrite, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    args = training_arguments(cfg, run)
    _ = args.device  # sets up the process group under a launcher, before any process writes
    is_main = args.process_index == 0
    # -- everything that can fail on bad input happens before the run folder is touched -----------
    model, stream, heldout = _build(cfg, base_model, tokenizer)
    from peft import get_peft_model_state_dict

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}  # what a checkpoint must hold
    checkpoint, start_update = None, None
    if resume:
        report = (lambda note: print(f"ouroboros train: {note}", file=sys.stderr)) if is_main else (lambda note: None)
        checkpoint = resume_checkpoint(run, expected, report)
        start_update = read_json(checkpoint / "trainer_state.json")["global_step"] if checkpoint else 0
    _barrier()  # every process has checked the folder before rank 0 changes it
    if is_main:
        _start_run_dir(cfg, run, resume, start_update or 0)
    if cfg.pure_bf16:
        model.to(torch.bfloat16)
    elif any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise RuntimeError("trainable parameters must be fp32")

    dataset = SequenceWindows(stream, cfg)
    if cfg.method == "ouroboros":
        global_first = torch.stack([dataset[p]["input_ids"] for p in range(cfg.batch_size * cfg.world_size)])
        ouroboros = OuroborosCallback(calibrate=cfg.calibrate_norms, depth_range=cfg.depth_range, seed=cfg.seed,
                                      calibration_batch=global_first)
        stop = ouroboros
    else:  # pruned_lora: no recurrence to calibrate or sample; the divergence stop alone
        ouroboros, stop = None, DivergenceCallback()
    log = RunFolderCallback(cfg, run, ouroboros, heldout, is_main, on_update)
    if cfg.distill:
        from .distill import OuroborosDistillTrainer

        trainer = OuroborosDistillTrainer(model=model, args=args, train_dataset=dataset, callbacks=[stop, log],
                                          distill_weight=cfg.distill_weight, distill_temperature=cfg.distill_temperature)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[stop, log])
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    # wall time of the updates kept from earlier calls (their logged step times), plus this call's
    elapsed_before = sum(r.get("step_s") or 0.0 for r in read_log(run) if r["kind"] == "train" and r["update"] <= (start_update or 0))
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        intact = next((c for c in checkpoints(run) if checkpoint_problem(c, expected) is None), None)
        last = f"{intact} (update {read_json(intact / 'trainer_state.json')['global_step']})" if intact else "none"
        raise DiskFull(
            f"disk full while writing to {run} ({getattr(exc, 'filename', None) or exc}); the last intact checkpoint is "
            f"{last}. Free space, then --resume"
        ) from exc
    finally:
        if ouroboros is not None:
            ouroboros.restore_depth(model)  # also when training stopped early
    wall_s = elapsed_before + time.perf_counter() - t0
    model.eval()
    summary = _summary(cfg, run, model, log, wall_s, start_update)
    if is_main:
        _save_adapter(model, run / "adapter")
        write_json(run / "summary.json", summary, sort_keys=True)
    _barrier()
    return TrainResult(run_dir=run, summary=summary, model=model)
