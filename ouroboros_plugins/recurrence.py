"""The Ouroboros block: modulation source, per-step norms, gate, and the Prelude -> N steps -> Coda loop.

    h_0 = Prelude(embed(x))
    for t in 0..N-1:
        m_t   = Controller(pool(h_t), t)        (or the static table's row t)
        u_t   = RecurrentLayer_{m_t}(h_t)        (frozen layer + modulated SVD LoRA on each target)
        n_t   = RMSNorm_t(u_t)                   (own weight row per step)
        h_t+1 = g * n_t + (1 - g) * h_t,  g = sigmoid(W_g [n_t ; h_t] + b_g)
    logits = lm_head(norm(Coda(h_N)))
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from .config import LayerPlan, OuroborosSpec
from .controller import Controller, PoolState, StaticModulation, pool
from .layer import AttentionInputs, build_attention_mask, call_layer
from .lora import Bases, modulated_linear, svd_bases


class StepNorms(nn.Module):
    """RMSNorm with its own weight row per recurrence step: weight [rows, d]."""

    def __init__(self, rows: int, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows, hidden_size))
        self.eps = eps

    def forward(self, u: torch.Tensor, step: int) -> torch.Tensor:
        uf = u.to(torch.float32)
        return self.weight[step] * (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + self.eps))


class Gate(nn.Module):
    """g = sigmoid(W [n ; h] + b); W starts at zero and b at logit(1 - retention), so 1 - g = retention at init."""

    def __init__(self, hidden_size: int, bias: float):
        super().__init__()
        self.proj = nn.Linear(2 * hidden_size, hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(torch.cat([n, h.to(n.dtype)], dim=-1).to(self.proj.weight.dtype)))


class CodaLoRA(nn.Module):
    """Optional trainable LoRA on the coda layers: y = W x + B (A x) per projection, A [r, d_in] random, B [d_out, r]
    zero, so training starts from the frozen coda. Parameters `layers.<k>.<proj>_A/_B`, k = position in the coda."""

    def __init__(self, num_layers: int, shapes: dict[str, tuple[int, int]], r: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            layer = nn.Module()
            for name, (d_out, d_in) in shapes.items():
                a = nn.Parameter(torch.empty(r, d_in))
                nn.init.normal_(a, std=d_in**-0.5)
                layer.register_parameter(f"{name}_A", a)
                layer.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(d_out, r)))
            self.layers.append(layer)

    def projector(self, k: int):
        layer = self.layers[k]

        def proj(name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            y = module(x)
            a, b = getattr(layer, f"{name}_A"), getattr(layer, f"{name}_B")
            return y + ((x.to(a.dtype) @ a.t()) @ b.t()).to(y.dtype)

        return proj


# dtype of the residual stream through the recurrence (None: the model's own dtype, the behaviour before; kept for
# the comparison in tests/test_hostile_numerics.py and evals/bf16_agreement.py)
RECURRENCE_DTYPE: Optional[torch.dtype] = torch.float32

# hook(adapter, step, u, h): see OuroborosAdapter.register_step_hook
StepHook = Callable[["OuroborosAdapter", int, torch.Tensor, torch.Tensor], None]


class OuroborosAdapter(nn.Module):
    """All Ouroboros state for one adapter. Trainable parameters are fp32 whatever the base dtype; the SVD
    bases are frozen fp32 buffers (saved with the adapter: the layers they come from are dropped)."""

    def __init__(self, spec: OuroborosSpec, hidden_size: int, shapes: dict[str, tuple[int, int]], rms_eps: float, device=None):
        super().__init__()
        self.spec = spec
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()
        targets = spec.targets
        with torch.device(device or "cpu"):
            self.bases = Bases({name: shapes[name] for name in targets}, spec.r)
            if spec.modulation == "controller":
                self.controller = Controller(hidden_size, targets, spec.r, spec.rows, spec.controller_hidden, spec.controller_state_dim)
            else:
                self.static = StaticModulation(targets, spec.r, spec.rows)
            self.norms = StepNorms(spec.rows, hidden_size, rms_eps)
            if spec.use_gate:
                self.gate = Gate(hidden_size, spec.gate_bias)
            if spec.coda_lora_r:
                self.coda_lora = CodaLoRA(spec.num_coda_layers, shapes, spec.coda_lora_r)

    @torch.no_grad()
    def init_bases(self, recurrent: dict[str, torch.Tensor], removed: list[dict[str, torch.Tensor]]) -> None:
        """recurrent[name] / removed[j][name]: the weight [d_out, d_in] of each target projection."""
        for name in self.spec.targets:
            a, b = svd_bases([layer[name] - recurrent[name] for layer in removed], self.spec.r)
            self.bases.set_pair(name, a, b)

    def modulation(self, h: torch.Tensor, step: int, valid: Optional[torch.Tensor], state: Optional[PoolState]) -> dict:
        if self.spec.modulation == "static":
            return self.static(step)
        return self.controller(pool(h, self.spec.controller_pooling, valid, step, state), step)

    def projector(self, m: dict):
        scale = self.spec.scale

        def proj(name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if name not in m:
                return module(x)
            a, b = self.bases.pair(name)
            return modulated_linear(module, x, a, b, m[name], scale)

        return proj

    def coda_projector(self, k: int):
        """Projection function for coda layer k (None = the plain frozen layer)."""
        return self.coda_lora.projector(k) if self.spec.coda_lora_r else None

    def register_step_hook(self, hook: "StepHook") -> RemovableHandle:
        """Call `hook(adapter, step, u, h)` at every recurrence step, after the recurrent layer produced u [B, T, d]
        from h [B, T, d] and before the step norm reads u. The hook may change the adapter's parameters (under
        `torch.no_grad()`): the norm of this step then uses the new values. Returns a handle; `handle.remove()`
        detaches the hook. Used by data-driven inits such as `calibrate_step_norms`; never called by training."""
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle

    def update(self, u: torch.Tensor, h: torch.Tensor, step: int) -> torch.Tensor:
        for hook in list(self._step_hooks.values()):
            hook(self, step, u, h)
        n = self.norms(u, step)
        if not self.spec.use_gate:
            return n.to(h.dtype)
        g = self.gate(n, h)
        return (g * n + (1.0 - g) * h.to(n.dtype)).to(h.dtype)


def positions_from_mask(valid: Optional[torch.Tensor], batch: int, q_len: int, past: int, device) -> torch.Tensor:
    """Position ids [B, T]: count of valid tokens before each position (left padding aware)."""
    if valid is None:
        return torch.arange(past, past + q_len, device=device).unsqueeze(0).expand(batch, -1)
    pos = torch.cumsum(valid.to(torch.long), dim=-1) - 1
    return pos.clamp_min(0)[:, -q_len:]


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
    """Prelude -> N modulated recurrent steps -> Coda -> final norm. Returns the last hidden state [B, T, d].

    cache: a KV cache with update(k, v, slot) and get_seq_length(slot); slot layout is `plan`'s
    (prelude layers, then one slot per step, then coda layers). With causal_mean pooling the cache also carries
    the Controller's prefix sums as `cache.ouroboros_pool` (a PoolState, created here when absent), which the host
    must reorder, expand and select with the cache's batch rows. attention_mask: [B, past + T], 1 = token.
    """
    spec = adapter.spec
    layers = backbone.layers(decoder)
    batch, q_len, _ = inputs_embeds.shape
    device = inputs_embeds.device
    past = cache.get_seq_length(0) if cache is not None else 0
    if spec.controller_pooling == "sequence_mean" and spec.modulation == "controller" and past > 0:
        raise ValueError(
            "controller_pooling='sequence_mean' reads the whole sequence, future tokens included, so it cannot decode "
            "token by token; use 'causal_mean' or 'token'"
        )
    valid = attention_mask.to(torch.bool) if attention_mask is not None else None
    if valid is not None and valid.shape[-1] != past + q_len:
        raise ValueError(f"attention_mask covers {valid.shape[-1]} positions, expected past ({past}) + new ({q_len})")
    if position_ids is None:
        position_ids = positions_from_mask(valid, batch, q_len, past, device)
    implementation = backbone.attention_implementation(decoder)
    mask = build_attention_mask(valid, batch, q_len, past, inputs_embeds.dtype, device, implementation)
    cos, sin = backbone.rotary(decoder, inputs_embeds, position_ids)
    dropout = backbone.attention_dropout(decoder) if decoder.training else 0.0

    def inputs(slot: int) -> AttentionInputs:
        return AttentionInputs(cos, sin, mask, implementation, cache, slot, dropout)

    def plain(layer, slot, h, proj=None):
        if proj is None:
            return call_layer(backbone.run_layer, layer, h, inputs(slot))
        return call_layer(backbone.run_layer, layer, h, inputs(slot), proj)

    h = inputs_embeds
    for i, index in enumerate(plan.prelude):
        h = plain(layers[index], plan.prelude_slot(i), h)

    step_valid = valid[:, -q_len:] if valid is not None else None
    pool_state = None
    if cache is not None and spec.modulation == "controller" and spec.controller_pooling == "causal_mean":
        # the host's cache carries the prefix sums as `ouroboros_pool` (and keeps them in step with its batch rows)
        pool_state = getattr(cache, "ouroboros_pool", None)
        if pool_state is None:
            pool_state = PoolState()
            cache.ouroboros_pool = pool_state
        if past == 0:
            pool_state.clear()
    recurrent = layers[plan.recurrent]

    def step(t: int, h: torch.Tensor) -> torch.Tensor:
        m = adapter.modulation(h, t, step_valid, pool_state)
        u = call_layer(backbone.run_layer, recurrent, h, inputs(plan.step_slot(t)), adapter.projector(m))
        return adapter.update(u, h, t)

    use_checkpoint = gradient_checkpointing and torch.is_grad_enabled() and cache is None
    # The recurrence keeps its residual stream in fp32 whatever the model's dtype: one layer applied N times
    # accumulates rounding (bf16) and its sums can overflow (fp16); the frozen matmuls still run in the weights' dtype.
    stream_dtype = h.dtype
    h = h.to(RECURRENCE_DTYPE or stream_dtype)
    for t in range(plan.num_steps):
        h = checkpoint(partial(step, t), h, use_reentrant=False) if use_checkpoint else step(t, h)
    h = h.to(stream_dtype)

    for k, index in enumerate(plan.coda):
        proj = adapter.coda_projector(k)
        if use_checkpoint:
            h = checkpoint(partial(plain, layers[index], plan.coda_slot(k), proj=proj), h, use_reentrant=False)
        else:
            h = plain(layers[index], plan.coda_slot(k), h, proj)
    return backbone.final_norm(decoder, h)
