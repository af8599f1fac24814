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
            # not a dataclass field (never saved): lets injection check every tensor against the adapter it builds,
            # before the model is changed
            config.weights_file = os.path.join(path, WEIGHTS_NAME)
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



def check_adapter_weights(path: str, adapter) -> None:
    """Every tensor of the adapter weights file at `path` against the adapter built from its config (names, shapes,
    finite values), so a mismatch is refused before the model is touched. Raises ValueError naming the file, the
    tensors and, for shape mismatches, the config fields that set them."""
    from safetensors import safe_open

    marker = ".ouroboros_adapter."
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    found, problems = {}, []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if marker not in key:
                problems.append(f"unexpected tensor {key}")
                continue
            found[key.split(marker, 1)[1]] = key
        for name, key in found.items():
            if name not in expected:
                problems.append(f"unexpected tensor {key}")
                continue
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != expected[name]:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, the adapter config needs {expected[name]}")
            elif tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                problems.append(f"{name} holds NaN or inf values")
    problems += [f"missing tensor {name}" for name in sorted(set(expected) - set(found))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(
            f"{path} does not match its adapter_config.json (num_steps / max_steps, r, target_modules, modulation, "
            f"use_gate, coda_lora_r set the shapes): {shown}. Nothing was loaded; the model is unchanged"
        )
