"""The exported checkpoint's config class, shared by every host that reads an exported Ouroboros checkpoint.

`ouroboros_peft` (the transformers model) and `ouroboros_vllm` (the serving model) both import it from here, so
the class exists once and a vLLM process never imports peft.
"""

from .config import ARCHITECTURE, MODEL_TYPE, SPEC_FIELDS, OuroborosLMConfig, register_config, spec_from_config

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "SPEC_FIELDS", "OuroborosLMConfig", "register_config", "spec_from_config"]
