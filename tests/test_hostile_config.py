"""Hostile configuration values (issue 20, "Configs"): every numeric field finite and in its stated range, booleans
booleans. Each case must raise a ValueError naming the field, before the model is touched."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import ouro_config, tiny_model
from ouroboros_plugins import OuroborosSpec

NAN, INF = float("nan"), float("inf")

# (field values, the field the message must name)
CASES = {
    "num_steps 10**5 (hung a forward)": (dict(num_steps=10**5), "num_steps must be an integer in 1..1024"),
    "num_steps 10**8 (died in the allocator)": (dict(num_steps=10**8), "num_steps"),
    "max_steps 10**5": (dict(max_steps=10**5), "max_steps must be an integer in 1..1024"),
    "num_steps float": (dict(num_steps=4.0), "num_steps"),
    "num_steps True": (dict(num_steps=True), "num_steps"),
    "gate_retention 1e-300 (ZeroDivisionError)": (dict(gate_retention=1e-300), "gate_retention"),
    "gate_retention 1 - 1e-300 (rounds to 1)": (dict(gate_retention=1 - 1e-300), "gate_retention"),
    "gate_retention nan": (dict(gate_retention=NAN), "gate_retention must be a finite number"),
    "gate_retention inf": (dict(gate_retention=INF), "gate_retention must be a finite number"),
    "gate_retention True": (dict(gate_retention=True), "gate_retention"),
    "gate_retention string": (dict(gate_retention="0.88"), "gate_retention"),
    "lora_alpha inf (NaN logits)": (dict(lora_alpha=INF), "lora_alpha must be a finite number"),
    "lora_alpha nan": (dict(lora_alpha=NAN), "lora_alpha"),
    "lora_alpha 0": (dict(lora_alpha=0), "lora_alpha must be a positive finite number"),
    "lora_alpha negative": (dict(lora_alpha=-16), "lora_alpha"),
    "use_gate 'no' (built a gate)": (dict(use_gate="no"), "use_gate must be True or False"),
    "use_gate None (meant no gate)": (dict(use_gate=None), "use_gate"),
    "use_gate 1": (dict(use_gate=1), "use_gate"),
    "controller_hidden 10**9": (dict(controller_hidden=10**9), "controller_hidden must be an integer in 1..65536"),
    "controller_state_dim 0": (dict(controller_state_dim=0), "controller_state_dim"),
    "coda_lora_r negative": (dict(coda_lora_r=-1), "coda_lora_r"),
}

# values that only a model can refuse (its shapes): checked by get_peft_model before the decoder is replaced
MODEL_CASES = {
    "coda_lora_r 1000 on 64-wide projections": (dict(coda_lora_r=1000), "coda_lora_r=1000 is larger than the smallest coda projection"),
    "coda_lora_r 65 on 64-wide k/v": (dict(coda_lora_r=65), "coda_lora_r=65"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spec_refuses(case):
    kwargs, message = CASES[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OuroborosSpec(**kwargs)


def snapshot(model):
    return type(model.model), {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES) + list(MODEL_CASES))
def test_peft_refuses_before_the_model_changes(case):
    kwargs, message = {**CASES, **MODEL_CASES}[case]
    base = tiny_model("llama")
    before = snapshot(base)
    ids = torch.randint(4, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = base(ids).logits
    with pytest.raises(ValueError, match=message.split(" (")[0].split(" must")[0]):
        get_peft_model(base, ouro_config(**kwargs))
    assert snapshot(base) == before and not hasattr(base, "peft_config")
    with torch.no_grad():
        assert torch.equal(base(ids).logits, logits)


@pytest.mark.parametrize("kwargs", [dict(num_steps=1024), dict(gate_retention=1e-6), dict(gate_retention=1 - 1e-6),
                                    dict(lora_alpha=16.0), dict(use_gate=False), dict(coda_lora_r=64)])
def test_the_edges_of_each_range_are_accepted(kwargs):
    spec = OuroborosSpec(**kwargs)
    assert abs(spec.gate_bias) < 14  # finite at both retention edges
    if "coda_lora_r" in kwargs:  # 64 = the narrowest (k/v) projection of the tiny model
        get_peft_model(tiny_model("llama"), ouro_config(**kwargs))
