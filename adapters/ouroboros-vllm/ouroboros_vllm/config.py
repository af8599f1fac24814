"""What vLLM can serve of an exported checkpoint's config. The config class itself is `ouroboros_hf`'s (defined
once for every host; it imports neither peft nor vLLM, so no vLLM process imports peft)."""

from __future__ import annotations

from ouroboros_hf import MODEL_TYPE, OuroborosLMConfig, register_config, spec_from_config
from ouroboros_plugins import OuroborosSpec, all_backbones, find_backbone

__all__ = ["MODEL_TYPE", "OuroborosLMConfig", "register_config", "serving_spec", "served_bases"]


def served_bases() -> list[str]:
    """Model types whose backbone plugin supplies a vLLM decoder layer (`Backbone.vllm_layer`)."""
    return sorted({t for b in all_backbones() if getattr(b, "vllm_layer", None) for t in b.model_types})


def serving_spec(config) -> OuroborosSpec:
    """The OuroborosSpec of an exported config, refused (ValueError naming the field) when vLLM cannot serve it."""
    spec = spec_from_config(config)
    spec.require_causal("be served by vLLM")
    base = getattr(config, "base_model_type", None)
    try:
        backbone = find_backbone(base)
    except ValueError:
        backbone = None
    if backbone is None or not getattr(backbone, "vllm_layer", None):
        raise ValueError(
            f"base_model_type={base!r} is not supported by ouroboros-vllm: no backbone plugin supplies a vLLM layer for "
            f"it; supported: {served_bases()}"
        )
    backbone.check_config(config)
    return spec
