"""evals/vllm_scaling.py: the multiply-add count behind the served-throughput limit (no engine runs here)."""

from pathlib import Path

import pytest

from conftest import load_script

scaling = load_script("vllm_scaling", Path(__file__).resolve().parents[1] / "evals" / "vllm_scaling.py")

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               num_hidden_layers=30, vocab_size=49152)
EXPORT = dict(num_prelude_layers=7, num_coda_layers=7, num_steps=4, r=32, modulation="controller",
              controller_hidden=128, controller_state_dim=256, use_gate=True, coda_lora_r=0)


def test_smollm2_limit_is_the_issues_figure():
    """30 x 3.5 M + 28.3 M lm_head against 18 x 3.5 M + 4 x 1.3 M extras + 28.3 M: about 1.38x."""
    base, ours = scaling.macs_per_token(SMOLLM2, None), scaling.macs_per_token(SMOLLM2, EXPORT)
    assert base["layer"] == ours["layer"] == 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536
    assert base["lm_head"] == 49152 * 576 and base["applications"] == 30 and ours["applications"] == 18
    assert ours["gate"] == 2 * 576 * 576
    assert ours["extras_per_step"] == pytest.approx(1.30e6, rel=0.01)
    assert base["total"] / ours["total"] == pytest.approx(1.384, abs=0.002)


@pytest.mark.parametrize("change, direction", [(dict(use_gate=False), 1), (dict(modulation="static"), 1),
                                               (dict(coda_lora_r=8), -1), (dict(num_steps=8), -1)])
def test_the_limit_moves_with_the_checkpoint(change, direction):
    base = scaling.macs_per_token(SMOLLM2, None)["total"]
    limit = base / scaling.macs_per_token(SMOLLM2, EXPORT)["total"]
    changed = base / scaling.macs_per_token(SMOLLM2, dict(EXPORT, **change))["total"]
    assert (changed - limit) * direction > 0
