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
