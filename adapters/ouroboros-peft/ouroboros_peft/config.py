"""`OuroborosConfig`: the PEFT config of the Ouroboros tuner (the core's `OuroborosSpec` plus PEFT's fields)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ouroboros_plugins import OuroborosSpec

from .registration import NAME, extend_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT writes with safe_serialization=False: never loaded here
PEFT_TYPE = "OUROBOROS"


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
        """Load the config and, for a local adapter, check adapter_config.json (valid JSON, peft_type "OUROBOROS")
        and that its weights file is safetensors and reads back completely *before* the base model is touched, so
        a bad or truncated file leaves the model unchanged."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(path):
            read_adapter_config(path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if os.path.isdir(path):
            # not a dataclass field (never saved): lets injection check every tensor against the adapter it builds,
            # before the model is changed
            config.weights_file = os.path.join(path, WEIGHTS_NAME)
        return config


# Fields only an Ouroboros adapter's config has (r, lora_alpha and target_modules are LoRA's too): a file with them
# whose peft_type is something else was edited, not written by another PEFT method.
OUROBOROS_ONLY_FIELDS = tuple(f for f in (*OuroborosSpec.__dataclass_fields__, "base_fingerprint") if f not in ("r", "lora_alpha", "target_modules"))


class NotAnOuroborosAdapter(ValueError):
    """adapter_config.json of another PEFT method (its peft_type names it, and it has no Ouroboros fields)."""


def check_peft_type(data: dict, path: str) -> None:
    """Refuse a missing, misspelt or edited `peft_type` in the adapter config `data` read from `path`, with a
    ValueError naming the file and the field (PEFT itself answers these with a KeyError or a TypeError from deep in
    another tuner)."""
    peft_type = data.get("peft_type")
    if peft_type == PEFT_TYPE:
        return
    ours = [f for f in OUROBOROS_ONLY_FIELDS if f in data]
    if "peft_type" not in data or peft_type is None:
        what = "has no peft_type field" if "peft_type" not in data else "has peft_type null"
        fix = (f'it holds an Ouroboros adapter\'s fields ({", ".join(ours[:4])}): set "peft_type": "{PEFT_TYPE}"' if ours
               else "PEFT needs it to know which method wrote the adapter")
        raise ValueError(f"{path} {what}; {fix}")
    if isinstance(peft_type, str) and peft_type.strip().upper() == PEFT_TYPE:
        raise ValueError(f'{path}: peft_type must be "{PEFT_TYPE}" exactly (PEFT matches it case-sensitively), got {peft_type!r}')
    if ours:
        raise ValueError(
            f"{path}: peft_type is {peft_type!r}, but the file holds an Ouroboros adapter's fields ({', '.join(ours[:4])}); "
            f'it was edited: set "peft_type" back to "{PEFT_TYPE}"'
        )
    raise NotAnOuroborosAdapter(f"{path} is not an Ouroboros adapter (peft_type={peft_type!r})")


def read_adapter_config(folder, weights: bool = True) -> dict:
    """The adapter_config.json of an Ouroboros adapter folder, checked before anything is built from it: present,
    valid JSON, a JSON object, peft_type "OUROBOROS"; with `weights`, adapter_model.safetensors present (a pickled
    adapter_model.bin is refused by name) and readable. Every error names the file (and the field)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter directory {folder} has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text: {exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (the adapter's fields), got a JSON {type(data).__name__}")
    check_peft_type(data, path)
    if weights:
        check_weights_file(os.path.join(folder, WEIGHTS_NAME))
    return data


def check_weights_file(path: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        pickled = os.path.join(os.path.dirname(path), PICKLE_WEIGHTS_NAME)
        if os.path.isfile(pickled):
            raise ValueError(
                f"{pickled} is a pickled PyTorch file (save_pretrained(safe_serialization=False)); Ouroboros adapters "
                f"are loaded from {WEIGHTS_NAME} only and nothing here unpickles: save the adapter again with "
                "save_pretrained(folder)"
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} at {os.path.dirname(path)} (Ouroboros adapters are saved as safetensors only)")
    try:
        load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt or truncated and was not loaded: {exc}") from exc



def check_adapter_weights(source, adapter) -> None:
    """Every tensor of the adapter weights at `source` (a safetensors path, or a state dict in the same key format)
    against the adapter built from its config (names, shapes, finite values), so a mismatch is refused before the
    model is touched. Raises ValueError naming the file, the tensors and, for shape mismatches, the config fields
    that set them."""
    from contextlib import nullcontext

    from safetensors import safe_open

    marker = ".ouroboros_adapter."
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    found, problems = {}, []
    if isinstance(source, (str, os.PathLike)):
        label, opened = os.fspath(source), safe_open(os.fspath(source), framework="pt")
    else:
        label, opened = "the adapter state dict", nullcontext(source)
    with opened as f:
        get = f.get_tensor if hasattr(f, "get_tensor") else f.__getitem__
        for key in f.keys():
            if marker not in key:
                problems.append(f"unexpected tensor {key}")
                continue
            found[key.split(marker, 1)[1]] = key
        for name, key in found.items():
            if name not in expected:
                problems.append(f"unexpected tensor {key}")
                continue
            tensor = get(key)
            if tuple(tensor.shape) != expected[name]:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, the adapter config needs {expected[name]}")
            elif tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                problems.append(f"{name} holds NaN or inf values")
    problems += [f"missing tensor {name}" for name in sorted(set(expected) - set(found))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(
            f"{label} does not match its adapter_config.json (num_steps / max_steps, r, target_modules, modulation, "
            f"use_gate, coda_lora_r set the shapes): {shown}. Nothing was loaded; the model is unchanged"
        )
