"""Where the per-step modulation vectors come from: the input-conditioned Controller, or a static table."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class PoolState:
    """Running prefix sums for `causal_mean` pooling, one (sum, count) pair per recurrence step, so a
    decode step pools over every earlier token without revisiting them. Lives beside the KV cache and must follow
    it: whatever a host does to the cache's batch rows (beam reordering, expansion, selection) it does here too."""

    def __init__(self):
        self.sums: dict[int, torch.Tensor] = {}  # step -> [B, d] fp32
        self.counts: dict[int, torch.Tensor] = {}  # step -> [B, 1] fp32

    def clear(self) -> None:
        """Forget every prefix (a new sequence starts)."""
        self.sums.clear()
        self.counts.clear()

    def _map_rows(self, fn) -> None:
        self.sums = {step: fn(t) for step, t in self.sums.items()}
        self.counts = {step: fn(t) for step, t in self.counts.items()}

    def select(self, rows: torch.Tensor) -> None:
        """Keep / reorder batch rows: row i becomes old row rows[i] (beam search's reordering, a batch subset)."""
        self._map_rows(lambda t: t[rows.to(t.device)])

    def repeat_interleave(self, repeats: int) -> None:
        """Each batch row repeated `repeats` times in place (expanding a batch to beams)."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))


def pool(
    h: torch.Tensor,
    mode: str,
    valid: Optional[torch.Tensor],
    step: int,
    state: Optional[PoolState] = None,
) -> torch.Tensor:
    """What the Controller reads at every position, [B, T, d] fp32.

    valid: [B, T] bool (False = padding) or None. `causal_mean` averages valid positions <= i (carrying
    `state` across calls when given); `token` is position i itself; `sequence_mean` averages the whole
    (valid) sequence, future included.
    """
    hf = h.to(torch.float32)
    if mode == "token":
        return hf
    w = valid.to(torch.float32).unsqueeze(-1) if valid is not None else torch.ones_like(hf[..., :1])
    if mode == "sequence_mean":
        total = (hf * w).sum(1, keepdim=True)
        return (total / w.sum(1, keepdim=True).clamp_min(1.0)).expand_as(hf)
    if mode != "causal_mean":
        raise ValueError(f"unknown pooling {mode!r}")
    sums = torch.cumsum(hf * w, dim=1)  # [B, T, d]
    counts = torch.cumsum(w, dim=1)  # [B, T, 1]
    if state is not None:
        if step in state.sums:
            prev_sum, prev_count = state.sums[step], state.counts[step]
            if prev_sum.shape[0] != hf.shape[0]:
                raise ValueError(
                    "the causal_mean prefix state does not match this batch (beam search or cache reordering is not "
                    "supported with causal_mean pooling; use controller_pooling='token' for that)"
                )
            sums = sums + prev_sum.unsqueeze(1)
            counts = counts + prev_count.unsqueeze(1)
        state.sums[step] = sums[:, -1].detach()
        state.counts[step] = counts[:, -1].detach()
    return sums / counts.clamp_min(1.0)


class Controller(nn.Module):
    """Reads the pooled hidden state and a step embedding; emits one r-vector per target projection.

    pooled [B,T,d] -> rms-normalise -> state_proj [B,T,S] ; step_embed[t] [W] broadcast
    (head="paper": pooled -> state_proj -> SiLU, on the raw stream, as the paper writes s = SiLU(Linear(h)))
    -> concat [B,T,S+W] -> mlp -> [B,T,W] -> heads[p] -> [B,T,r] (zero-initialised: modulation starts at 0)
    """

    def __init__(self, hidden_size: int, targets: tuple, r: int, rows: int, width: int = 128, state_dim: int = 256,
                 head: str = "normalised"):
        super().__init__()
        self.head = head
        self.state_proj = nn.Linear(hidden_size, state_dim)
        self.step_embed = nn.Embedding(rows, width)
        self.mlp = nn.Sequential(nn.Linear(state_dim + width, state_dim), nn.SiLU(), nn.Linear(state_dim, width), nn.SiLU())
        self.r = r
        self.heads = nn.ModuleDict({name: nn.Linear(width, r, bias=False) for name in targets})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)

    def forward(self, pooled: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.head == "paper":
            state = nn.functional.silu(self.state_proj(pooled.to(self.state_proj.weight.dtype)))  # [B, T, S]
        else:
            state = self.state_proj(_rms_normalise(pooled).to(self.state_proj.weight.dtype))  # [B, T, S]; fp32 pooling, own dtype after
        emb = self.step_embed.weight[step].expand(*state.shape[:-1], -1)  # [B, T, W]
        z = self.mlp(torch.cat([state, emb], dim=-1))  # [B, T, W]
        # the heads as one matmul: [B, T, W] x [W, heads * r] -> one [B, T, r] view per head
        weight = torch.cat([head.weight for head in self.heads.values()], dim=0)
        return dict(zip(self.heads, (z @ weight.t()).split(self.r, dim=-1)))


class StaticModulation(nn.Module):
    """The paper's static baseline: one learned r-vector per (step, target), zero-initialised."""

    def __init__(self, targets: tuple, r: int, rows: int):
        super().__init__()
        for name in targets:
            self.register_parameter(name, nn.Parameter(torch.zeros(rows, r)))
        self.targets = tuple(targets)

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[step] for name in self.targets}
