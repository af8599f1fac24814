"""The optional trainable coda LoRA (`coda_lora_r`): starts as a no-op, trains, survives save/load and export."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import ouro_config, randomize_adapter, save_base, tiny_model
from ouroboros_plugins import OuroborosSpec


def ids_for(batch=2, length=10, seed=0):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_coda_lora_rank_is_validated():
    with pytest.raises(ValueError, match="coda_lora_r"):
        OuroborosSpec(coda_lora_r=-1)
    assert OuroborosSpec().coda_lora_r == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_coda_lora_starts_as_no_op_then_trains_the_coda(arch):
    plain = randomize_adapter(get_peft_model(tiny_model(arch), ouro_config(num_coda_layers=2)))
    coda = get_peft_model(tiny_model(arch), ouro_config(num_coda_layers=2, coda_lora_r=4))
    coda.load_state_dict(plain.state_dict(), strict=False)  # same Controller/gate/norms, coda LoRA at init
    names = [n for n, p in coda.named_parameters() if p.requires_grad and ".coda_lora." in n]
    assert len(names) == 2 * 7 * 2  # 2 coda layers x 7 projections x (A, B)
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(coda(ids).logits, plain(ids).logits, atol=1e-6, rtol=0)
    loss = coda(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in coda.named_parameters() if n in names}
    assert all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith("_B"))  # B gets gradient at init
    torch.optim.SGD([p for p in coda.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        assert (coda(ids).logits - plain(ids).logits).abs().max() > 1e-4


def test_coda_lora_round_trips_through_save_load_and_export(tmp_path):
    import ouroboros_peft  # noqa: F401
    from ouroboros_peft.exporting import export, load_exported

    base_dir = tmp_path / "base"
    save_base(base_dir, "llama")
    model = get_peft_model(tiny_model("llama"), ouro_config(coda_lora_r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".coda_lora." in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    ids = ids_for()
    with torch.no_grad():
        want = model(ids).logits
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-6, rtol=0)
    export(base_dir, tmp_path / "adapter", tmp_path / "exported")
    exported = load_exported(tmp_path / "exported").eval()
    assert exported.config.coda_lora_r == 4
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, want, atol=1e-5, rtol=0)
