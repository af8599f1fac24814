"""pluggy plugins: built-in backbones come through entry points; a third-party family works untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ouroboros_plugins import find_backbone, get_plugin_manager, hookimpl
from ouroboros_plugins.backbones import LlamaStyleBackbone


def run_cli(*args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "ouroboros")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)


def test_builtin_backbones_come_from_entry_points():
    pm = get_plugin_manager()
    dists = {pm.get_name(p): d.project_name for p, d in pm.list_plugin_distinfo()}
    assert dists.get("llama") == "ouroboros-plugins" and dists.get("qwen2") == "ouroboros-plugins"
    assert find_backbone("qwen2").name == "qwen2" and find_backbone("llama").name == "llama"


def test_plugins_command_lists_versions_and_hooks():
    out = run_cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["llama"]["hooks"] == ["ouroboros_backbones"] and rows["llama"]["version"] == "0.1.0"
    assert rows["peft"]["distribution"] == "ouroboros-peft"
    assert rows["train"]["distribution"] == "ouroboros-train"
    assert rows["evaluate"]["distribution"] == "ouroboros-evaluate"
    for name in ("peft", "train", "evaluate"):
        assert "ouroboros_register_commands" in rows[name]["hooks"]
    text = run_cli("plugins").stdout
    assert "qwen2" in text and "ouroboros-plugins 0.1.0" in text


def test_unsupported_architecture_lists_installed_backbones():
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*\['llama', 'qwen2'"):
        find_backbone("gpt2")


class MistralBackbone(LlamaStyleBackbone):
    name = "mistral"
    model_types = ("mistral",)


class MistralPlugin:
    @hookimpl
    def ouroboros_backbones(self):
        return [MistralBackbone()]


def test_third_party_backbone_plugin_without_touching_the_core():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    from conftest import ouro_config

    config = MistralConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=5,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None, head_dim=32)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="unsupported architecture 'mistral'"):
        get_peft_model(base, ouro_config())
    pm = get_plugin_manager()
    plugin = MistralPlugin()
    pm.register(plugin, name="test-mistral")
    try:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(3, 96, (2, 9))
        with torch.no_grad():
            ref = base(ids).logits
        model = get_peft_model(base, ouro_config())
        with torch.no_grad():
            out = model(ids).logits
            with model.disable_adapter():
                assert torch.equal(model(ids).logits, ref)
        assert out.shape == ref.shape and not torch.allclose(out, ref)
        model(ids, labels=ids).loss.backward()
    finally:
        pm.unregister(plugin)


def test_entry_point_discovery_of_an_installed_third_party_plugin(tmp_path):
    """A distribution that declares the `ouroboros_plugins` entry point is found by a fresh process."""
    (tmp_path / "toyplug.py").write_text(textwrap.dedent('''
        from ouroboros_plugins import hookimpl
        from ouroboros_plugins.backbones import LlamaStyleBackbone

        class Toy(LlamaStyleBackbone):
            name = "toy"
            model_types = ("toy",)

        @hookimpl
        def ouroboros_backbones():
            return [Toy()]
    '''))
    info = tmp_path / "toyplug-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[ouroboros_plugins]\ntoy = toyplug\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = run_cli("plugins", env=env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("toy "))
    assert "toyplug 0.3" in line and "ouroboros_backbones" in line
    code = "from ouroboros_plugins import find_backbone; print(find_backbone('toy').name)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "toy", res.stderr


def test_help_and_plugin_listing_import_neither_torch_nor_peft():
    """`ouroboros --help` and `ouroboros plugins` load every plugin but no framework: each command imports what it
    needs when it runs (and `ouroboros train --help` still lists the training options)."""
    code = (
        "import sys, contextlib, io\n"
        "from ouroboros_plugins.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['plugins']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert out.getvalue(), argv\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'vllm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
