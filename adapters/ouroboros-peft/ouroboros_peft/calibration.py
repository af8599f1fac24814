"""Data-driven initialisation of an Ouroboros adapter, for any training loop (compare PEFT's EVA init).

    model = get_peft_model(base, OuroborosConfig(...))
    calibrate_step_norms(model, first_batch["input_ids"])      # before the first optimizer update

RMSNorm with unit weight rescales the residual stream to RMS 1, while a pretrained model's mid-layer stream has a
much larger RMS (~5-7 on SmolLM2) that the coda was trained on. Setting each per-step norm row to the RMS the
recurrent layer really produces at that step keeps n_t ~ u_t at the start (docs/results.md, "Initialisation").
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .layer import OuroborosDecoder


def active_ouroboros(model: nn.Module) -> tuple[OuroborosDecoder, str]:
    """(tuner layer, adapter name) of the active Ouroboros adapter in `model` (a PeftModel, or any module holding
    one, e.g. a DDP wrapper). Raises ValueError naming what was found instead."""
    decoders = [m for m in model.modules() if isinstance(m, OuroborosDecoder)]
    if not decoders:
        raise ValueError(
            f"{type(model).__name__} has no Ouroboros adapter: wrap the model with "
            "get_peft_model(model, OuroborosConfig(...)) or load one with PeftModel.from_pretrained first"
        )
    if len(decoders) > 1:
        raise ValueError(f"{type(model).__name__} holds {len(decoders)} Ouroboros decoders; expected one")
    decoder = decoders[0]
    name = decoder.active_ouroboros()
    if name is None:
        raise ValueError(
            "the Ouroboros adapter of this model is not active (disabled, or another adapter is active): "
            f"available Ouroboros adapters {sorted(decoder.ouroboros_adapter)}; call model.set_adapter(name)"
        )
    return decoder, name


@torch.no_grad()
def calibrate_step_norms(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list:
    """Set row t of the active Ouroboros adapter's per-step RMSNorm weight to the median RMS (over the tokens of
    `input_ids`, padding excluded when `attention_mask` is given) of the recurrent layer's output u_t, step by step,
    at the deepest depth the tables allow (every row, not only `num_steps`). Each row is set before that step's
    norm runs, so step t+1 sees the calibrated step t. Deterministic (eval mode, no randomness); the model's
    training mode and depth are restored. Returns the values set, one per row.

    Call it once before training, on the first batch (every process the same batch), not when resuming."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor of token ids, got {getattr(input_ids, 'shape', input_ids)!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    decoder, name = active_ouroboros(model)
    adapter, plan = decoder.ouroboros_adapter[name], decoder.plans[name]
    rows = adapter.norms.weight.shape[0]
    valid = None if attention_mask is None else attention_mask.to(torch.bool)
    values: list = []

    def set_row(adapter, step, u, h):
        rms = u.float().pow(2).mean(-1).sqrt()  # [B, T]
        value = float((rms[valid] if valid is not None else rms).median())
        adapter.norms.weight[step].fill_(value)
        values.append(value)

    was_training = model.training
    handle = adapter.register_step_hook(set_row)
    decoder.plans[name] = dataclasses.replace(plan, num_steps=rows)
    try:
        model.eval()
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
        decoder.plans[name] = plan
        model.train(was_training)
    return values
