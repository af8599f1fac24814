"""The transformers-side forward shared by the PEFT tuner layer and the exported model: argument
handling, the KV cache (one slot per prelude layer, recurrence step and coda layer), then the core loop."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ouroboros_plugins import LayerPlan, OuroborosAdapter, run


def ensure_slots(cache, num_slots: int) -> None:
    """A cache made for the full model (e.g. by `generate`) has one slot per original layer; Ouroboros
    needs prelude + N + coda of them. Missing slots are added; a shared slot would silently mix steps."""
    if getattr(cache, "layer_class_to_replicate", None) is None:
        while len(cache.layers) < num_slots:
            cache.layers.append(DynamicLayer())


def refuse_non_causal_generation(spec) -> None:
    if spec.modulation == "controller" and spec.controller_pooling == "sequence_mean":
        raise ValueError(
            "controller_pooling='sequence_mean' lets every position read future tokens (reference reproduction only) "
            "and cannot generate; train or load with controller_pooling='causal_mean' or 'token'"
        )


def decode(
    backbone,
    decoder,
    adapter: OuroborosAdapter,
    plan: LayerPlan,
    *,
    training: bool,
    input_ids: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    past_key_values=None,
    use_cache: Optional[bool] = None,
):
    """Returns (last hidden state after the final norm [B, T, d], cache or None)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = backbone.embed(decoder, input_ids)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("Ouroboros expects a 2-D attention_mask [batch, past + new] (1 = token, 0 = padding)")
    checkpointing = training and backbone.is_gradient_checkpointing(decoder)
    if use_cache is None:
        use_cache = bool(getattr(decoder.config, "use_cache", False))
    if checkpointing:
        use_cache = False  # recomputation must not write to a cache
    cache = past_key_values if use_cache else None
    if use_cache and cache is None:
        cache = DynamicCache()
    if cache is not None:
        ensure_slots(cache, plan.num_slots)
    hidden = run(
        backbone,
        decoder,
        adapter,
        plan,
        inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        gradient_checkpointing=checkpointing,
    )
    return hidden, cache
