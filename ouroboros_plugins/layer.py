"""One Llama-style decoder layer (Llama, Qwen2, Mistral, ...) computed from its own modules, with two
things the host's layer call cannot take: a per-projection modulation and an explicit KV-cache slot.

The host framework's modules (norms, projections, activation) are called as they are; only the glue
(rotary, attention, residuals) is written here, so the same code serves every host.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# proj(name, module, x) -> projection output (the base projection, possibly modulated)
ProjFn = Callable[[str, nn.Linear, torch.Tensor], torch.Tensor]


def plain_proj(name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
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


def llama_style_layer(layer: nn.Module, h: torch.Tensor, inputs: AttentionInputs, proj: ProjFn = plain_proj) -> torch.Tensor:
    """Pre-norm attention + gated MLP with residuals; `layer` has self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
    input_layernorm, post_attention_layernorm."""
    attn, mlp = layer.self_attn, layer.mlp
    batch, q_len, _ = h.shape
    head_dim = attn.head_dim

    x = layer.input_layernorm(h)
    q = proj("q_proj", attn.q_proj, x).view(batch, q_len, -1, head_dim).transpose(1, 2)  # [B, H, T, D]
    k = proj("k_proj", attn.k_proj, x).view(batch, q_len, -1, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
    v = proj("v_proj", attn.v_proj, x).view(batch, q_len, -1, head_dim).transpose(1, 2)
    cos, sin = inputs.cos.unsqueeze(1), inputs.sin.unsqueeze(1)  # [B, 1, T, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if inputs.cache is not None:
        k, v = inputs.cache.update(k, v, inputs.slot)  # [B, Hkv, S, D]
    o = attention(q, k, v, inputs.mask, inputs.implementation, attn.scaling, inputs.dropout)  # [B, T, H*D]
    h = h + proj("o_proj", attn.o_proj, o)

    x = layer.post_attention_layernorm(h)
    gate = proj("gate_proj", mlp.gate_proj, x)
    up = proj("up_proj", mlp.up_proj, x)
    return h + proj("down_proj", mlp.down_proj, mlp.act_fn(gate) * up)


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
