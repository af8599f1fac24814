"""The dense host: the recurrence on a model's own torch modules, tensors [B, T, d], a KV cache addressed by slot.
This is how the transformers path (ouroboros_peft: the PEFT tuner and the exported model) runs `recurrence.recur`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import LayerPlan
from .controller import PoolState, pool
from .layer import AttentionInputs, build_attention_mask, call_layer
from .lora import LowRank
from .recurrence import OuroborosAdapter, recur


def positions_from_mask(valid: Optional[torch.Tensor], batch: int, q_len: int, past: int, device) -> torch.Tensor:
    """Position ids [B, T]: count of valid tokens before each position (left padding aware)."""
    if valid is None:
        return torch.arange(past, past + q_len, device=device).unsqueeze(0).expand(batch, -1)
    pos = torch.cumsum(valid.to(torch.long), dim=-1) - 1
    return pos.clamp_min(0)[:, -q_len:]


class DenseHost:
    """`recurrence.Host` over a decoder's layers (found through its backbone plugin) for one forward call."""

    reduce = None  # one process holds every weight

    def __init__(self, backbone, decoder: nn.Module, plan: LayerPlan, inputs_embeds: torch.Tensor, attention_mask, position_ids, cache, pool_state: Optional[PoolState], pooling: str):
        self.backbone, self.decoder, self.plan, self.cache = backbone, decoder, plan, cache
        self.layers = backbone.layers(decoder)
        self.num_steps, self.num_coda = plan.num_steps, len(plan.coda)
        batch, q_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past = cache.get_seq_length(0) if cache is not None else 0
        valid = attention_mask.to(torch.bool) if attention_mask is not None else None
        if valid is not None and valid.shape[-1] != past + q_len:
            raise ValueError(f"attention_mask covers {valid.shape[-1]} positions, expected past ({past}) + new ({q_len})")
        if position_ids is None:
            position_ids = positions_from_mask(valid, batch, q_len, past, device)
        self.implementation = backbone.attention_implementation(decoder)
        self.mask = build_attention_mask(valid, batch, q_len, past, inputs_embeds.dtype, device, self.implementation)
        self.cos, self.sin = backbone.rotary(decoder, inputs_embeds, position_ids)
        self.dropout = backbone.attention_dropout(decoder) if decoder.training else 0.0
        self.step_valid = valid[:, -q_len:] if valid is not None else None
        self.pool_state, self.pooling = pool_state, pooling

    def _layer(self, index: int, slot: int, h: torch.Tensor, lowrank: Optional[LowRank] = None) -> torch.Tensor:
        inputs = AttentionInputs(self.cos, self.sin, self.mask, self.implementation, self.cache, slot, self.dropout)
        return call_layer(self.backbone.run_layer, self.layers[index], h, inputs, lowrank)

    def prelude(self, h):
        for i, index in enumerate(self.plan.prelude):
            h = self._layer(index, self.plan.prelude_slot(i), h)
        return h

    def pooled(self, t, h):
        return pool(h, self.pooling, self.step_valid, t, self.pool_state)

    def recurrent(self, t, h, lowrank):
        return self._layer(self.plan.recurrent, self.plan.step_slot(t), h, lowrank)

    def coda(self, k, h, lowrank=None):
        return self._layer(self.plan.coda[k], self.plan.coda_slot(k), h, lowrank)

    def final_norm(self, h):
        return self.backbone.final_norm(self.decoder, h)


def run(
    backbone,
    decoder: nn.Module,
    adapter: OuroborosAdapter,
    plan: LayerPlan,
    inputs_embeds: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    cache=None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """Prelude -> N modulated recurrent steps -> Coda -> final norm on a dense model. Returns [B, T, d].

    cache: a KV cache with update(k, v, slot) and get_seq_length(slot); slot layout is `plan`'s
    (prelude layers, then one slot per step, then coda layers). With causal_mean pooling the cache also carries
    the Controller's prefix sums as `cache.ouroboros_pool` (a PoolState, created here when absent), which the host
    must reorder, expand and select with the cache's batch rows. attention_mask: [B, past + T], 1 = token.
    """
    spec = adapter.spec
    past = cache.get_seq_length(0) if cache is not None else 0
    if past > 0:
        spec.require_causal("decode token by token with a KV cache")
    pool_state = None
    if cache is not None and spec.modulation == "controller" and spec.controller_pooling == "causal_mean":
        # the host's cache carries the prefix sums as `ouroboros_pool` (and keeps them in step with its batch rows)
        pool_state = getattr(cache, "ouroboros_pool", None)
        if pool_state is None:
            pool_state = PoolState()
            cache.ouroboros_pool = pool_state
        if past == 0:
            pool_state.clear()
    host = DenseHost(backbone, decoder, plan, inputs_embeds, attention_mask, position_ids, cache, pool_state, spec.controller_pooling)
    checkpointing = gradient_checkpointing and torch.is_grad_enabled() and cache is None
    return recur(adapter, host, inputs_embeds, checkpointing)
