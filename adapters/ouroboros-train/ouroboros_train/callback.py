"""`transformers.Trainer` integration: one callback adds what Ouroboros training needs to any Trainer run.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[OuroborosCallback(depth_range=(2, 6))])

* calibration: before the first update of a fresh run (not when resuming: the checkpoint brings trained norms),
  `calibrate_step_norms` on the global first batch (every process's first batch, gathered in rank order, so every
  process sets the same values as one process with the whole batch would);
* depth sampling: the depth of update k is drawn from `seed` and k alone, so it is the same on every process
  and after a resume;
* divergence: a NaN/inf gradient (a NaN/inf loss gives one) stops training with `TrainingDiverged` before the
  optimizer applies it, naming the update and the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from ouroboros_peft.calibration import active_ouroboros, calibrate_step_norms


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradient becomes NaN/inf."""


def depth_at(update: int, seed: int, depth_range: Optional[tuple], default: int) -> int:
    """Recurrence depth of optimizer update `update` (0-based): `default`, or drawn from [lo, hi] by (seed, update)."""
    if depth_range is None:
        return default
    lo, hi = depth_range
    return random.Random(seed * 1_000_003 + update).randint(lo, hi)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def gather_first_batch(batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(input_ids, attention_mask) of the global batch: each process's batch, concatenated in rank order; rows
    of different lengths are right-padded (mask 0) to the longest."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    world, _ = _world()
    if world == 1:
        return ids, mask
    dist = torch.distributed
    if mask is None:
        mask = torch.ones_like(ids)
    shape = torch.tensor(list(ids.shape), dtype=torch.long, device=ids.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows, length = max(int(s[0]) for s in shapes), max(int(s[1]) for s in shapes)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [b, T] -> [rows, length] so every process sends the same shape
        out = torch.zeros(rows, length, dtype=t.dtype, device=t.device)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    gathered_ids = [torch.zeros(rows, length, dtype=ids.dtype, device=ids.device) for _ in range(world)]
    gathered_mask = [torch.zeros(rows, length, dtype=mask.dtype, device=mask.device) for _ in range(world)]
    dist.all_gather(gathered_ids, padded(ids))
    dist.all_gather(gathered_mask, padded(mask))
    ids = torch.cat([g[: int(s[0])] for g, s in zip(gathered_ids, shapes)])
    mask = torch.cat([g[: int(s[0])] for g, s in zip(gathered_mask, shapes)])
    return ids, (None if bool(mask.all()) else mask)


class DivergenceCallback(TrainerCallback):
    """The divergence stop alone, for any PEFT model (what `OuroborosCallback` does before each optimizer step): a
    NaN/inf gradient raises `TrainingDiverged` naming the update and the last checkpoint, before the optimizer
    applies it; the verdict is agreed across processes."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.requires_grad and p.grad is not None)
        flag = torch.tensor(1.0 if finite else 0.0)
        world, _ = _world()
        if world > 1:  # gradients are already reduced under DDP; sharded ones (FSDP) are not: agree on the verdict
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() < 1.0:
            checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) \
                if args.output_dir and Path(args.output_dir).is_dir() else []
            last = checkpoints[-1] if checkpoints else "none written yet"
            raise TrainingDiverged(
                f"the loss or gradient became NaN/inf at update {state.global_step + 1}; training stopped before the "
                f"optimizer applied it. Last good checkpoint: {last}. Try a lower learning rate."
            )


class OuroborosCallback(DivergenceCallback):
    """Calibration, depth sampling and divergence stop for `transformers.Trainer` (see the module docstring).

    calibrate: calibrate the step norms on the first batch of a fresh run. depth_range: (lo, hi) to sample the
    depth per update (the adapter needs max_steps >= hi); None = the adapter's num_steps. seed: the depth draw's
    seed (default: TrainingArguments.seed). calibration_batch: input_ids to calibrate on instead of the first batch.
    """

    def __init__(self, calibrate: bool = True, depth_range: Optional[tuple] = None, seed: Optional[int] = None,
                 calibration_batch: Optional[torch.Tensor] = None):
        if depth_range is not None:
            depth_range = tuple(int(x) for x in depth_range)
            if len(depth_range) != 2 or depth_range[0] < 1 or depth_range[1] < depth_range[0]:
                raise ValueError(f"depth_range must be (lo, hi) with 1 <= lo <= hi, got {depth_range}")
        self.calibrate = calibrate
        self.depth_range = depth_range
        self.seed = seed
        self.calibration_batch = calibration_batch
        self.calibrated: Optional[list] = None  # the values set, once calibrated
        self.depth: Optional[int] = None  # depth of the current update
        self._plan = None  # the adapter's plan at its own depth, taken when training begins

    def _decoder(self, model):
        return active_ouroboros(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        decoder, name = self._decoder(model)
        self._plan = decoder.plans[name]
        rows = decoder.ouroboros_adapter[name].spec.rows
        if self.depth_range is not None and self.depth_range[1] > rows:
            raise ValueError(
                f"depth_range {self.depth_range} goes deeper than the adapter's per-step tables ({rows} rows); "
                f"set max_steps >= {self.depth_range[1]} in the OuroborosConfig"
            )
        if not self.calibrate or state.global_step > 0:
            return
        if self.calibration_batch is not None:
            ids, mask = self.calibration_batch, None
        else:
            if train_dataloader is None:
                raise ValueError("OuroborosCallback(calibrate=True) needs the training dataloader or a calibration_batch")
            # the loader under accelerate's wrapper: the same batches for this process, without starting an epoch of
            # the wrapper (which tracks its own iteration state)
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            ids, mask = gather_first_batch(next(iter(loader)))
        device = next(p for p in decoder.ouroboros_adapter[name].parameters()).device
        self.calibrated = calibrate_step_norms(model, ids.to(device), None if mask is None else mask.to(device))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        decoder, name = self._decoder(model)
        seed = args.seed if self.seed is None else self.seed
        self.depth = depth_at(state.global_step, seed, self.depth_range, self._plan.num_steps)
        decoder.plans[name] = dataclasses.replace(self._plan, num_steps=self.depth)

    def restore_depth(self, model) -> None:
        """Put back the adapter's own depth (after training, or to evaluate between updates)."""
        if self._plan is not None:
            decoder, name = self._decoder(model)
            decoder.plans[name] = self._plan

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.restore_depth(model)
