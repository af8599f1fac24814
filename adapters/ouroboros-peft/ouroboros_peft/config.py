"""`OuroborosConfig`: the PEFT config of the Ouroboros tuner (the core's `OuroborosSpec` plus PEFT's fields)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ouroboros_plugins import OuroborosSpec

from .registration import NAME, extend_peft_type

WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class OuroborosConfig(PeftConfig, OuroborosSpec):
    """Configuration of an Ouroboros adapter; every method field is documented on `OuroborosSpec`.

    >>> model = get_peft_model(base, OuroborosConfig(num_prelude_layers=8, num_coda_layers=8, num_steps=4, r=32))
    """

    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Set when the adapter is created: architecture, shapes and recurrent-layer hash of the base model. Loading onto another base is refused."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type(NAME)
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        self.validate_spec()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config and, for a local adapter, check its weights file reads back completely *before*
        the base model is touched, so a corrupt or truncated file leaves the model unchanged."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(path):
            check_weights_file(os.path.join(path, WEIGHTS_NAME))
        return config


def check_weights_file(path: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} at {os.path.dirname(path)} (Ouroboros adapters are saved as safetensors only)")
    try:
        load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt or truncated and was not loaded: {exc}") from exc

