"""ouroboros-plugins: the framework-neutral Ouroboros core (pure torch + pluggy + safetensors).

Host frameworks (PEFT/transformers, vLLM, lm-eval) live in separate distributions under adapters/.
"""

from .config import DEFAULT_TARGETS, LayerPlan, OuroborosSpec
from .controller import Controller, PoolState, StaticModulation, pool
from .hookspecs import hookimpl, hookspec
from .lora import Bases, modulated_linear, svd_bases
from .plugins import all_backbones, describe_plugins, find_backbone, get_plugin_manager
from .recurrence import Gate, OuroborosAdapter, StepNorms, run
from .surgery import build_adapter, check_fingerprint, fingerprint, plan_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGETS",
    "Bases",
    "Controller",
    "Gate",
    "LayerPlan",
    "OuroborosAdapter",
    "OuroborosSpec",
    "PoolState",
    "StaticModulation",
    "StepNorms",
    "all_backbones",
    "build_adapter",
    "check_fingerprint",
    "describe_plugins",
    "find_backbone",
    "fingerprint",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "modulated_linear",
    "plan_for",
    "pool",
    "run",
    "svd_bases",
]
