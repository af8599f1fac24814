"""Cutting a pretrained decoder into Prelude / Recurrent / Coda and building the adapter for it."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .config import LayerPlan, OuroborosSpec
from .recurrence import OuroborosAdapter

FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def plan_for(backbone, config, decoder: nn.Module, spec: OuroborosSpec) -> LayerPlan:
    backbone.check_config(config)
    layers = backbone.layers(decoder)
    return spec.resolve(len(layers), backbone.projection_shapes(layers[0]))


def layer_weights(backbone, layer: nn.Module, names) -> dict[str, torch.Tensor]:
    return {name: backbone.projection(layer, name).weight for name in names}


@torch.no_grad()
def layer_hash(backbone, layer: nn.Module) -> str | None:
    """sha256 of the layer's projection weights rounded to bf16, so an fp32 and a bf16 load of the same
    checkpoint agree. None on the meta device."""
    digest = hashlib.sha256()
    for name in backbone.projections:
        weight = backbone.projection(layer, name).weight
        if weight.is_meta:
            return None
        digest.update(name.encode())
        digest.update(weight.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(backbone, config, decoder: nn.Module, plan: LayerPlan) -> dict:
    """What identifies the base model an adapter belongs to: architecture, shapes, recurrent-layer hash."""
    layers = backbone.layers(decoder)
    fp = {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}
    fp["recurrent_layer_index"] = plan.recurrent
    fp["recurrent_layer_sha256"] = layer_hash(backbone, layers[plan.recurrent])
    return fp


def check_fingerprint(expected: dict, actual: dict) -> None:
    diffs = [
        f"{key}: adapter has {expected.get(key)!r}, model has {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual))
        if expected.get(key) is not None and actual.get(key) is not None and expected.get(key) != actual.get(key)
    ]
    if diffs:
        raise ValueError("this adapter was trained on a different base model: " + "; ".join(diffs))


def build_adapter(backbone, config, decoder: nn.Module, spec: OuroborosSpec, compute_bases: bool = True):
    """Plan the cut, create the adapter (fp32) and, unless its weights are about to be loaded, compute the
    SVD bases from the layers the cut removes. Returns (adapter, plan)."""
    plan = plan_for(backbone, config, decoder, spec)
    layers = backbone.layers(decoder)
    recurrent = layers[plan.recurrent]
    shapes = backbone.projection_shapes(recurrent)
    device = next(recurrent.parameters()).device
    adapter = OuroborosAdapter(spec, config.hidden_size, shapes, backbone.rms_eps(config), device=device)
    if compute_bases:
        adapter.init_bases(
            layer_weights(backbone, recurrent, spec.targets),
            [layer_weights(backbone, layers[j], spec.targets) for j in plan.removed],
        )
    return adapter, plan
