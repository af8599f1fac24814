"""Hostile exports (issue 20, "Export"): an export never destroys an input, survives being killed while it replaces
an earlier export, and names a bad --dtype before any work."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
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
