"""What the core needs to know about an architecture family, and the Llama-style implementation of it.

A backbone supplies its layer to every host: `layer(pieces, h, lowrank)` is the layer's arithmetic, written once;
the transformers path runs it on the layer's own modules (`run_layer`, through `layer.DensePieces`), the vLLM
path on vLLM's decoder layer named by `vllm_layer`, whose fused parameters `vllm_stacked` maps to checkpoint names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from ..config import DEFAULT_TARGETS

if TYPE_CHECKING:  # torch is imported when a layer runs, not when the plugin is listed
    import torch
    from torch import nn

    from ..layer import AttentionInputs, LayerPieces
    from ..lora import LowRank


class Backbone(Protocol):
    """The interface a backbone plugin returns from the `ouroboros_backbones` hook."""

    name: str
    model_types: tuple  # HF config.model_type values handled
    projections: tuple  # names of the projections a layer has
    vllm_layer: Optional[str]  # "module:Class" of vLLM's decoder layer for this family; None = not served by vLLM
    vllm_stacked: dict  # checkpoint projection -> (vLLM fused parameter, shard id), for the fused ones
    row_parallel: tuple  # projections whose input dim is sharded under tensor parallelism (the rest: output dim)

    def check_config(self, config) -> None: ...  # raise ValueError for unsupported options
    def decoder(self, model: nn.Module) -> nn.Module: ...  # the module holding embeddings, layers, final norm
    def layers(self, decoder: nn.Module) -> nn.ModuleList: ...
    def projection(self, layer: nn.Module, name: str) -> nn.Linear: ...
    def embed(self, decoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor: ...
    def rotary(self, decoder: nn.Module, h: torch.Tensor, position_ids: torch.Tensor) -> tuple: ...
    def final_norm(self, decoder: nn.Module, h: torch.Tensor) -> torch.Tensor: ...
    def layer(self, pieces: LayerPieces, h: torch.Tensor, lowrank: LowRank = None) -> torch.Tensor: ...  # every host
    def run_layer(self, layer: nn.Module, h: torch.Tensor, inputs: AttentionInputs, lowrank: LowRank = None) -> torch.Tensor: ...


class LlamaStyleBackbone:
    """Pre-norm decoder with q/k/v/o attention projections, a gated MLP (gate/up/down), RoPE and RMSNorm:
    Llama, Qwen2, Mistral and their relatives. Subclass and set `name`/`model_types` for a new family."""

    name = "llama"
    model_types: tuple = ("llama",)
    projections = DEFAULT_TARGETS
    _attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    vllm_layer: Optional[str] = None
    # vLLM's Llama-style layers fuse q/k/v into self_attn.qkv_proj and gate/up into mlp.gate_up_proj
    vllm_stacked = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    row_parallel = ("o_proj", "down_proj")

    def check_config(self, config) -> None:
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError(f"{self.name}: sliding-window attention (use_sliding_window=True) is not supported")

    def decoder(self, model: nn.Module) -> nn.Module:
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            return getattr(inner, "base_layer", inner)
        return model

    def layers(self, decoder: nn.Module) -> nn.ModuleList:
        return decoder.layers

    def projection(self, layer: nn.Module, name: str) -> nn.Linear:
        parent = layer.self_attn if name in self._attention else layer.mlp
        return getattr(parent, name)

    def projection_shapes(self, layer: nn.Module) -> dict[str, tuple[int, int]]:
        return {name: tuple(self.projection(layer, name).weight.shape) for name in self.projections}

    def embed(self, decoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return decoder.embed_tokens(input_ids)

    def rotary(self, decoder: nn.Module, h: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        return decoder.rotary_emb(h, position_ids)

    def final_norm(self, decoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return decoder.norm(h)

    def attention_implementation(self, decoder: nn.Module) -> str:
        impl = getattr(decoder.config, "_attn_implementation", None) or "sdpa"
        return "eager" if impl == "eager" else "sdpa"

    def attention_dropout(self, decoder: nn.Module) -> float:
        return float(getattr(decoder.config, "attention_dropout", 0.0) or 0.0)

    def rms_eps(self, config) -> float:
        return float(getattr(config, "rms_norm_eps", 1e-6))

    def is_gradient_checkpointing(self, decoder: nn.Module) -> bool:
        return any(getattr(layer, "gradient_checkpointing", False) for layer in decoder.layers)

    def run_layer(self, layer: nn.Module, h: torch.Tensor, inputs: AttentionInputs, lowrank: LowRank = None) -> torch.Tensor:
        """The layer on the dense (transformers) host, plus `lowrank`'s paths on its projections (None: plain)."""
        from ..layer import DensePieces

        return self.layer(DensePieces(layer, inputs), h, lowrank)

    def layer(self, pieces: LayerPieces, h: torch.Tensor, lowrank: LowRank = None) -> torch.Tensor:
        """The layer's arithmetic on any host's pieces (`layer.llama_style_layer`)."""
        from ..layer import llama_style_layer

        return llama_style_layer(pieces, h, lowrank)
