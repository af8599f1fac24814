"""ouroboros-plugins: the framework-neutral Ouroboros core (pure torch + pluggy + safetensors).

Host frameworks (PEFT/transformers, vLLM, lm-eval) live in separate distributions under adapters/.
Names are imported on first use (PEP 562), so the `ouroboros` command, its plugins and `import ouroboros_plugins`
do not import torch until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS = {
    "DEFAULT_TARGETS": ".config",
    "LayerPlan": ".config",
    "OuroborosSpec": ".config",
    "Controller": ".controller",
    "PoolState": ".controller",
    "StaticModulation": ".controller",
    "pool": ".controller",
    "HostAdapter": ".hookspecs",
    "hookimpl": ".hookspecs",
    "hookspec": ".hookspecs",
    "Bases": ".lora",
    "LowRank": ".lora",
    "LowRankPath": ".lora",
    "modulated_linear": ".lora",
    "svd_bases": ".lora",
    "all_backbones": ".plugins",
    "describe_plugins": ".plugins",
    "find_backbone": ".plugins",
    "get_plugin_manager": ".plugins",
    "HostCheck": ".plugins",
    "PluginProblem": ".plugins",
    "check_host": ".plugins",
    "host_adapters": ".plugins",
    "plugin_problems": ".plugins",
    "Gate": ".recurrence",
    "Host": ".recurrence",
    "OuroborosAdapter": ".recurrence",
    "StepNorms": ".recurrence",
    "recur": ".recurrence",
    "run": ".dense",
    "build_adapter": ".surgery",
    "check_fingerprint": ".surgery",
    "fingerprint": ".surgery",
    "plan_for": ".surgery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
