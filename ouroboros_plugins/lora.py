"""Frozen SVD LoRA bases and the modulated projection  y = W x + b + s * B (m * (A x))."""

from __future__ import annotations

from typing import Optional, Sequence

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
    """Base projection plus the modulated low-rank path. `m` is [..., r] broadcastable to x's leading dims,
    or None (no modulation: exactly the base projection). The low-rank path runs in fp32; the base projection in
    its weight's dtype; the sum comes back in x's dtype (fp32 inside the recurrence, whatever the model's dtype)."""
    y = base(x if x.dtype == base.weight.dtype else x.to(base.weight.dtype))
    if m is None:
        return y.to(x.dtype)
    z = x.to(a.dtype) @ a.t()  # [..., r]
    delta = (z * m) @ b.t()  # [..., d_out]
    return (y.to(delta.dtype) + scale * delta).to(x.dtype)
