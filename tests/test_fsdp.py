"""FSDP2 training of an Ouroboros PEFT model: 2 CPU processes (gloo), each decoder layer sharded, against 1 process.

Every run is tests/fsdp_train.py under torchrun; see its docstring for what it trains and writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, ouro_config, tiny_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

SCRIPT = Path(__file__).with_name("fsdp_train.py")
ACCELERATE_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "accelerate" / "fsdp2.yaml"
NUM_LAYERS = 6  # conftest's tiny models
# Sharded runs: name -> script flags. "layers": fully_shard per decoder layer, then the causal LM as root.
VARIANTS = {
    "layers": ["--shard"],
    "checkpointing": ["--shard", "--checkpointing"],
    "accelerate": ["--shard", "--accelerate-config", str(ACCELERATE_CONFIG)],
}
LOSS_RTOL = 1e-4
ADAPTER_ATOL = 1e-4
GRAD_RTOL = 1e-4  # of each gradient's largest entry


def torchrun(nproc: int, out: Path, *flags: str, env: dict | None = None, timeout: int = 90):
    """Run the script under torchrun on a free port; returns the CompletedProcess (output in stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT), "--out", str(out), *flags]
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(name, nproc, *flags) -> output folder; each distinct run is made once per module (a failed one too)."""
    done: dict[str, tuple] = {}

    def get(name: str, nproc: int, *flags: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = out, torchrun(nproc, out, *flags)
        out, res = done[name]
        assert res.returncode == 0, res.stdout[-4000:]
        return out

    return get


def load(out: Path, arch: str):
    meta = json.loads((out / arch / "losses.json").read_text())
    tensors = {kind: load_file(str(out / arch / f"{kind}.safetensors")) for kind in ("initial", "final", "grads")}
    return meta, tensors


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_training_matches_one_process(run, arch, variant):
    ref_meta, ref = load(run("reference", 1), arch)
    meta, got = load(run(variant, 2, *VARIANTS[variant]), arch)

    # really sharded: every decoder layer is its own FSDP unit, plus a root (accelerate adds embeddings and head)
    layers = {f"base_model.model.model.base_layer.layers.{i}" for i in range(NUM_LAYERS)}
    assert ref_meta["fsdp_units"] == [] and meta["world_size"] == 2
    assert layers <= set(meta["fsdp_units"]) and len(meta["fsdp_units"]) > NUM_LAYERS

    assert len(meta["losses"]) == len(ref_meta["losses"]) == 3
    for a, b in zip(meta["losses"], ref_meta["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (meta["losses"], ref_meta["losses"])

    assert got["final"].keys() == ref["final"].keys() and ref["final"]
    assert all(".ouroboros_adapter.default." in name for name in ref["final"])
    for name, expected in ref["initial"].items():
        assert torch.equal(got["initial"][name], expected), name
    for name, g in ref["grads"].items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        assert (got["grads"][name] - g).abs().max().item() <= GRAD_RTOL * scale, name
    moved = []
    for name, expected in ref["final"].items():
        assert (got["final"][name] - expected).abs().max().item() <= ADAPTER_ATOL, name
        moved.append((expected - ref["initial"][name]).abs().max().item())
    # every tensor moved well beyond the tolerance, so a wrong update could not pass as equal
    assert min(moved) > 10 * ADAPTER_ATOL


def test_without_call_layer_fsdp_path_sharded_training_fails(tmp_path):
    """Negative control: with `call_layer` blind to FSDP, a sharded layer's weights are never gathered."""
    res = torchrun(2, tmp_path, "--shard", "--arch", "llama", env={"OUROBOROS_FSDP_BYPASS": "1"})
    assert res.returncode != 0
    assert "got mixed torch.Tensor and DTensor" in res.stdout, res.stdout[-4000:]
    assert not (tmp_path / "llama").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_accelerate_config_reads_as_fsdp2_per_layer(arch):
    """docs/accelerate/fsdp2.yaml, read the way `accelerate launch --config_file` reads it."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE
    from peft import get_peft_model
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from fsdp_train import accelerate_plugin

    config = load_config_from_file(str(ACCELERATE_CONFIG))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    plugin = accelerate_plugin(ACCELERATE_CONFIG, 8)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert plugin.state_dict_type.name in FSDP2_STATE_DICT_TYPE
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    model = get_peft_model(tiny_model(arch), ouro_config())
    plugin.set_auto_wrap_policy(model)
    assert plugin.auto_wrap_policy.func is transformer_auto_wrap_policy
    layer_cls = type(model.base_model.model.model.base_layer.layers[0])
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {layer_cls}
