"""The PEFT tuner type on tiny Llama and Qwen2 models: the matrix a PEFT user relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import ARCHS, ouro_config, randomize_adapter, tiny_model
from ouroboros_peft import OuroborosConfig
from ouroboros_peft.registration import extend_peft_type, register

CONFIGS = {
    "controller-causal": dict(),
    "controller-token": dict(controller_pooling="token"),
    "static": dict(modulation="static"),
    "no-gate-attn-only": dict(use_gate=False, target_modules=["q_proj", "v_proj"]),
    "deep-rank4": dict(num_steps=6, r=4, lora_alpha=8),
    "paper-head-alpha16": dict(controller_head="paper", lora_alpha=16),
}
MATRIX = [(a, c) for a in ARCHS for c in CONFIGS]


def ids_for(batch=2, length=12, seed=0):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, name", MATRIX)
def test_forward_backward_and_only_ouroboros_trains(arch, name):
    base = tiny_model(arch)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ouro_config(**CONFIGS[name]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ouroboros_adapter.default." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    ids = ids_for()
    loss = model(ids, labels=ids).loss
    loss.backward()
    # no unused trainable parameter: every one of them receives a gradient
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # a step moves the adapter and nothing else
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    inner = model.base_model.model.model.base_layer
    for key, value in inner.state_dict().items():
        assert torch.equal(value, frozen["model." + key]), key


def test_print_trainable_parameters_counts_only_the_adapter(capsys):
    model = get_peft_model(tiny_model("llama"), ouro_config())
    trainable, total = model.get_nb_trainable_parameters()
    adapter = model.base_model.model.model.ouroboros_adapter["default"]
    assert trainable == sum(p.numel() for p in adapter.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_is_exactly_the_full_model(arch):
    base = tiny_model(arch)
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
    model = randomize_adapter(get_peft_model(base, ouro_config()))
    with torch.no_grad():
        on = model(ids, attention_mask=mask).logits
        with model.disable_adapter():
            off = model(ids, attention_mask=mask).logits
        again = model(ids, attention_mask=mask).logits
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref) and torch.equal(on, again)


def test_trainables_stay_fp32_on_a_bf16_base():
    base = tiny_model("qwen2", dtype=torch.bfloat16)
    model = get_peft_model(base, ouro_config())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(p.dtype == torch.float32 for p in params.values())
    ids = ids_for()
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    # AdamW-sized updates on the gate bias (~ -1.99) survive in fp32; in bf16 they would round to nothing
    bias = model.base_model.model.model.ouroboros_adapter["default"].gate.proj.bias
    assert bias.grad is not None and bias.grad.dtype == torch.float32
    before = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1e-3)
    assert not torch.equal(bias, before)
    as_bf16 = before.to(torch.bfloat16)
    assert torch.equal((as_bf16 + 1e-3).to(torch.bfloat16), as_bf16)


def test_zero_modulation_recurrent_step_equals_the_base_layer():
    """Layer math of the core with zero modulation == the host's own decoder layer."""
    from ouroboros_plugins import find_backbone
    from ouroboros_plugins.layer import AttentionInputs, build_attention_mask

    for arch in ARCHS:
        base = tiny_model(arch)
        model = get_peft_model(base, ouro_config())
        decoder = model.base_model.model.model.base_layer
        adapter = model.base_model.model.model.ouroboros_adapter["default"]
        backbone = find_backbone(arch)
        h = torch.randn(2, 7, 128)
        pos = torch.arange(7).unsqueeze(0).expand(2, -1)
        cos, sin = decoder.rotary_emb(h, pos)
        mask = build_attention_mask(None, 2, 7, 0, h.dtype, h.device, "sdpa")
        layer = decoder.layers[2]
        with torch.no_grad():
            m = adapter.modulation(h, 0)
            assert all(torch.count_nonzero(v) == 0 for v in m.values())
            ours = backbone.run_layer(layer, h, AttentionInputs(cos, sin, mask, "sdpa"), adapter.lowrank(m))
            plain = backbone.run_layer(layer, h, AttentionInputs(cos, sin, mask, "sdpa"))
            host = layer(h, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
        assert torch.equal(ours, plain)
        torch.testing.assert_close(ours, host, atol=1e-5, rtol=1e-5)


def test_gate_retention_is_088_at_init_in_the_model():
    model = get_peft_model(tiny_model("llama"), ouro_config())
    gate = model.base_model.model.model.ouroboros_adapter["default"].gate
    g = gate(torch.randn(3, 5, 128), torch.randn(3, 5, 128) * 4)
    torch.testing.assert_close(1 - g, torch.full_like(g, 0.88), atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pooling", ["causal_mean", "token", "sequence_mean"])
def test_causality_probe(attn, pooling):
    """Changing tokens after position i must leave logits <= i unchanged, except for the reference's
    non-causal sequence_mean pooling, where the probe must see the leak."""
    for arch in ARCHS:
        model = randomize_adapter(get_peft_model(tiny_model(arch, attn=attn), ouro_config(controller_pooling=pooling)), scale=0.2)
        ids = ids_for(2, 16)
        changed = ids.clone()
        i = 7
        changed[:, i + 1 :] = torch.randint(3, 96, changed[:, i + 1 :].shape, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            a = model(ids).logits[:, : i + 1]
            b = model(changed).logits[:, : i + 1]
        if pooling == "sequence_mean":
            assert (a - b).abs().max() > 1e-4, "probe failed to detect the sequence_mean leak"
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_save_pretrained_writes_config_and_bases(tmp_path):
    model = randomize_adapter(get_peft_model(tiny_model("llama"), ouro_config(r=4)))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "OUROBOROS" and cfg["num_steps"] == 3 and cfg["r"] == 4
    assert cfg["base_fingerprint"]["recurrent_layer_sha256"]
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(".default." in k for k in weights)
    bases = [k for k in weights if ".bases." in k]
    assert len(bases) == 14  # A and B for 7 projections
    adapter = model.base_model.model.model.ouroboros_adapter["default"]
    key = next(k for k in bases if k.endswith("q_proj_A"))
    assert torch.equal(weights[key], adapter.bases.q_proj_A)
    assert all(k.startswith("base_model.model.model.ouroboros_adapter.") for k in weights)


FRESH = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import save_file
import ouroboros_peft  # registers the OUROBOROS type
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.load if False else None
from safetensors.torch import load_file
ids = load_file(sys.argv[3])["ids"]
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, sys.argv[4])
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_process_reload_gives_bit_identical_logits(arch, tmp_path):
    base = tiny_model(arch)
    base.save_pretrained(tmp_path / "base")
    model = randomize_adapter(get_peft_model(base, ouro_config()))
    model.save_pretrained(tmp_path / "adapter")
    ids = ids_for(2, 11)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    with torch.no_grad():
        expected = model(ids).logits
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert torch.equal(got, expected)


def test_in_process_reload_and_loaded_values(tmp_path):
    base = tiny_model("qwen2")
    model = randomize_adapter(get_peft_model(base, ouro_config(modulation="static")))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path, adapter_name="other")
    a = dict(model.named_buffers()) | dict(model.named_parameters())
    b = dict(reloaded.named_buffers()) | dict(reloaded.named_parameters())
    compared = 0
    for name, p in a.items():
        if ".ouroboros_adapter." in name:
            assert torch.equal(p, b[name.replace(".default.", ".other.")]), name
            compared += 1
    assert compared == len([k for k in a if ".ouroboros_adapter." in k]) > 14
    assert not any(p.requires_grad for p in reloaded.parameters())  # loaded for inference by default


def test_adapter_for_another_base_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama", seed=0), ouro_config())
    model.save_pretrained(tmp_path)
    other = tiny_model("llama", seed=5)
    with pytest.raises(ValueError, match="different base model.*weights of layers.3 differ"):
        PeftModel.from_pretrained(other, tmp_path)
    wider = tiny_model("llama", intermediate_size=320)
    with pytest.raises(ValueError, match="intermediate_size"):
        PeftModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_weights_give_a_clear_error_and_leave_the_model_unchanged(tmp_path, damage):
    model = get_peft_model(tiny_model("llama"), ouro_config())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x07" * 64 + data[64:])
    else:
        path.unlink()
    fresh = tiny_model("llama")
    before = type(fresh.model)
    ids = ids_for()
    with torch.no_grad():
        ref = fresh(ids).logits
    with pytest.raises((ValueError, FileNotFoundError), match="adapter_model.safetensors"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert type(fresh.model) is before and not hasattr(fresh, "peft_config")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_prelude_layers=3, num_coda_layers=3), "num_prelude_layers \\+ num_coda_layers"),
        (dict(recurrent_layer_index=0), "recurrent_layer_index=0"),
        (dict(r=100), "r=100 is larger"),
    ],
)
def test_bad_config_is_refused_before_the_model_changes(kwargs, needle):
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=needle):
        get_peft_model(base, ouro_config(**kwargs))
    assert type(base.model).__name__ == "LlamaModel"


