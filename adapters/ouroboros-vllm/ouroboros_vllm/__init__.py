"""vLLM serving for exported Ouroboros checkpoints (`ouroboros export` output).

Installed, this distribution's `vllm.general_plugins` entry point makes `vllm serve OUT_DIR` and
`vllm.LLM(model=OUT_DIR)` work with no user import. vLLM runs the entry point in every one of its
processes, so `register()` is cheap (no model code is imported: the architecture is registered by
string) and idempotent. Nothing here imports peft.
"""

from __future__ import annotations

import logging

ARCHITECTURE = "OuroborosForCausalLM"
MODEL_CLASS = "ouroboros_vllm.model:OuroborosForCausalLM"

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]


def register() -> None:
    """The `vllm.general_plugins` entry point: architecture (lazily, by string), the `ouroboros` config
    type with transformers' AutoConfig, and the load-time checkpoint check. Safe to call any number of times."""
    from vllm import ModelRegistry

    from ouroboros_hf import register_config

    register_config()
    current = ModelRegistry.models.get(ARCHITECTURE) if hasattr(ModelRegistry, "models") else None
    target = tuple(MODEL_CLASS.split(":"))
    if current is None or (getattr(current, "module_name", None), getattr(current, "class_name", None)) != target:
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _register_config_check()


def _register_config_check() -> None:
    """Have vLLM run `ouroboros_vllm.checkpoint.verify_model_config` while it builds the ModelConfig, and
    `verify_parallel` while it builds the VllmConfig, in the process that starts the engine: a bad checkpoint or
    an unservable parallel layout (pipeline parallel, a tensor_parallel_size that does not divide the heads) is
    refused there, with its own message, before the engine process is spawned. (vLLM's per-architecture config
    hooks are an internal table; if it moves, the checkpoint checks still run when the model loads, only
    reported through the engine's log, and pipeline parallel is still refused there.)"""
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    except ImportError:  # pragma: no cover - depends on the vLLM version
        logger.warning("ouroboros_vllm: vLLM has no per-architecture config hooks; checkpoints are checked at load")
        return
    if ARCHITECTURE in MODELS_CONFIG_MAP:
        return

    class OuroborosConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            from .checkpoint import verify_model_config

            verify_model_config(model_config)

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from .checkpoint import verify_parallel

            verify_parallel(vllm_config)

    MODELS_CONFIG_MAP[ARCHITECTURE] = OuroborosConfigCheck
