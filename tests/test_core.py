"""The framework-neutral core on its own: bases, modulated projection, gate, pooling, Controller, spec."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ouroboros_plugins import Controller, Gate, OuroborosSpec, PoolState, StaticModulation, StepNorms, modulated_linear, pool, svd_bases


def test_zero_modulation_is_exactly_the_base_projection():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    a, b = svd_bases([torch.randn(40, 48)], r=8)
    x = torch.randn(3, 5, 48)
    assert torch.equal(modulated_linear(base, x, a, b, torch.zeros(3, 5, 8), 2.0), base(x))
    assert torch.equal(modulated_linear(base, x, a, b, None, 2.0), base(x))
    # and a non-zero modulation really changes it, by exactly s * B (m * A x)
    m = torch.randn(3, 5, 8)
    expected = base(x) + 2.0 * ((x @ a.t()) * m) @ b.t()
    torch.testing.assert_close(modulated_linear(base, x, a, b, m, 2.0), expected)


def test_svd_bases_are_orthonormal_and_best_rank_r():
    torch.manual_seed(0)
    rec = torch.randn(64, 96)
    removed = [torch.randn(64, 96) for _ in range(3)]
    r = 10
    a, b = svd_bases([w - rec for w in removed], r)
    assert a.shape == (r, 96) and b.shape == (64, r)
    torch.testing.assert_close(a @ a.t(), torch.eye(r), atol=1e-5, rtol=0)
    mean = torch.stack([w - rec for w in removed]).mean(0)
    s = torch.linalg.svdvals(mean)
    # Eckart-Young: the residual of the best rank-r approximation has Frobenius norm sqrt(sum of the tail s^2)
    err = torch.linalg.norm(mean - b @ a)
    assert err.item() == pytest.approx(s[r:].pow(2).sum().sqrt().item(), rel=1e-4)
    # B = U_r diag(s): its column norms are the leading singular values
    torch.testing.assert_close(b.norm(dim=0), s[:r], rtol=1e-4, atol=1e-4)


def test_svd_bases_computed_in_fp32_from_bf16_weights():
    torch.manual_seed(0)
    w = torch.randn(32, 40).to(torch.bfloat16)
    a, b = svd_bases([w], 4)
    assert a.dtype == torch.float32 and b.dtype == torch.float32


@pytest.mark.parametrize("retention", [0.88, 0.5, 0.97])
def test_gate_retention_at_init_for_any_input(retention):
    spec = OuroborosSpec(gate_retention=retention)
    gate = Gate(32, spec.gate_bias)
    n, h = torch.randn(4, 7, 32) * 10, torch.randn(4, 7, 32) * 3
    torch.testing.assert_close(1 - gate(n, h), torch.full((4, 7, 32), retention), atol=1e-6, rtol=0)
    if retention == 0.88:
        assert spec.gate_bias == pytest.approx(-1.992, abs=5e-4)


def test_step_norms_have_a_row_per_step():
    norms = StepNorms(3, 16, 1e-6)
    with torch.no_grad():
        norms.weight[1].fill_(2.0)
    u = torch.randn(2, 4, 16)
    out0, out1 = norms(u, 0), norms(u, 1)
    torch.testing.assert_close(out1, 2 * out0)
    torch.testing.assert_close(out0.pow(2).mean(-1), torch.ones(2, 4), rtol=1e-4, atol=1e-4)


def test_causal_mean_pools_prefix_and_skips_padding():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    out = pool(h, "causal_mean", valid, 0)
    torch.testing.assert_close(out[0, 3], h[0, :4].mean(0))
    torch.testing.assert_close(out[1, 3], h[1, 2:4].mean(0))
    torch.testing.assert_close(out[1, 4], h[1, 2:5].mean(0))
    assert torch.isfinite(out).all()
    tok = pool(h, "token", valid, 0)
    assert torch.equal(tok, h)
    seq = pool(h, "sequence_mean", valid, 0)
    torch.testing.assert_close(seq[1, 0], h[1, 2:].mean(0))


def test_causal_mean_state_carries_across_calls():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8)
    full = pool(h, "causal_mean", None, 0)
    state = PoolState()
    parts = [pool(h[:, :5], "causal_mean", None, 0, state)]
    for i in range(5, 9):
        parts.append(pool(h[:, i : i + 1], "causal_mean", None, 0, state))
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_controller_starts_at_zero_and_static_too():
    ctrl = Controller(32, ("q_proj", "v_proj"), r=4, rows=3, width=16, state_dim=24)
    out = ctrl(torch.randn(2, 5, 32), 1)
    assert set(out) == {"q_proj", "v_proj"}
    assert all(v.shape == (2, 5, 4) and torch.count_nonzero(v) == 0 for v in out.values())
    static = StaticModulation(("q_proj",), r=4, rows=3)
    assert torch.count_nonzero(static(2)["q_proj"]) == 0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(r=0), "r must"),
        (dict(gate_retention=1.0), "gate_retention"),
        (dict(gate_retention=0.0), "gate_retention"),
        (dict(target_modules=["q_proj", "wq"]), "target_modules"),
        (dict(controller_pooling="max"), "controller_pooling"),
        (dict(modulation="dynamic"), "modulation"),
        (dict(num_prelude_layers=-1), "num_prelude_layers"),
        (dict(max_steps=2, num_steps=4), "max_steps"),
    ],
)
def test_spec_rejects_bad_fields(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        OuroborosSpec(**kwargs)


SHAPES = {n: (128, 128) for n in ("q_proj", "o_proj")} | {n: (64, 128) for n in ("k_proj", "v_proj")} | {
    "gate_proj": (256, 128), "up_proj": (256, 128), "down_proj": (128, 256)}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_prelude_layers=3, num_coda_layers=3), "must be < the model's 6 layers"),
        (dict(num_prelude_layers=2, num_coda_layers=3), "at least one removed layer"),
        (dict(num_prelude_layers=2, num_coda_layers=2, recurrent_layer_index=1), "inside the prelude or coda"),
        (dict(num_prelude_layers=2, num_coda_layers=2, recurrent_layer_index=4), "inside the prelude or coda"),
        (dict(num_prelude_layers=1, num_coda_layers=1, r=65), "r=65 is larger"),
    ],
)
def test_resolve_rejects_plans_that_do_not_fit(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        OuroborosSpec(**kwargs).resolve(6, SHAPES)


def test_plan_slots():
    plan = OuroborosSpec(num_prelude_layers=2, num_coda_layers=1, num_steps=5).resolve(8, SHAPES)
    assert plan.prelude == (0, 1) and plan.coda == (7,)
    assert plan.recurrent == 4 and plan.removed == (2, 3, 5, 6)
    assert plan.num_slots == 2 + 5 + 1
    assert [plan.step_slot(t) for t in range(5)] == [2, 3, 4, 5, 6] and plan.coda_slot(0) == 7
    assert math.isclose(OuroborosSpec(r=8, lora_alpha=16).scale, 2.0)


# ----------------------------------------------------------------------------------------------------
# one recurrence for every host: LowRank (the one "projection + low-rank delta") and recur() on a Host
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("q_proj",), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")])
@pytest.mark.parametrize("modulated", [True, False])
def test_lowrank_group_equals_each_projection_on_its_own(names, modulated):
    """The A of projections that share an input run as one matmul; each output gets exactly s * B (m * A x)."""
    from ouroboros_plugins import Bases, LowRank, LowRankPath

    torch.manual_seed(0)
    bases = Bases({n: SHAPES[n] for n in names}, r=8)
    for n in names:
        d_out, d_in = SHAPES[n]
        bases.set_pair(n, torch.randn(8, d_in), torch.randn(d_out, 8))
    x = torch.randn(2, 5, 128)
    m = {n: torch.randn(2, 5, 8) if modulated else None for n in names}
    bases_out = {n: torch.randn(2, 5, SHAPES[n][0]) for n in names}
    lowrank = LowRank({n: LowRankPath(*bases.pair(n), m[n]) for n in names}, 0.5, stack=bases.stacked_a)
    got = lowrank.add(names, x, [bases_out[n] for n in names])
    for n, y in zip(names, got):
        a, b = bases.pair(n)
        z = x @ a.t()
        expected = bases_out[n] + 0.5 * ((z if m[n] is None else z * m[n]) @ b.t())
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # a projection without a path is passed through untouched
    partial = LowRank({names[0]: LowRankPath(*bases.pair(names[0]), m[names[0]])}, 0.5)
    outs = [bases_out[n] for n in names]
    assert all(y is o for y, o in zip(partial.add(names, x, outs)[1:], outs[1:]))


def test_stacked_bases_follow_in_place_changes():
    """The stack of frozen A is kept between calls, but never outlives a change to a base (load, edit)."""
    from ouroboros_plugins import Bases

    bases = Bases({n: SHAPES[n] for n in ("q_proj", "k_proj")}, r=4)
    first = bases.stacked_a(("q_proj", "k_proj"))
    assert bases.stacked_a(("q_proj", "k_proj")) is first
    bases.q_proj_A.add_(1.0)
    again = bases.stacked_a(("q_proj", "k_proj"))
    assert torch.equal(again[:4], bases.q_proj_A) and torch.equal(again[4:], bases.k_proj_A)


def test_controller_heads_as_one_matmul_equal_each_head():
    torch.manual_seed(0)
    ctrl = Controller(32, ("q_proj", "v_proj", "down_proj"), r=4, rows=3, width=16, state_dim=24)
    for head in ctrl.heads.values():
        nn.init.normal_(head.weight)
    pooled = torch.randn(2, 5, 32)
    out = ctrl(pooled, 1)
    state = ctrl.state_proj(pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6))
    z = ctrl.mlp(torch.cat([state, ctrl.step_embed.weight[1].expand(2, 5, -1)], dim=-1))
    for name, head in ctrl.heads.items():
        torch.testing.assert_close(out[name], head(z))


class RecordingHost:
    """A `Host` on plain tensors [T, d]: a 'layer' is h + x W^T with a LowRank on the one projection 'q_proj'."""

    def __init__(self, steps: int, coda: int, d: int = 16, reduce=None):
        self.num_steps, self.num_coda, self.reduce = steps, coda, reduce
        torch.manual_seed(1)
        self.w = torch.randn(d, d) * 0.1
        self.calls: list = []

    def _layer(self, h, lowrank):
        (y,) = [h @ self.w.t()] if lowrank is None else lowrank.add(("q_proj",), h, [h @ self.w.t()])
        return h + y

    def prelude(self, h):
        self.calls.append(("prelude",))
        return h * 2

    def pooled(self, t, h):
        self.calls.append(("pooled", t))
        return h.float()

    def recurrent(self, t, h, lowrank):
        self.calls.append(("recurrent", t, lowrank.reduce is self.reduce))
        return self._layer(h, lowrank)

    def coda(self, k, h, lowrank=None):
        self.calls.append(("coda", k, lowrank is not None and lowrank.reduce is self.reduce))
        return self._layer(h, lowrank)

    def final_norm(self, h):
        self.calls.append(("final_norm",))
        return h


@pytest.mark.parametrize("modulation", ["controller", "static"])
def test_recur_drives_any_host_in_order_and_hands_it_its_reduce(modulation):
    """recur(): prelude, then for each step the host's pooling (Controller only) and recurrent layer, then each coda
    layer with its LoRA, then the final norm; the host's tensor-parallel reduce reaches every LowRank (the
    recurrent layer's and the coda LoRA's)."""
    from ouroboros_plugins import OuroborosAdapter, recur

    spec = OuroborosSpec(num_prelude_layers=1, num_coda_layers=2, num_steps=3, r=4, modulation=modulation,
                         target_modules=["q_proj"], coda_lora_r=2)
    adapter = OuroborosAdapter(spec, 16, {"q_proj": (16, 16)}, 1e-6)
    reduced = []

    def reduce(name, z):
        reduced.append(name)
        return z

    host = RecordingHost(3, 2, reduce=reduce)
    out = recur(adapter, host, torch.randn(5, 16))
    steps = [c for c in host.calls if c[0] in ("pooled", "recurrent")]
    expected_steps = [c for t in range(3) for c in ((("pooled", t),) if modulation == "controller" else ()) + (("recurrent", t, True),)]
    assert host.calls[0] == ("prelude",) and steps == expected_steps
    assert host.calls[-3:] == [("coda", 0, True), ("coda", 1, True), ("final_norm",)]
    assert reduced.count("q_proj") == 3 + 2 and out.shape == (5, 16)


def test_paper_controller_head_reads_the_raw_stream_through_silu():
    """controller_head='paper': s = SiLU(Linear(pooled)) with no RMS normalisation, so scaling the pooled state
    changes the modulation; the default normalises it away (scale-invariant input)."""
    torch.manual_seed(0)
    kw = dict(hidden_size=32, targets=("q_proj",), r=4, rows=2, width=16, state_dim=24)
    paper, ours = Controller(head="paper", **kw), Controller(**kw)
    ours.load_state_dict(paper.state_dict())
    for c in (paper, ours):
        nn.init.normal_(c.heads["q_proj"].weight)
    pooled = torch.randn(2, 3, 32)
    z = paper.mlp(torch.cat([nn.functional.silu(paper.state_proj(pooled)), paper.step_embed.weight[0].expand(2, 3, -1)], -1))
    torch.testing.assert_close(paper(pooled, 0)["q_proj"], paper.heads["q_proj"](z))
    torch.testing.assert_close(ours(pooled * 5, 0)["q_proj"], ours(pooled, 0)["q_proj"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(paper(pooled * 5, 0)["q_proj"], paper(pooled, 0)["q_proj"])
    with pytest.raises(ValueError, match="controller_head must be one of"):
        OuroborosSpec(controller_head="silu")
