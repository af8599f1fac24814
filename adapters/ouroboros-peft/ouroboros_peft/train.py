"""Training an Ouroboros adapter: `train(TrainConfig(...))` or `ouroboros train`.

What the loop guarantees
    * Next-token labels shifted once: the batch is passed as ``labels=input_ids`` and the transformers
      causal-LM loss shifts internally (never pre-shifted here).
    * Trainable parameters (the adapter) stay fp32; ``bf16=True`` only autocasts the forward pass.
    * AdamW, linear warmup then cosine decay, both counted in optimizer updates; gradient accumulation;
      gradient clipping.
    * Deterministic data order and depth: sequence order comes from ``seed`` and the epoch, a sampled depth
      from ``seed`` and the update index, so a checkpoint only needs counters (plus the optimizer state and
      torch's RNG) to continue exactly where it stopped: an interrupted-then-resumed run reproduces the loss
      curve of an uninterrupted one.
    * Checkpoints every K updates under ``RUN/checkpoints/ckpt-XXXXXX/``: ``trainable.safetensors`` (adapter
      parameters by name), ``optimizer.safetensors`` (AdamW moments + torch RNG, JSON metadata for the rest),
      ``state.json``; each written to a temporary folder and renamed; ``RUN/latest.json`` points at the newest.
      No pickle anywhere.
    * A NaN/inf loss or gradient stops training with `TrainingDiverged`, leaving the last good checkpoint.
    * Bad input (missing/corrupt model, too little text, seq_len over the model's limit, a split/rank/depth
      the model cannot take, an existing run folder without ``overwrite``) fails before any training.

Run folder
    config.json (this TrainConfig), log.jsonl (one record per update, plus ``"kind": "eval"`` records),
    checkpoints/, latest.json, adapter/ (PEFT ``save_pretrained`` output: loadable with
    ``PeftModel.from_pretrained`` and ``ouroboros export``), summary.json (tokens, wall time, step time, peak RSS).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ouroboros_plugins.atomic import atomic_dir, write_json, write_jsonl

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "TrainResult",
    "train",
    "load_base",
    "build_model",
    "lr_at",
    "depth_at",
    "batch_at",
    "text_token_stream",
    "calibrate_step_norms",
    "peak_rss_mb",
]

ADAPTER_DEFAULTS = dict(num_prelude_layers=7, num_coda_layers=7, num_steps=4, r=32)
# Settings a resumed run may change: bookkeeping and the CPU thread count (a run may continue on another machine or
# beside another job; the loss curve then matches to float rounding, not bit for bit). Everything else must match.
RESUME_FREE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_chunks", "progress", "threads")


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict  # what RUN/summary.json holds
    model: object  # the PEFT model with the trained adapter (eval mode)


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradient becomes NaN/inf."""


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

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.eval_corpora = tuple(self.eval_corpora)
        if self.depth_range is not None:
            self.depth_range = tuple(int(x) for x in self.depth_range)
        self.adapter = dict(self.adapter)
        for name in ("seq_len", "batch_size", "grad_accum", "max_updates", "checkpoint_every", "keep_checkpoints", "log_every"):
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

    @property
    def tokens_per_update(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------------
# schedule, data order, depth: pure functions of counters (what makes resume exact)
# ----------------------------------------------------------------------------------------------------


def lr_at(update: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer update `update` (0-based): linear warmup over `warmup` updates, then cosine
    from `lr` down to `lr * min_lr_ratio` at the last update."""
    if cfg.warmup and update < cfg.warmup:
        return cfg.lr * (update + 1) / cfg.warmup
    span = max(1, cfg.max_updates - cfg.warmup - 1)
    progress = min(1.0, (update - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def depth_at(update: int, cfg: TrainConfig, default: int) -> int:
    if cfg.depth_range is None:
        return default
    lo, hi = cfg.depth_range
    return random.Random(cfg.seed * 1_000_003 + update).randint(lo, hi)


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

    from .config import OuroborosConfig

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
    need = cfg.seq_len * cfg.batch_size * cfg.grad_accum
    if stream.numel() < need:
        raise ValueError(
            f"training corpus too small: {what} holds {stream.numel()} tokens, one update needs {need} "
            f"(seq_len {cfg.seq_len} x batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})"
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


@torch.no_grad()
def calibrate_step_norms(model, ids: torch.Tensor) -> list:
    """Set every row t of the per-step RMSNorm weight to the median (over tokens) RMS of the recurrent layer's
    output u_t, computed step by step on `ids` at the deepest depth the tables allow. RMSNorm with unit weight
    rescales the residual stream to RMS 1 (SmolLM2's mid-layer stream has RMS ~5-7), which the coda never saw;
    this keeps n_t ~ u_t at the start. Returns the values set. Uses no randomness."""
    wrapper = model.base_model.model.model
    name = wrapper.active_ouroboros()
    adapter, plan = wrapper.ouroboros_adapter[name], wrapper.plans[name]
    rows = adapter.norms.weight.shape[0]
    original = adapter.update
    values = []

    def update(u, h, step):
        rms = u.float().pow(2).mean(-1).sqrt()
        values.append(float(rms.median()))
        adapter.norms.weight[step].fill_(values[-1])
        return original(u, h, step)

    was_training = model.training
    adapter.update = update
    wrapper.plans[name] = dataclasses.replace(plan, num_steps=rows)
    try:
        model.eval()
        model(input_ids=ids)
    finally:
        del adapter.update
        wrapper.plans[name] = plan
        model.train(was_training)
    return values


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
# files
# ----------------------------------------------------------------------------------------------------


def read_log(run_dir) -> list:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_checkpoint(run_dir: Path, update: int, named, optimizer, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"ckpt-{update:06d}"
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().clone().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
        opt_tensors, steps = {}, {}
        opt_state = optimizer.state
        for n, p in named:
            s = opt_state.get(p)
            if not s:
                continue
            opt_tensors[f"{n}::exp_avg"] = s["exp_avg"].detach().clone().contiguous()
            opt_tensors[f"{n}::exp_avg_sq"] = s["exp_avg_sq"].detach().clone().contiguous()
            steps[n] = float(s["step"])
        opt_tensors["rng::torch_cpu"] = torch.get_rng_state()
        groups = []
        for g in optimizer.state_dict()["param_groups"]:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
        meta = {"steps": steps, "param_groups": groups, "param_names": [n for n, _ in named]}
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"ouroboros_optimizer": json.dumps(meta)})
        write_json(tmp / "state.json", state, sort_keys=True)
    write_json(run_dir / "latest.json", {"checkpoint": f"checkpoints/{final.name}", "update": update}, sort_keys=True)
    old = sorted(p for p in ckpts.glob("ckpt-*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_checkpoint(ckpt: Path, named, optimizer) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["ouroboros_optimizer"])
            opt_tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint {ckpt} is unreadable: {exc}") from exc
    names = [n for n, _ in named]
    if sorted(weights) != sorted(names) or meta["param_names"] != names:
        raise ValueError(f"checkpoint {ckpt} does not match this adapter's trainable parameters")
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    sd = optimizer.state_dict()
    opt_state = {}
    for i, (n, _) in enumerate(named):
        if n in meta["steps"]:
            opt_state[i] = {
                "step": torch.tensor(meta["steps"][n], dtype=torch.float32),
                "exp_avg": opt_tensors[f"{n}::exp_avg"],
                "exp_avg_sq": opt_tensors[f"{n}::exp_avg_sq"],
            }
    groups = []
    for fresh, saved in zip(sd["param_groups"], meta["param_groups"]):
        g = dict(fresh)
        g.update({k: (tuple(v) if isinstance(fresh.get(k), tuple) else v) for k, v in saved.items()})
        groups.append(g)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(opt_tensors["rng::torch_cpu"])
    return state


def _save_adapter(model, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))


def _prepare_run_dir(cfg: TrainConfig, overwrite: bool, resume: bool) -> Path:
    run = Path(cfg.out)
    if resume:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {run} has no config.json")
        stored = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
        diffs = [
            f"{f.name}: run has {getattr(stored, f.name)!r}, asked {getattr(cfg, f.name)!r}"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_FREE_FIELDS and f.name != "out" and getattr(stored, f.name) != getattr(cfg, f.name)
        ]
        if diffs:
            raise ValueError("--resume needs the run's own settings; these differ: " + "; ".join(diffs))
        return run
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        if not overwrite:
            raise FileExistsError(f"run folder {run} exists and is not empty; pass --overwrite to replace it or --resume to continue it")
    return run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_update: Optional[Callable[[int, float], None]] = None,
    base_model=None,
    tokenizer=None,
) -> "TrainResult":
    """Train one adapter; returns a `TrainResult` (its summary is also written to RUN/summary.json).

    on_update(update, loss) is called after each optimizer update (1-based) and after any checkpoint of that
    update; raising from it interrupts the run (what the resume test does). `base_model`/`tokenizer` may be
    passed to skip loading `cfg.base` (the caller's model is modified in place: it gets the adapter)."""
    run = _prepare_run_dir(cfg, overwrite, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # -- everything that can fail on bad input happens before the run folder is touched -----------
    if base_model is None:
        base_model, tokenizer, _ = load_base(cfg.base)
    _check_against_model(cfg, base_model)
    torch.manual_seed(cfg.seed)
    model = build_model(base_model, cfg.adapter)
    spec = model.peft_config["default"]
    wrapper = model.base_model.model.model
    base_plan = wrapper.plans["default"]
    if cfg.depth_range is not None and cfg.depth_range[1] > spec.rows:
        raise ValueError(
            f"depth_range {cfg.depth_range} goes deeper than the adapter's per-step tables ({spec.rows} rows); "
            f"set max_steps >= {cfg.depth_range[1]} in the adapter options"
        )
    stream = _training_stream(cfg, tokenizer)
    heldout = _heldout_chunks(cfg, base_model.config.vocab_size)

    if not resume and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    latest = run / "latest.json"
    resuming_from_checkpoint = resume and latest.is_file()
    if cfg.calibrate_norms and not resuming_from_checkpoint:  # a checkpoint brings its own (trained) norms
        calibrate_step_norms(model, batch_at(stream, 0, cfg.batch_size, cfg.seq_len, cfg.seed))
    if cfg.pure_bf16:
        model.to(torch.bfloat16)
    named = _trainable(model)
    params = [p for _, p in named]
    if not cfg.pure_bf16 and any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("trainable parameters must be fp32")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=False)

    start_update, position, elapsed_before = 0, 0, 0.0
    last_ckpt: Optional[Path] = None
    if resume:
        if resuming_from_checkpoint:
            last_ckpt = run / json.loads(latest.read_text())["checkpoint"]
            state = _load_checkpoint(last_ckpt, named, optimizer)
            start_update, position, elapsed_before = state["update"], state["position"], state["elapsed_s"]
            write_jsonl(run / "log.jsonl", [r for r in read_log(run) if r["update"] <= start_update], sort_keys=True)
        else:
            write_jsonl(run / "log.jsonl", [])
    else:
        write_json(run / "config.json", cfg.to_json(), sort_keys=True)
        write_jsonl(run / "log.jsonl", [])

    n_trainable = sum(p.numel() for p in params)
    log_file = open(run / "log.jsonl", "a")
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    step_times: list[float] = []
    t_run = time.perf_counter()
    tokens_done = start_update * cfg.tokens_per_update

    def evaluate_now(update: int) -> dict:
        from .data import heldout_nll

        model.eval()
        wrapper.plans["default"] = base_plan
        out = {}
        for corpus, chunks in heldout.items():
            out[corpus] = heldout_nll(lambda ids: model(input_ids=ids).logits, chunks, batch_size=8)
        model.train()
        return out

    try:
        for update in range(start_update, cfg.max_updates):
            t0 = time.perf_counter()
            lr = lr_at(update, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            depth = depth_at(update, cfg, base_plan.num_steps)
            wrapper.plans["default"] = dataclasses.replace(base_plan, num_steps=depth)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.grad_accum):
                ids = batch_at(stream, position, cfg.batch_size, cfg.seq_len, cfg.seed)
                position += cfg.batch_size
                with autocast:
                    loss = model(input_ids=ids, labels=_labels(ids, cfg.label_offset)).loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss became {value} at update {update + 1} (micro-batch {micro + 1}); training stopped. "
                        f"Last good checkpoint: {last_ckpt or 'none written yet'}. Try a lower lr (now {lr:.3g})."
                    )
                (loss / cfg.grad_accum).backward()
                total += value / cfg.grad_accum
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
            if not math.isfinite(float(norm)):
                raise TrainingDiverged(
                    f"gradient norm became {float(norm)} at update {update + 1}; training stopped. "
                    f"Last good checkpoint: {last_ckpt or 'none written yet'}. Try a lower lr (now {lr:.3g})."
                )
            optimizer.step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            tokens_done += cfg.tokens_per_update
            done = update + 1
            record = {"kind": "train", "update": done, "loss": total, "lr": lr, "depth": depth, "grad_norm": float(norm),
                      "tokens": tokens_done, "step_s": dt}
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_updates):
                record_eval = {"kind": "eval", "update": done, "tokens": tokens_done, "heldout": evaluate_now(done)}
            else:
                record_eval = None
            log_file.write(json.dumps(record, sort_keys=True) + "\n")
            if record_eval:
                log_file.write(json.dumps(record_eval, sort_keys=True) + "\n")
            log_file.flush()
            if cfg.progress and (done % cfg.log_every == 0 or done == cfg.max_updates):
                recent = step_times[-10:]
                per = sum(recent) / len(recent)
                eta = per * (cfg.max_updates - done)
                line = (f"[{Path(cfg.out).name}] update {done}/{cfg.max_updates} loss {total:.4f} lr {lr:.2e} "
                        f"depth {depth} {cfg.tokens_per_update / per:,.0f} tok/s ETA {_fmt_time(eta)}")
                if record_eval:
                    line += " | held-out " + " ".join(f"{k} {v:.3f}" for k, v in record_eval["heldout"].items())
                print(line, file=sys.stderr, flush=True)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_updates:
                state = {"update": done, "position": position, "tokens": tokens_done,
                         "elapsed_s": elapsed_before + time.perf_counter() - t_run}
                last_ckpt = _save_checkpoint(run, done, named, optimizer, state, cfg.keep_checkpoints)
            if on_update is not None:
                on_update(done, total)
    finally:
        log_file.close()
        wrapper.plans["default"] = base_plan

    _save_adapter(model, run / "adapter")
    steady = step_times[2:] if len(step_times) > 4 else step_times
    summary = {
        "updates": cfg.max_updates,
        "train_tokens": cfg.max_updates * cfg.tokens_per_update,
        "trainable_params": n_trainable,
        "wall_s": elapsed_before + time.perf_counter() - t_run,
        "step_s_mean": (sum(steady) / len(steady)) if steady else None,
        "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": next((r["loss"] for r in reversed(read_log(run)) if r["kind"] == "train"), None),
        "resumed_from_update": start_update if resume else None,
        "adapter": dict(cfg.adapter),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(run / "summary.json", summary, sort_keys=True)
    model.eval()
    return TrainResult(run_dir=run, summary=summary, model=model)
