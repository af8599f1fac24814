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
# Further config values the kept layers depend on (compared when both sides have them).
ROTARY_FIELDS = ("rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings")

# Weight signatures: per kept tensor, SIGNATURE_SAMPLES evenly strided values projected on SIGNATURE_PROJECTIONS
# fixed random sign vectors, plus their norm. Loading the same checkpoint in fp32, bf16 or fp16 moves a projection by
# ~0.5 % of the norm; other weights move it by about the whole norm.
SIGNATURE_SAMPLES = 4096
SIGNATURE_PROJECTIONS = 4
SIGNATURE_TOLERANCE = 0.05  # of the norm (projections), relative (norm)


def plan_for(backbone, config, decoder: nn.Module, spec: OuroborosSpec) -> LayerPlan:
    backbone.check_config(config)
    layers = backbone.layers(decoder)
    return spec.resolve(len(layers), backbone.projection_shapes(layers[0]))


def layer_weights(backbone, layer: nn.Module, names) -> dict[str, torch.Tensor]:
    return {name: backbone.projection(layer, name).weight for name in names}


@torch.no_grad()
def layer_hash(backbone, layer: nn.Module) -> str | None:
    """sha256 of the layer's projection weights rounded to bf16 (the fingerprint of adapters saved before weight
    signatures existed; still checked for them). None on the meta device."""
    digest = hashlib.sha256()
    for name in backbone.projections:
        weight = backbone.projection(layer, name).weight
        if weight.is_meta:
            return None
        digest.update(name.encode())
        digest.update(weight.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def signature(module: nn.Module) -> dict | None:
    """{tensor name: [norm, projection_1, ...]} for every tensor of `module` (parameters and buffers), each on
    SIGNATURE_SAMPLES evenly strided values: robust to the dtype the checkpoint was loaded in, and to a tensor's
    scale (each is compared against its own norm). None on the meta device."""
    out = {}
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        x = flat[:: max(1, flat.numel() // SIGNATURE_SAMPLES)][:SIGNATURE_SAMPLES].to("cpu", torch.float32)  # [n]
        signs = torch.randint(0, 2, (SIGNATURE_PROJECTIONS, x.numel()), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
        out[name] = [float(f"{v:.6g}") for v in [float(x.norm()), *(signs @ x).tolist()]]
    return out


def signatures(backbone, decoder: nn.Module, plan: LayerPlan, lm_head: nn.Module | None) -> dict:
    """Signature of every part the adapter keeps: embeddings, prelude / recurrent / coda layers (by their index in
    the full model), final norm, and the output head when it is a weight of its own."""
    layers = backbone.layers(decoder)
    parts = {"embed_tokens": decoder.embed_tokens}
    parts.update({f"layers.{i}": layers[i] for i in plan.prelude + (plan.recurrent,) + plan.coda})
    parts["norm"] = decoder.norm
    if lm_head is not None:
        parts["lm_head"] = lm_head
    return {name: signature(module) for name, module in parts.items()}


def fingerprint(backbone, config, decoder: nn.Module, plan: LayerPlan, lm_head: nn.Module | None = None) -> dict:
    """What identifies the base model an adapter belongs to: architecture, shapes, rotary settings, and a signature
    of every weight the adapter keeps (`signatures`)."""
    fp = {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}
    fp.update({name: _jsonable(getattr(config, name)) for name in ROTARY_FIELDS if getattr(config, name, None) is not None})
    fp["recurrent_layer_index"] = plan.recurrent
    fp["recurrent_layer_sha256"] = layer_hash(backbone, backbone.layers(decoder)[plan.recurrent])  # for older adapters
    fp["weights"] = signatures(backbone, decoder, plan, None if getattr(config, "tie_word_embeddings", False) else lm_head)
    return fp


def _jsonable(value):
    return value.to_dict() if hasattr(value, "to_dict") else (dict(value) if isinstance(value, dict) else value)


def _differing_tensors(expected: dict, actual: dict) -> list:
    """Names of the tensors whose signatures differ by more than dtype rounding can explain."""
    differ = []
    for name, (norm, *projections) in expected.items():
        if name not in actual:
            differ.append(name)
            continue
        now_norm, *now = actual[name]
        tolerance = SIGNATURE_TOLERANCE * max(norm, 1e-12)
        if abs(now_norm - norm) > tolerance or any(abs(a - e) > tolerance for a, e in zip(now, projections)):
            differ.append(name)
    return differ


def check_fingerprint(expected: dict, actual: dict) -> None:
    """Refuse a base model other than the adapter's: config fields compared exactly, kept weights by signature
    (adapters saved before signatures existed: the recurrent layer's bf16 hash)."""
    diffs = [
        f"{key}: adapter has {expected.get(key)!r}, model has {actual.get(key)!r}"
        for key in sorted(set(expected) | set(actual)) if key not in ("weights", "recurrent_layer_sha256")
        if expected.get(key) is not None and actual.get(key) is not None and expected.get(key) != actual.get(key)
    ]
    sigs, now = expected.get("weights") or {}, actual.get("weights") or {}
    for part in sorted(sigs):
        if sigs[part] is not None and now.get(part) is not None:
            differ = _differing_tensors(sigs[part], now[part])
            if differ:
                diffs.append(f"weights of {part} differ ({', '.join(differ[:3])})")
    if "weights" not in expected and expected.get("recurrent_layer_sha256"):
        old_hash = actual.get("recurrent_layer_sha256")
        if old_hash is not None and old_hash != expected["recurrent_layer_sha256"]:
            diffs.append(f"recurrent_layer_sha256: adapter has {expected['recurrent_layer_sha256']!r}, model has {old_hash!r}")
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
