"""Hostile adapter files (issue 20, "Loading"): `PeftModel.from_pretrained` checks every tensor against the adapter
its config describes before the model is touched; any failure leaves the caller's model bit-identical."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import ouroboros_peft  # noqa: F401  (registers the PEFT type)
from conftest import ouro_config, randomize_adapter, tiny_model

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.ouroboros_adapter."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    randomize_adapter(get_peft_model(tiny_model("llama"), ouro_config(num_steps=3, r=8))).save_pretrained(folder)
    return folder


def edit_tensors(fn):
    def damage(folder):
        tensors = load_file(str(folder / WEIGHTS))
        fn(tensors)
        save_file(tensors, str(folder / WEIGHTS))
    return damage


def edit_config(**changes):
    def damage(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return damage


def reshape(name, rows_delta=0, cols_delta=0):
    def fn(t):
        old = t[PREFIX + name]
        t[PREFIX + name] = torch.zeros(old.shape[0] + rows_delta, *((old.shape[1] + cols_delta,) if old.dim() > 1 else ()))
    return fn


def poison(name):
    def fn(t):
        t[PREFIX + name] = t[PREFIX + name].clone()
        t[PREFIX + name].view(-1)[0] = float("nan")
    return fn


CASES = {
    "wrong-shape controller head": (edit_tensors(reshape("controller.heads.q_proj.weight", rows_delta=1)), r"controller.heads.q_proj.weight has shape"),
    "wrong-shape bases": (edit_tensors(reshape("bases.k_proj_A", cols_delta=-1)), r"bases.k_proj_A has shape"),
    "config num_steps 3 -> 5": (edit_config(num_steps=5), r"norms.weight has shape \(3, 128\), the adapter config needs \(5, 128\)"),
    "config num_steps 3 -> 2": (edit_config(num_steps=2), r"norms.weight has shape \(3, 128\), the adapter config needs \(2, 128\)"),
    "config r 8 -> 16": (edit_config(r=16), r"bases.gate_proj_A has shape \(8, 128\), the adapter config needs \(16, 128\)"),
    "config r 8 -> 4": (edit_config(r=4), r"has shape \(8, 128\), the adapter config needs \(4, 128\)"),
    "config without gate": (edit_config(use_gate=False), r"unexpected tensor .*gate.proj"),
    "missing gate bias": (edit_tensors(lambda t: t.pop(PREFIX + "gate.proj.bias")), r"missing tensor gate.proj.bias"),
    "missing controller head": (edit_tensors(lambda t: t.pop(PREFIX + "controller.heads.v_proj.weight")), r"missing tensor controller.heads.v_proj.weight"),
    "missing norms": (edit_tensors(lambda t: t.pop(PREFIX + "norms.weight")), r"missing tensor norms.weight"),
    "NaN in the gate": (edit_tensors(poison("gate.proj.weight")), r"gate.proj.weight holds NaN or inf"),
    "NaN in a basis": (edit_tensors(poison("bases.up_proj_B")), r"bases.up_proj_B holds NaN or inf"),
    "a foreign tensor": (edit_tensors(lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)})), r"unexpected tensor base_model.model.lm_head.weight"),
}


def state(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.detach().clone() for n, p in model.state_dict().items()})


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_adapter_file_is_refused_and_the_model_is_untouched(saved, tmp_path, case):
    damage, message = CASES[case]
    folder = tmp_path / "adapter"
    shutil.copytree(saved, folder)
    damage(folder)
    model = tiny_model("llama")
    modules, grads, tensors = state(model)
    ids = torch.randint(4, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    with pytest.raises(ValueError, match=rf"{WEIGHTS} does not match its adapter_config.json.*{message}"):
        PeftModel.from_pretrained(model, folder)
    after_modules, after_grads, after_tensors = state(model)
    assert after_modules == modules and after_grads == grads and not hasattr(model, "peft_config")
    assert all(torch.equal(after_tensors[k], v) for k, v in tensors.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_the_intact_file_still_loads_exactly(saved):
    model = PeftModel.from_pretrained(tiny_model("llama"), saved)
    saved_tensors = load_file(str(saved / WEIGHTS))
    adapter = model.base_model.model.model.ouroboros_adapter["default"]
    for name, value in adapter.state_dict().items():
        assert torch.equal(value, saved_tensors[PREFIX + name]), name  # bases too: loaded, not recomputed


# ----------------------------------------------------------------------------------------------------
# the base fingerprint: every kept weight, the rotary settings; no false alarm for bf16 / fp16 loads
# ----------------------------------------------------------------------------------------------------


def changed(part):
    """A tiny Llama equal to the adapter's base except for one kept part (1 prelude layer, layer 3 recurrent,
    1 coda layer of 6)."""
    def make():
        model = tiny_model("llama")
        with torch.no_grad():
            target = {"prelude layer": model.model.layers[0].mlp.down_proj.weight,
                      "coda layer": model.model.layers[5].self_attn.o_proj.weight,
                      "recurrent input_layernorm": model.model.layers[3].input_layernorm.weight,
                      "embed_tokens": model.model.embed_tokens.weight,
                      "lm_head": model.lm_head.weight,
                      "final norm": model.model.norm.weight}[part]
            target.mul_(1.5)
        return model
    return make


def rope_theta():
    model = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    return model


OTHER_BASES = {
    "prelude layer": (changed("prelude layer"), "weights of layers.0 differ"),
    "coda layer": (changed("coda layer"), "weights of layers.5 differ"),
    "recurrent input_layernorm": (changed("recurrent input_layernorm"), "weights of layers.3 differ"),
    "embed_tokens": (changed("embed_tokens"), "weights of embed_tokens differ"),
    "lm_head": (changed("lm_head"), "weights of lm_head differ"),
    "final norm": (changed("final norm"), "weights of norm differ"),
    "rope_theta": (rope_theta, "rope_parameters: adapter has"),
}


@pytest.fixture(scope="module")
def plain_saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    randomize_adapter(get_peft_model(tiny_model("llama"), ouro_config(num_steps=3, r=8))).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", list(OTHER_BASES))
def test_an_adapter_is_refused_on_a_base_that_differs_in_any_kept_part(plain_saved, case):
    make, message = OTHER_BASES[case]
    model = make()
    with pytest.raises(ValueError, match=rf"different base model: .*{message}"):
        PeftModel.from_pretrained(model, plain_saved)
    assert type(model.model).__name__ == "LlamaModel"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_right_base_in_half_precision_is_accepted(plain_saved, dtype):
    model = PeftModel.from_pretrained(tiny_model("llama", dtype=dtype), plain_saved)  # no false "different base model"
    assert model.base_model.model.model.active_ouroboros() == "default"


@pytest.mark.parametrize("value", [None, {}, "config fields only"])
def test_the_base_check_cannot_be_switched_off_by_editing_the_file(plain_saved, tmp_path, value):
    folder = tmp_path / "adapter"
    shutil.copytree(plain_saved, folder)
    if value == "config fields only":
        fp = json.loads((folder / "adapter_config.json").read_text())["base_fingerprint"]
        value = {k: v for k, v in fp.items() if k not in ("weights", "recurrent_layer_sha256")}
    edit_config(base_fingerprint=value)(folder)
    model = tiny_model("llama", seed=5)  # another base altogether
    with pytest.raises(ValueError, match="has no base_fingerprint"):
        PeftModel.from_pretrained(model, folder)
    assert type(model.model).__name__ == "LlamaModel"


def test_an_older_adapter_keeps_its_recurrent_layer_hash_check(plain_saved, tmp_path):
    """Adapters saved before weight signatures existed carry only the recurrent layer's hash: still checked."""
    folder = tmp_path / "adapter"
    shutil.copytree(plain_saved, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_fingerprint"] = {k: v for k, v in cfg["base_fingerprint"].items() if k != "weights"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    PeftModel.from_pretrained(tiny_model("llama"), folder)  # the right base
    with pytest.raises(ValueError, match="recurrent_layer_sha256"):
        PeftModel.from_pretrained(tiny_model("llama", seed=5), folder)
