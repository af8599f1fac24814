"""One Llama-style decoder layer (Llama, Qwen2, Mistral, ...), written once for every host.

`llama_style_layer(pieces, h, lowrank)` is the layer's arithmetic: norms, projections, attention, gated MLP and
residuals. What differs between hosts is handed in as `pieces` (a `LayerPieces`): the transformers path gives the
layer's own modules with a dense KV cache (`DensePieces`, below); vLLM gives its fused q/k/v and gate/up matmuls,
rotary and paged attention (ouroboros_vllm). `lowrank` adds the Ouroboros low-rank paths to the projections
(`lora.LowRank`): the modulated SVD bases on the recurrent layer, the trainable LoRA on the coda.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LowRank

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
# the projections of a Llama-style layer, grouped by shared input (a group's low-rank A run as one matmul)
PROJECTION_GROUPS = (QKV, ("o_proj",), GATE_UP, ("down_proj",))


class LayerPieces(Protocol):
    """A host's view of one decoder layer for one call. Tensors are [..., features] (any leading dims)."""

    def input_norm(self, h: torch.Tensor) -> torch.Tensor: ...
    def post_attention_norm(self, h: torch.Tensor) -> torch.Tensor: ...
    def project(self, names: tuple, x: torch.Tensor) -> list: ...  # the frozen projections `names` of x, one tensor each
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...  # rotary + cache + attention
    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...  # act(gate) * up


def project(pieces: LayerPieces, names: tuple, x: torch.Tensor, lowrank: Optional[LowRank]) -> list:
    outputs = pieces.project(names, x)
    return outputs if lowrank is None else lowrank.add(names, x, outputs)


def llama_style_layer(pieces: LayerPieces, h: torch.Tensor, lowrank: Optional[LowRank] = None) -> torch.Tensor:
    """Pre-norm attention + gated MLP with residuals, every projection plus its low-rank path (if any)."""
    x = pieces.input_norm(h)
    q, k, v = project(pieces, QKV, x, lowrank)
    o = pieces.attend(q, k, v)  # [..., heads * head_dim]
    (out,) = project(pieces, ("o_proj",), o, lowrank)
    h = h + out

    x = pieces.post_attention_norm(h)
    gate, up = project(pieces, GATE_UP, x, lowrank)
    (down,) = project(pieces, ("down_proj",), pieces.activate(gate, up), lowrank)
    return h + down


def plain_proj(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The frozen projection. Its input is cast to the weight's dtype and the output back to the input's, so a
    layer can run its residual stream in fp32 on a half-precision model (the recurrence does)."""
    if x.dtype == module.weight.dtype:
        return module(x)
    return module(x.to(module.weight.dtype)).to(x.dtype)


@dataclass
class AttentionInputs:
    """Everything a layer needs besides its input: rotary tables, mask, cache and slot."""

    cos: torch.Tensor  # [B, T, head_dim]
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # eager: additive [B,1,T,S]; sdpa: bool keep-mask [B,1,T,S]
    implementation: str  # "eager" or "sdpa"
    cache: object = None  # anything with update(k, v, slot) -> (k_all, v_all)
    slot: int = 0
    dropout: float = 0.0


def build_attention_mask(
    valid: Optional[torch.Tensor], batch: int, q_len: int, past: int, dtype: torch.dtype, device, implementation: str
) -> torch.Tensor:
    """Causal + padding mask over keys [0, past + q_len). valid: [B, past + q_len] bool or None.

    A query row with no visible key (a padding position under left padding) is allowed to see itself, so
    no row is all -inf; those positions are padding and never read.
    """
    kv_len = past + q_len
    q_pos = torch.arange(past, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    keep = (k_pos[None, :] <= q_pos[:, None]).unsqueeze(0).expand(batch, q_len, kv_len)  # [B, T, S]
    if valid is not None:
        keep = keep & valid[:, None, :].to(torch.bool)
        diag = k_pos[None, :] == q_pos[:, None]
        keep = keep | (diag.unsqueeze(0) & ~keep.any(-1, keepdim=True))
    keep = keep.unsqueeze(1)  # [B, 1, T, S]
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(q, k, v, mask, implementation: str, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """q [B,H,T,D], k/v [B,Hkv,S,D] -> [B,T,H*D]. Always causal through `mask`."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if implementation == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        out = torch.matmul(probs, v)
    batch, _, q_len, _ = out.shape
    return out.transpose(1, 2).reshape(batch, q_len, -1)


class DensePieces:
    """The transformers host's pieces of a Llama-style layer: the layer's own modules (`self_attn.{q,k,v,o}_proj`,
    `mlp.{gate,up,down}_proj`, `mlp.act_fn`, the two RMSNorms), tensors [B, T, features], and a dense KV cache
    addressed by slot (`inputs`)."""

    def __init__(self, layer: nn.Module, inputs: AttentionInputs):
        self.layer, self.inputs = layer, inputs
        attn, mlp = layer.self_attn, layer.mlp
        self.modules = {name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        self.modules.update({name: getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")})

    def input_norm(self, h):
        return self.layer.input_layernorm(h)

    def post_attention_norm(self, h):
        return self.layer.post_attention_layernorm(h)

    def project(self, names, x):
        return [plain_proj(self.modules[name], x) for name in names]

    def attend(self, q, k, v):
        attn, inputs = self.layer.self_attn, self.inputs
        batch, q_len, _ = q.shape
        head_dim = attn.head_dim
        q = q.view(batch, q_len, -1, head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(batch, q_len, -1, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(batch, q_len, -1, head_dim).transpose(1, 2)
        cos, sin = inputs.cos.unsqueeze(1), inputs.sin.unsqueeze(1)  # [B, 1, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if inputs.cache is not None:
            k, v = inputs.cache.update(k, v, inputs.slot)  # [B, Hkv, S, D]
        return attention(q, k, v, inputs.mask, inputs.implementation, attn.scaling, inputs.dropout)  # [B, T, H*D]

    def activate(self, gate, up):
        return self.layer.mlp.act_fn(gate) * up


# The name under which `call_layer` gives a sharded layer a forward method of its own.
FSDP_FORWARD_METHOD = "ouroboros_forward"


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return None
    return FSDPModule


def call_layer(run_layer: Callable, layer: nn.Module, h: torch.Tensor, *args) -> torch.Tensor:
    """`run_layer(layer, h, *args)`, run as a forward of `layer`.

    The core computes a layer from its submodules instead of calling `layer(...)` (see layer.py's docstring), so
    hooks that a sharding wrapper put on the layer's own forward would never fire. For a layer sharded with
    torch's FSDP2 (`fully_shard` per decoder layer) the computation is registered once as an FSDP forward method
    (`register_fsdp_forward_method`): every call, the recurrent layer's N calls included, gathers the layer's
    weights first, releases them after, and gathers them again for its backward. Other layers run as they are.
    """
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not isinstance(layer, fsdp_module):
        return run_layer(layer, h, *args)
    method = layer.__dict__.get(FSDP_FORWARD_METHOD)
    if method is None:
        from torch.distributed.fsdp import register_fsdp_forward_method

        def ouroboros_forward(self, fn, hidden, *rest):
            return fn(self, hidden, *rest)

        layer.__dict__[FSDP_FORWARD_METHOD] = types.MethodType(ouroboros_forward, layer)
        register_fsdp_forward_method(layer, FSDP_FORWARD_METHOD)
        method = getattr(layer, FSDP_FORWARD_METHOD)
    return method(run_layer, h, *args)
