"""lm-evaluation-harness integration: the `ouroboros` model for `lm_eval --model ouroboros`.

This module stays import-light (it runs from the start-up hook of every interpreter in the environment):
`OuroborosLM` is imported from `ouroboros_lm_eval.model` on first attribute access.
"""

from __future__ import annotations

__version__ = "0.1.0"
MODEL_NAME = "ouroboros"
MODEL_TARGET = "ouroboros_lm_eval.model:OuroborosLM"

__all__ = ["MODEL_NAME", "MODEL_TARGET", "OuroborosLM", "register"]


def register() -> None:
    """Register `ouroboros` with lm-eval's model registry (idempotent; imports nothing heavy).

    `lm_eval.models` is imported first: lm-eval only fills its registry with the built-in models (`hf`, ...)
    when the registry is empty at lookup time, so registering into an empty registry would hide them.
    """
    import lm_eval.models  # noqa: F401  (a dict of lazy paths; no torch)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def __getattr__(name: str):
    if name == "OuroborosLM":
        from .model import OuroborosLM

        return OuroborosLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
