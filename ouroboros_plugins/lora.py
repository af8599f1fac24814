"""Frozen SVD LoRA bases and the low-rank paths added to a layer's projections:  y = W x + b + s * B (m * (A x)).

`LowRank` is the one place where "projection + low-rank delta" is computed, for every host: the transformers path
hands it each projection's output, vLLM's path the slices of its fused q/k/v and gate/up matmuls."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn


@torch.no_grad()
def svd_bases(residuals: Sequence[torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r bases of the mean residual R = mean_j(W_j - W_rec), each residual shaped [d_out, d_in].

    Returns A = V_r^T  [r, d_in]  (orthonormal rows) and B = U_r diag(s_1..s_r)  [d_out, r], so that
    B @ A is the best rank-r approximation of R. Computed in fp32 whatever the weights' dtype.
    """
    if not residuals:
        raise ValueError("svd_bases needs at least one residual matrix")
    mean = torch.stack([res.detach().to(torch.float32) for res in residuals]).mean(0)
    if mean.is_meta:  # shape-only model (parameter counting): no numbers to decompose
        d_out, d_in = mean.shape
        return torch.empty(r, d_in, device="meta"), torch.empty(d_out, r, device="meta")
    u, s, vh = torch.linalg.svd(mean, full_matrices=False)
    return vh[:r].contiguous(), (u[:, :r] * s[:r]).contiguous()


class Bases(nn.Module):
    """The frozen A/B pair of every target projection, as persistent buffers `<target>_A`, `<target>_B`."""

    def __init__(self, shapes: dict[str, tuple[int, int]], r: int, device=None):
        super().__init__()
        self.targets = tuple(shapes)
        for name, (d_out, d_in) in shapes.items():
            self.register_buffer(f"{name}_A", torch.zeros(r, d_in, device=device))
            self.register_buffer(f"{name}_B", torch.zeros(d_out, r, device=device))

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_A"), getattr(self, f"{name}_B")

    def stacked_a(self, names: tuple) -> torch.Tensor:
        """The A of `names` stacked [sum r, d_in] (projections sharing an input run their A as one matmul). The
        bases are frozen buffers, so the stack is kept until one of them changes (load, `to()`, in-place edit)."""
        parts = [getattr(self, f"{name}_A") for name in names]
        if len(parts) == 1:
            return parts[0]
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in parts)
        cache = self.__dict__.setdefault("_stacked", {})
        hit = cache.get(names)
        if hit is None or hit[0] != key:
            hit = (key, torch.cat(parts, dim=0))
            cache[names] = hit
        return hit[1]

    @torch.no_grad()
    def set_pair(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        old_a, old_b = self.pair(name)
        if old_a.is_meta or a.is_meta:
            setattr(self, f"{name}_A", a.to(torch.float32))
            setattr(self, f"{name}_B", b.to(torch.float32))
            return
        old_a.copy_(a)
        old_b.copy_(b)


def modulated_linear(
    base: nn.Linear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """Base projection plus the modulated low-rank path, for one projection on its own (`LowRank` does the work).
    `m` is [..., r] broadcastable to x's leading dims, or None (no modulation: exactly the base projection). The
    low-rank path runs in fp32, the base projection in its weight's dtype; the sum comes back in x's dtype."""
    y = base(x if x.dtype == base.weight.dtype else x.to(base.weight.dtype)).to(x.dtype)
    if m is None:
        return y
    return LowRank({"proj": LowRankPath(a, b, m)}, scale).add(("proj",), x, [y])[0]


class LowRankPath(NamedTuple):
    """One projection's low-rank path: A [r, d_in], B [d_out, r], modulation m [..., r] (None = unmodulated)."""

    a: torch.Tensor
    b: torch.Tensor
    m: Optional[torch.Tensor]


class LowRank:
    """The low-rank paths of one layer application, added to its projections' outputs by `add`.

    paths: projection name -> LowRankPath (projections without one are left as they are). scale: s. stack(names): the A of
    `names` stacked [sum r, d_in] (default: concatenated on each call; `Bases.stacked_a` keeps the frozen stack).
    reduce(name, z): applied to z = x A^T before m and B; a tensor-parallel host sums z over its group there for
    projections whose input is sharded (row-parallel). All low-rank arithmetic is fp32; outputs keep their dtype.
    """

    def __init__(self, paths: dict, scale: float = 1.0, stack: Optional[Callable] = None, reduce: Optional[Callable] = None):
        self.paths = paths
        self.scale = scale
        self.stack = stack
        self.reduce = reduce

    def add(self, names: tuple, x: torch.Tensor, outputs: list) -> list:
        """outputs[i] = names[i]'s projection of x (its base output, [..., d_out_i]); returns them with
        s * B (m * A x) added to each that has a path. The A of all of them run as one matmul on x."""
        live = tuple(name for name in names if name in self.paths)
        if not live:
            return outputs
        first = self.paths[live[0]].a
        if len(live) == 1:
            a = first
        elif self.stack is not None:
            a = self.stack(live)
        else:
            a = torch.cat([self.paths[name].a for name in live], dim=0)
        z_all = x.to(first.dtype) @ a.t()  # [..., sum r]
        zs = z_all.split([self.paths[name].a.shape[0] for name in live], dim=-1) if len(live) > 1 else (z_all,)
        outputs = list(outputs)
        for name, z in zip(live, zs):
            path = self.paths[name]
            if self.reduce is not None:
                z = self.reduce(name, z)
            delta = (z if path.m is None else z * path.m) @ path.b.t()  # [..., d_out]
            i = names.index(name)
            y = outputs[i]
            outputs[i] = (y.to(delta.dtype) + self.scale * delta).to(y.dtype)
        return outputs
