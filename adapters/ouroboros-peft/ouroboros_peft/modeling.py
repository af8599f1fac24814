"""The standalone exported model: `OuroborosForCausalLM`, registered with transformers' Auto classes when
`ouroboros_peft` is imported (no trust_remote_code).

Checkpoint layout (model.safetensors), names matching the base family's own keys so other loaders map them 1:1:
    model.embed_tokens.weight, model.layers.{0..P+C}.* (prelude 0..P-1, recurrent P, coda P+1..P+C),
    model.norm.weight, lm_head.weight (absent when tied), ouroboros.* (bases, controller/static, norms, gate)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ouroboros_hf import ARCHITECTURE, MODEL_TYPE, SPEC_FIELDS, OuroborosLMConfig, register_config
from ouroboros_plugins import LayerPlan, OuroborosAdapter, OuroborosSpec, find_backbone

from .runtime import decode, check_generation

def fp32_logits(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection, computed in fp32 whatever the model's dtype. Logits stored in bf16 keep 8 bits of
    mantissa (steps of 0.125 at a logit of 20), enough to flip a close top-1 token (evals/results/bf16_agreement.json). Cost on a half-precision model: a transient fp32 copy of the head
    weight per forward (vocab x hidden x 4 bytes: 113 MB for SmolLM2-135M) and an fp32 matmul."""
    if head.weight.dtype == torch.float32:
        return head(hidden)
    bias = head.bias.float() if head.bias is not None else None
    return nn.functional.linear(hidden.float(), head.weight.float(), bias)


def exported_plan(spec: OuroborosSpec) -> LayerPlan:
    p, c = spec.num_prelude_layers, spec.num_coda_layers
    return LayerPlan(
        num_layers=p + 1 + c,
        prelude=tuple(range(p)),
        recurrent=p,
        removed=(),
        coda=tuple(range(p + 1, p + 1 + c)),
        num_steps=spec.num_steps,
    )


class OuroborosForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OuroborosLMConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = False
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer"]
    # The adapter computes in fp32 whatever the base dtype (as in training): `from_pretrained(..., dtype=bf16)`
    # casts the decoder layers only. The token embeddings and the output projection stay fp32 too (tied in most
    # small models): logits and the residual stream they start then keep full resolution, which takes bf16's top-1
    # agreement with fp32 from 96 % to 98+ % (evals/results/bf16_agreement.json) for vocab x hidden x 2 more bytes
    # (57 MB for SmolLM2-135M). ("strict": transformers' plain _keep_in_fp32_modules applies to fp16 alone.)
    _keep_in_fp32_modules_strict = ["ouroboros", "embed_tokens", "lm_head"]

    def __init__(self, config: OuroborosLMConfig):
        super().__init__(config)
        spec = config.spec()  # checked: fields in range, num_hidden_layers = prelude + 1 + coda
        self.backbone = find_backbone(config.base_model_type)
        base_cls = MODEL_MAPPING[CONFIG_MAPPING[config.base_model_type]]
        self.model = base_cls(config)  # shares this config: same fields, same attention implementation
        recurrent = self.model.layers[spec.num_prelude_layers]
        shapes = self.backbone.projection_shapes(recurrent)
        self.ouroboros = OuroborosAdapter(spec, config.hidden_size, shapes, self.backbone.rms_eps(config))
        self.plan = exported_plan(spec)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if any(module is m for m in self.ouroboros.modules()):
            return  # the adapter initialises itself (zero heads, gate bias); its values come from the checkpoint
        super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Strict load: a checkpoint with missing or extra tensors, or a depth its per-step tables cannot
        serve, is refused with the names of what is wrong."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        tied = set(cls._tied_weights_keys) if model.config.tie_word_embeddings else set()
        missing = sorted(set(info.get("missing_keys", ())) - tied)
        unexpected = sorted(info.get("unexpected_keys", ()))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match OuroborosForCausalLM: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return (model, info) if want_info else model

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden, cache = decode(
            self.backbone,
            self.model,
            self.ouroboros,
            self.plan,
            training=self.training,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = fp32_logits(self.lm_head, hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def generate(self, *args, **kwargs):
        check_generation(self.ouroboros.spec, self.generation_config, kwargs)
        return super().generate(*args, **kwargs)


def register_auto_classes() -> None:
    """Idempotent: `AutoConfig` / `AutoModelForCausalLM` learn the `ouroboros` model type and this model class
    (over ouroboros_hf's lazy entry, whichever was registered first)."""
    register_config()
    AutoModelForCausalLM.register(OuroborosLMConfig, OuroborosForCausalLM, exist_ok=True)
