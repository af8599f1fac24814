"""The Ouroboros block: modulation source, per-step norms, gate, and the Prelude -> N steps -> Coda loop, written
once for every host (`recur`); a host supplies its layers, caches and pooling through the `Host` interface.

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
from typing import Callable, Optional, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from .config import OuroborosSpec
from .controller import Controller, StaticModulation
from .lora import Bases, LowRank, LowRankPath, svd_bases


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

    def lowrank(self, k: int, reduce: Optional[Callable] = None) -> LowRank:
        """Coda layer k's LoRA on every projection: scale 1, no modulation."""
        layer = self.layers[k]
        names = [n[:-2] for n, _ in layer.named_parameters() if n.endswith("_A")]
        paths = {name: LowRankPath(getattr(layer, f"{name}_A"), getattr(layer, f"{name}_B"), None) for name in names}
        return LowRank(paths, reduce=reduce)


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
                self.controller = Controller(hidden_size, targets, spec.r, spec.rows, spec.controller_hidden,
                                             spec.controller_state_dim, spec.controller_head)
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

    def modulation(self, pooled: torch.Tensor, step: int) -> dict:
        """name -> m [..., r] for step `step`; `pooled` is what the Controller reads (the host pools h_t)."""
        if self.spec.modulation == "static":
            return self.static(step)
        return self.controller(pooled, step)

    def lowrank(self, m: dict, reduce: Optional[Callable] = None) -> LowRank:
        """The recurrent layer's low-rank paths under modulation m: scale alpha / r, A of a group stacked once."""
        paths = {name: LowRankPath(*self.bases.pair(name), m[name]) for name in m}
        return LowRank(paths, self.spec.scale, stack=self.bases.stacked_a, reduce=reduce)

    def coda_lowrank(self, k: int, reduce: Optional[Callable] = None) -> Optional[LowRank]:
        """Coda layer k's LoRA (None = the plain frozen layer)."""
        return self.coda_lora.lowrank(k, reduce) if self.spec.coda_lora_r else None

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


    def step(self, host: "Host", t: int, h: torch.Tensor) -> torch.Tensor:
        """One recurrence step on `host`: h_t [.., d] -> h_{t+1}."""
        m = self.modulation(host.pooled(t, h) if self.spec.modulation == "controller" else None, t)
        u = host.recurrent(t, h, self.lowrank(m, host.reduce))
        return self.update(u, h, t)


class Host(Protocol):
    """What a framework supplies to run the recurrence on its own modules and caches. Hidden states are [..., d]
    (the transformers path: [B, T, d]; vLLM: its flattened [tokens, d])."""

    num_steps: int
    num_coda: int
    reduce: Optional[Callable]  # LowRank's reduce(name, z): tensor-parallel hosts sum row-parallel z; else None

    def prelude(self, h: torch.Tensor) -> torch.Tensor: ...  # every prelude layer, plain
    def pooled(self, t: int, h: torch.Tensor) -> torch.Tensor: ...  # what step t's Controller reads, fp32
    def recurrent(self, t: int, h: torch.Tensor, lowrank: LowRank) -> torch.Tensor: ...  # u_t, through step t's cache slot
    def coda(self, k: int, h: torch.Tensor, lowrank: Optional[LowRank]) -> torch.Tensor: ...
    def final_norm(self, h: torch.Tensor) -> torch.Tensor: ...


def recur(adapter: OuroborosAdapter, host: Host, h: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """Prelude -> N modulated recurrent steps -> Coda -> final norm, on any host. h: the embeddings.

    The recurrence keeps its residual stream in fp32 whatever the model's dtype (`RECURRENCE_DTYPE`): one layer
    applied N times accumulates rounding (bf16) and its sums can overflow (fp16); the frozen matmuls still run in
    the weights' dtype. checkpointing: recompute each step and coda layer in backward (training only)."""
    h = host.prelude(h)
    stream_dtype = h.dtype
    h = h.to(RECURRENCE_DTYPE or stream_dtype)
    for t in range(host.num_steps):
        if checkpointing:
            h = checkpoint(partial(adapter.step, host, t), h, use_reentrant=False)
        else:
            h = adapter.step(host, t, h)
    h = h.to(stream_dtype)
    for k in range(host.num_coda):
        lowrank = adapter.coda_lowrank(k, host.reduce)
        h = checkpoint(partial(host.coda, k, lowrank=lowrank), h, use_reentrant=False) if checkpointing else host.coda(k, h, lowrank)
    return host.final_norm(h)