def test_unsupported_architecture_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    base = AutoModelForCausalLM.from_config(GPT2Config(n_layer=4, n_embd=64, n_head=2, vocab_size=96))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama"):
        get_peft_model(base, ouro_config())


def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    from ouroboros_peft import OuroborosModel

    assert extend_peft_type() is PeftType.OUROBOROS is PeftType("OUROBOROS")
    assert register(OuroborosConfig, OuroborosModel) is PeftType.OUROBOROS
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.OUROBOROS] is OuroborosModel
    assert OuroborosConfig().peft_type is PeftType.OUROBOROS


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    grads = []
    for checkpointing in (False, True):
        base = tiny_model(arch)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = randomize_adapter(get_peft_model(base, ouro_config()))
        model.train()
        ids = ids_for()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_hf_trainer_trains_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_model("llama")
    model = get_peft_model(base, ouro_config())
    torch.manual_seed(0)
    pattern = torch.arange(3, 19).repeat(2)[:24]  # a learnable repeating sequence
    data = [{"input_ids": pattern, "labels": pattern} for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=3e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not torch.equal(p, before[n]):
            assert ".ouroboros_adapter." in n, f"frozen parameter {n} moved"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".controller." in n)


def test_transformers_load_adapter_restores_the_trained_values(tmp_path):
    """`model.load_adapter(dir)` (transformers' PEFT integration) must load every tensor, not leave them at init."""
    model = randomize_adapter(get_peft_model(tiny_model("qwen2"), ouro_config()))
    model.save_pretrained(tmp_path)
    ids = ids_for()
    with torch.no_grad():
        expected = model(ids).logits
    plain = tiny_model("qwen2")
    plain.load_adapter(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, expected)
