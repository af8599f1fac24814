"""Half precision at depth (issue 20, "Numerics"): a finite adapter gives finite logits in fp16 and bf16 at 64 and 256
recurrence steps, because the recurrence keeps its residual stream in fp32."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import ouroboros_plugins.recurrence as recurrence
from conftest import ARCHS, ouro_config, randomize_adapter, tiny_model


def logits(arch, dtype, steps, scale=0.3):
    model = randomize_adapter(get_peft_model(tiny_model(arch, dtype=dtype), ouro_config(num_steps=steps, r=8)), scale=scale)
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [64, 256])
def test_half_precision_stays_finite_at_depth(arch, dtype, steps):
    out = logits(arch, dtype, steps)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_the_fp32_stream_is_what_keeps_fp16_finite(monkeypatch):
    """Negative control: with the residual stream in the model's dtype (the behaviour before), the same fp16 adapters
    overflow at depth 256."""
    monkeypatch.setattr(recurrence, "RECURRENCE_DTYPE", None)
    assert any(not bool(torch.isfinite(logits(arch, torch.float16, 256)).all()) for arch in ARCHS)


def test_fp32_models_are_unchanged_by_the_stream_dtype(monkeypatch):
    reference = logits("llama", torch.float32, 8)
    monkeypatch.setattr(recurrence, "RECURRENCE_DTYPE", None)
    assert torch.equal(logits("llama", torch.float32, 8), reference)
