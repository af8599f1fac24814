"""The plugin manager: entry-point discovery (once, lazily) and backbone lookup."""

from __future__ import annotations

import importlib.metadata as md
from typing import Optional

import pluggy

from . import hookspecs

_manager: Optional[pluggy.PluginManager] = None
BUILTIN_MODULES = ("ouroboros_plugins.backbones.llama", "ouroboros_plugins.backbones.qwen2")


def get_plugin_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        # Running from a source tree that was never installed has no entry points: fall back to importing
        # the built-ins by name so the core still works (an installed package always takes the entry-point path).
        for name in BUILTIN_MODULES:
            if not any(getattr(p, "__name__", None) == name for p in pm.get_plugins()):
                pm.register(importlib_module(name), name=name.rsplit(".", 1)[-1])
        _manager = pm
    return _manager


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


def all_backbones() -> list:
    return [b for group in get_plugin_manager().hook.ouroboros_backbones() for b in group]


def find_backbone(model_type: str):
    """The backbone handling `model_type`, or a ValueError listing the installed backbone plugins."""
    for backbone in all_backbones():
        if model_type in backbone.model_types:
            return backbone
    installed = sorted({t for b in all_backbones() for t in b.model_types})
    raise ValueError(
        f"unsupported architecture {model_type!r}: no Ouroboros backbone plugin handles it. "
        f"Installed backbone plugins handle: {installed}. Add one by implementing the `ouroboros_backbones` hook "
        f"under the entry-point group '{hookspecs.PROJECT}'."
    )


def describe_plugins() -> list[dict]:
    """One row per registered plugin: name, distribution and version, hooks implemented."""
    pm = get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = dists.get(id(plugin))
        if dist is not None:
            project, version = dist.metadata["name"], dist.version
        else:
            project, version = "ouroboros-plugins", _version("ouroboros-plugins")
        rows.append({"name": name, "distribution": project, "version": version, "hooks": hooks})
    return sorted(rows, key=lambda r: r["name"])


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"
