"""`OuroborosDecoder`: the tuner layer that takes the place of a causal LM's decoder (`model.model`).

With the adapter enabled it runs Prelude -> N modulated steps -> Coda through the core; disabled, it calls
the original decoder untouched, so `disable_adapter()` gives exactly the full pretrained model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ouroboros_plugins import LayerPlan, OuroborosAdapter

from .runtime import decode


class OuroborosDecoder(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("ouroboros_adapter",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, backbone):
        super().__init__()
        self.base_layer = base_layer
        self.backbone = backbone
        self.ouroboros_adapter = nn.ModuleDict()
        self.plans: dict[str, LayerPlan] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # embed_tokens, config, layers, ... of the wrapped decoder

    def add_adapter(self, adapter_name: str, adapter: OuroborosAdapter, plan: LayerPlan) -> None:
        self.ouroboros_adapter[adapter_name] = adapter
        self.plans[adapter_name] = plan
        self.set_adapter(self.active_adapters)

    def set_num_steps(self, num_steps: int, adapter_name: str = "default") -> None:
        """Change the recurrence depth at evaluation time. The per-step tables have `max_steps` rows
        (default: the trained depth), so only depths up to that are possible."""
        rows = self.ouroboros_adapter[adapter_name].spec.rows
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= rows:
            raise ValueError(f"num_steps must be an integer in 1..{rows} (the adapter's per-step tables have {rows} rows), got {num_steps!r}")
        self.plans[adapter_name] = dataclasses.replace(self.plans[adapter_name], num_steps=num_steps)

    def merge(self, *args, **kwargs):
        raise NotImplementedError("Ouroboros modulation depends on the input; it cannot be merged into the base weights")

    def active_ouroboros(self) -> Optional[str]:
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.ouroboros_adapter]
        if len(active) > 1:
            raise ValueError(f"only one Ouroboros adapter can be active at a time, got {active}")
        return active[0] if active else None

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        name = self.active_ouroboros()
        if name is None:
            return self.base_layer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        hidden, cache = decode(
            self.backbone,
            self.base_layer,
            self.ouroboros_adapter[name],
            self.plans[name],
            training=self.training,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
