"""Hostile exports (issue 20, "Export"): an export never destroys an input, survives being killed while it replaces
an earlier export, and names a bad --dtype before any work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import get_peft_model

from conftest import ouro_config, save_base
from ouroboros_peft import export


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = save_base(root / "base", "llama")
    get_peft_model(base, ouro_config()).save_pretrained(root / "adapter")
    return root


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --out relative to the inputs -> what the refusal says
OUT_CASES = {
    "equal to the adapter": (lambda root: root / "adapter", "is the adapter folder"),
    "equal to the base": (lambda root: root / "base", "is the base model folder"),
    "inside the base": (lambda root: root / "base" / "exported", "lies inside the base model folder"),
    "inside the adapter": (lambda root: root / "adapter" / "sub" / "out", "lies inside the adapter folder"),
    "containing both": (lambda root: root, "contains the base model folder"),
    "the adapter through a relative path": (lambda root: root / "base" / ".." / "adapter", "is the adapter folder"),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_out_that_is_inside_or_around_an_input_is_refused_with_overwrite(inputs, case):
    out, message = OUT_CASES[case]
    before = files(inputs)
    with pytest.raises(ValueError, match=message):
        export(inputs / "base", inputs / "adapter", out(inputs), overwrite=True)
    assert files(inputs) == before


@pytest.mark.parametrize("dtype", ["float17", "int8", "torch.float64"])
def test_a_bad_dtype_is_named_before_any_work(inputs, tmp_path, dtype):
    with pytest.raises(ValueError, match=r"--dtype must be one of \['auto', 'float32', 'bfloat16', 'float16'\]"):
        export(inputs / "base", inputs / "adapter", tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_them_too(inputs, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "ouroboros")
    base = ["export", "--base", str(inputs / "base"), "--adapter", str(inputs / "adapter")]
    res = subprocess.run([exe, *base, "--out", str(inputs / "adapter"), "--overwrite"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is the adapter folder" in res.stderr
    res = subprocess.run([exe, *base, "--out", str(tmp_path / "o"), "--dtype", "float17"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice: 'float17'" in res.stderr


def complete(out) -> bool:
    from safetensors import safe_open

    if not (out / "config.json").is_file():
        return False
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return len(list(f.keys())) > 0


def test_kill_9_during_overwrite_leaves_the_old_or_the_new_export(inputs, tmp_path):
    """`ouroboros export --overwrite` killed at several moments: OUT is always a complete export (old or new) and the
    next export tidies what the killed one left beside it."""
    exe = os.path.join(os.path.dirname(sys.executable), "ouroboros")
    out = tmp_path / "out"
    export(inputs / "base", inputs / "adapter", out)
    args = [exe, "export", "--base", str(inputs / "base"), "--adapter", str(inputs / "adapter"), "--out", str(out), "--overwrite"]
    start = time.time()
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    full = time.time() - start
    for fraction in (0.6, 0.8, 0.9, 0.95, 0.99):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert complete(out), f"OUT incomplete after a kill at {fraction:.0%} of an export"
    export(inputs / "base", inputs / "adapter", out, overwrite=True)
    assert complete(out) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # leftovers tidied
    shutil.rmtree(out)


# ----------------------------------------------------------------------------------------------------
# a bad adapter is refused before any export work, naming the file (and the field / the tensors)
# ----------------------------------------------------------------------------------------------------

ADAPTER_PREFIX = "base_model.model.model.ouroboros_adapter."


def edit_tensors(fn):
    def damage(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        fn(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return damage


def nan_in(name):
    def fn(t):
        t[ADAPTER_PREFIX + name] = t[ADAPTER_PREFIX + name].clone().fill_(float("nan"))
    return fn


def edit_config(fn):
    def damage(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        fn(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return damage


TENSOR_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"

# damage -> (the file the error names, what else it must say)
BAD_ADAPTERS = {
    "missing gate bias": (edit_tensors(lambda t: t.pop(ADAPTER_PREFIX + "gate.proj.bias")), TENSOR_FILE, "missing tensor gate.proj.bias"),
    "missing norms": (edit_tensors(lambda t: t.pop(ADAPTER_PREFIX + "norms.weight")), TENSOR_FILE, "missing tensor norms.weight"),
    "NaN in the gate": (edit_tensors(nan_in("gate.proj.weight")), TENSOR_FILE, "gate.proj.weight holds NaN or inf"),
    "inf in a basis": (edit_tensors(lambda t: t[ADAPTER_PREFIX + "bases.q_proj_A"].view(-1).__setitem__(0, float("inf"))), TENSOR_FILE, "bases.q_proj_A holds NaN or inf"),
    "an unexpected tensor": (edit_tensors(lambda t: t.update({ADAPTER_PREFIX + "extra.weight": torch.zeros(2)})), TENSOR_FILE, "unexpected tensor .*extra.weight"),
    "wrong-shape adapter (was a RuntimeError traceback)": (edit_config(lambda c: c.update(num_steps=5)), TENSOR_FILE, r"norms.weight has shape \(3, 128\), the adapter config needs \(5, 128\)"),
    "peft_type LORA on an Ouroboros adapter": (edit_config(lambda c: c.update(peft_type="LORA")), CONFIG_FILE, "peft_type is 'LORA', but the file holds an Ouroboros adapter's fields"),
    "peft_type lowercase": (edit_config(lambda c: c.update(peft_type="ouroboros")), CONFIG_FILE, "peft_type must be \"OUROBOROS\" exactly"),
    "peft_type missing": (edit_config(lambda c: c.pop("peft_type")), CONFIG_FILE, "has no peft_type field"),
    "invalid JSON": (lambda folder: (folder / CONFIG_FILE).write_text('{"peft_type": "OUROBOROS",'), CONFIG_FILE, "is not valid JSON: .* at line 1"),
    "a pickled adapter_model.bin": (lambda folder: (folder / TENSOR_FILE).rename(folder / "adapter_model.bin"), "adapter_model.bin", "pickled PyTorch file"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_bad_adapter_is_refused_by_export_naming_the_file(inputs, tmp_path, case):
    damage, name, message = BAD_ADAPTERS[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs / "adapter", adapter)
    damage(adapter)
    before = files(inputs)
    with pytest.raises(ValueError, match=message) as info:
        export(inputs / "base", adapter, tmp_path / "out")
    assert str(adapter / name) in str(info.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing written
    assert files(inputs) == before


def test_the_command_line_names_a_nan_adapter_without_a_traceback(inputs, tmp_path):
    """`ouroboros export` wrote a NaN adapter with exit code 0; now: exit 2, one line naming the file."""
    adapter = tmp_path / "adapter"
    shutil.copytree(inputs / "adapter", adapter)
    edit_tensors(nan_in("norms.weight"))(adapter)
    exe = os.path.join(os.path.dirname(sys.executable), "ouroboros")
    res = subprocess.run([exe, "export", "--base", str(inputs / "base"), "--adapter", str(adapter), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{adapter / TENSOR_FILE} does not match its adapter_config.json" in res.stderr and "norms.weight holds NaN or inf" in res.stderr
    assert not (tmp_path / "out").exists()
