"""The transformers-side forward shared by the PEFT tuner layer and the exported model: argument
handling, the KV cache (one slot per prelude layer, recurrence step and coda layer), then the core loop."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from ouroboros_plugins import LayerPlan, OuroborosAdapter, PoolState
from ouroboros_plugins.dense import run


class PoolCacheLayer(CacheLayerMixin):
    """The Controller's causal_mean prefix sums (a core `PoolState`) as one more layer of a transformers cache, so
    that every batch operation `generate` applies to the cache applies to them too: beam reordering
    (`reorder_cache`), expansion (`batch_repeat_interleave`) and selection (`batch_select_indices`). It holds no
    keys or values. A prefix sum cannot give back what it added, so rolling the cache back (`crop`, as assisted
    decoding does) is refused; `generate` refuses assisted decoding with causal_mean before it starts."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state = PoolState()

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("PoolCacheLayer holds pooling state, not keys and values")

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PoolCacheLayer holds pooling state, not keys and values")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.state.sums:
            raise ValueError(
                "controller_pooling='causal_mean' keeps running prefix sums that cannot be rolled back, so the cache "
                "cannot be cropped (assisted / speculative decoding); use controller_pooling='token' or 'static' modulation"
            )


def ensure_slots(cache, num_slots: int, pooling: bool = False) -> None:
    """A cache made for the full model (e.g. by `generate`) has one slot per original layer; Ouroboros
    needs prelude + N + coda of them. Missing slots are added, unused empty ones dropped; a shared slot would
    silently mix steps.
    pooling: also give the cache a `PoolCacheLayer` (after the KV slots) and point `cache.ouroboros_pool`, where
    the core looks for the causal_mean prefix sums, at its state."""
    while len(cache.layers) < num_slots:
        cache.layers.append(DynamicLayer())
    # slots the full model would have used beyond ours stay empty forever, and an empty layer cannot be cropped
    # (assisted decoding crops every layer): drop them
    while len(cache.layers) > num_slots and type(cache.layers[-1]) is DynamicLayer and not cache.layers[-1].is_initialized:
        cache.layers.pop()
    if pooling:
        layer = next((l for l in cache.layers if isinstance(l, PoolCacheLayer)), None)
        if layer is None:
            layer = PoolCacheLayer()
            cache.layers.append(layer)
        cache.ouroboros_pool = layer.state


def uses_pool_state(spec) -> bool:
    return spec.modulation == "controller" and spec.controller_pooling == "causal_mean"


# generate() options that run assisted / speculative decoding, which rolls the cache back
ASSISTED_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def check_generation(spec, model_generation_config, kwargs: dict) -> None:
    """Refuse, before any work, what this adapter cannot generate: sequence_mean pooling at all (it reads future
    tokens), and assisted decoding with causal_mean pooling (its prefix sums cannot be rolled back). Beam search,
    sampling and greedy work with every modulation. kwargs: what the caller passed to generate()."""
    spec.require_causal("generate")
    if uses_pool_state(spec):
        config = kwargs.get("generation_config") or model_generation_config  # what generate() will start from
        assisted = [k for k in ASSISTED_OPTIONS if kwargs.get(k) or getattr(config, k, None)]
        if assisted:
            raise ValueError(
                f"assisted decoding ({', '.join(assisted)}) rolls the cache back, which controller_pooling='causal_mean' "
                "cannot follow (its prefix sums cannot be un-added); generate without it, or use an adapter with "
                "controller_pooling='token' or modulation='static'"
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
        ensure_slots(cache, plan.num_slots, pooling=uses_pool_state(adapter.spec))
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
