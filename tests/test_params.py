"""The paper's parameter counts, reproduced from the Qwen2.5-3B config on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from ouroboros_peft import OuroborosConfig


def qwen25_3b_on_meta():
    config = Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "modulation, total, parts",
    [
        ("controller", 9_214_592, {"controller": 692_864, "gate": 8_390_656, "norms": 131_072}),
        ("static", 8_536_064, {"static": 14_336, "gate": 8_390_656, "norms": 131_072}),
    ],
)
def test_paper_parameter_counts(modulation, total, parts):
    config = OuroborosConfig(num_prelude_layers=8, num_coda_layers=8, num_steps=4, r=32, max_steps=64, modulation=modulation)
    model = get_peft_model(qwen25_3b_on_meta(), config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == total
    adapter = model.base_model.model.model.ouroboros_adapter["default"]
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in adapter.named_children()}
    assert counts == {"bases": 0, **parts}
    # the frozen bases exist (7 projections x A and B) but are buffers, not trainable parameters
    assert len(list(adapter.bases.buffers())) == 14
