"""`OuroborosLM`: lm-eval's Hugging Face model (HFLM) for Ouroboros checkpoints, registered as `ouroboros`.

    lm_eval --model ouroboros --model_args pretrained=EXPORTED_DIR[,num_steps=K] --tasks ...
    lm_eval --model ouroboros --model_args pretrained=BASE_DIR,peft=ADAPTER_DIR[,num_steps=K] --tasks ...
    lm_eval --model ouroboros --model_args pretrained=BASE_DIR --tasks ...          (the unmodified base model)

Everything lm-eval does with the model (tokenisation, batching, right padding for loglikelihood, left padding
with an attention mask for generation, rolling windows) is HFLM's; this class only loads the model and checks
the arguments. Loading runs every check that needs no weights first (argument names, that `peft=` is an
Ouroboros adapter, that it was made for this base, the depth override), so bad input fails with one clear
message before anything heavy happens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from ouroboros_plugins.surgery import FINGERPRINT_FIELDS
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from . import MODEL_NAME

# HFLM options that keep their meaning here. Anything else is refused (HFLM would pass unknown keys on to
# `from_pretrained`, where a typo is silently ignored or fails deep inside transformers).
PASSTHROUGH_ARGS = (
    "max_length",
    "tokenizer",
    "add_bos_token",
    "prefix_token_id",
    "truncation",
    "logits_cache",
    "softmax_dtype",
    "use_fast_tokenizer",
)
OWN_ARGS = ("pretrained", "peft", "num_steps", "dtype", "batch_size", "max_batch_size", "device")
ACCEPTED_ARGS = OWN_ARGS + PASSTHROUGH_ARGS
# Compared before loading (the core's fingerprint fields); the weight signatures are compared by the
# PEFT load itself.
CONFIG_FINGERPRINT_FIELDS = FINGERPRINT_FIELDS


@dataclass
class Source:
    """What `model_args` asked for, checked: an exported checkpoint, a base model + adapter, or a base model."""

    kind: str  # "exported" | "peft" | "base"
    pretrained: str
    peft: Optional[str] = None
    num_steps: Optional[int] = None  # the override, None = the checkpoint's own depth
    method: dict = field(default_factory=dict)  # the Ouroboros fields of the checkpoint or adapter config

    @property
    def rows(self) -> Optional[int]:
        """The deepest recurrence the per-step tables can serve."""
        if self.kind == "base":
            return None
        return self.method.get("max_steps") or self.method.get("num_steps")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is not a JSON object")
    return data


def _base_config(pretrained: str) -> dict:
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"pretrained={pretrained} is a directory without config.json, not a model directory")
        return _read_json(path, "model config")
    if os.path.exists(pretrained):
        raise ValueError(f"pretrained={pretrained} is a file; pass the model directory (the one holding config.json)")
    import ouroboros_peft  # noqa: F401  (registers the `ouroboros` model type with AutoConfig)
    from transformers import AutoConfig

    try:  # a Hub id, resolved like HFLM would (honours HF_HUB_OFFLINE)
        return AutoConfig.from_pretrained(pretrained).to_dict()
    except Exception as exc:
        raise ValueError(f"pretrained={pretrained} is neither a local model directory nor a loadable model id: {exc}") from exc


def _parse_num_steps(value: Any) -> Optional[int]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"num_steps must be a positive integer, got {value!r}")
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_steps must be a positive integer, got {value!r}") from None
    if steps != value and str(steps) != str(value).strip():
        raise ValueError(f"num_steps must be a positive integer, got {value!r}")
    if steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {value!r}")
    return steps


def _check_pooling(method: dict, where: str) -> None:
    """The core's one refusal of non-causal modulation (`OuroborosSpec.require_causal`), read off the config file."""
    from ouroboros_plugins import OuroborosSpec

    spec = OuroborosSpec(
        modulation=method.get("modulation", "controller"), controller_pooling=method.get("controller_pooling", "causal_mean")
    )
    try:
        spec.require_causal("be scored by lm-eval (a context would see the continuation it is scored on)")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def resolve_source(pretrained: Any, peft: Any = None, num_steps: Any = None) -> Source:
    """Check `pretrained=` / `peft=` / `num_steps=` from the config files alone (no weights, no torch work)."""
    if pretrained is None or str(pretrained).strip() == "":
        raise ValueError("model_args needs pretrained=<model directory> (an exported Ouroboros checkpoint or a base model)")
    pretrained = os.path.expanduser(str(pretrained))
    steps = _parse_num_steps(num_steps)
    config = _base_config(pretrained)
    exported = config.get("model_type") == "ouroboros"

    if peft is not None and str(peft).strip() != "":
        peft = os.path.expanduser(str(peft))
        if exported:
            raise ValueError(
                f"pretrained={pretrained} is already an exported Ouroboros checkpoint; peft= is for an adapter on top "
                "of a base model. Pass either pretrained=EXPORTED_DIR, or pretrained=BASE_DIR,peft=ADAPTER_DIR."
            )
        adapter_config = os.path.join(peft, "adapter_config.json")
        if not os.path.isdir(peft) or not os.path.isfile(adapter_config):
            raise ValueError(f"peft={peft} is not an adapter directory (expected {adapter_config})")
        from ouroboros_peft.config import NotAnOuroborosAdapter, read_adapter_config

        try:  # invalid JSON, a missing, misspelt or edited peft_type: named with the file
            method = read_adapter_config(peft, weights=False)
        except NotAnOuroborosAdapter:
            peft_type = _read_json(adapter_config, "adapter config").get("peft_type")
            raise ValueError(
                f"peft={peft} is not an Ouroboros adapter (its peft_type is {peft_type!r}); "
                "evaluate other PEFT adapters with --model hf"
            ) from None
        except ValueError as exc:
            raise ValueError(f"peft={peft}: {exc}") from None
        expected = method.get("base_fingerprint") or {}
        diffs = [
            f"{key}: adapter has {expected[key]!r}, base has {config.get(key)!r}"
            for key in CONFIG_FINGERPRINT_FIELDS
            if expected.get(key) is not None and config.get(key) is not None and expected[key] != config[key]
        ]
        if diffs:
            raise ValueError(f"peft={peft} was made for a different base model than pretrained={pretrained}: " + "; ".join(diffs))
        source = Source("peft", pretrained, peft, steps, method)
        _check_pooling(method, f"peft={peft}")
    elif exported:
        source = Source("exported", pretrained, None, steps, config)
        _check_pooling(config, f"pretrained={pretrained}")
    else:
        if steps is not None:
            raise ValueError(
                f"num_steps={steps} only applies to Ouroboros models, and pretrained={pretrained} is a plain "
                f"{config.get('model_type')!r} model without peft="
            )
        return Source("base", pretrained, None, None, {})

    if steps is not None and steps > source.rows:
        raise ValueError(
            f"num_steps={steps} is deeper than this checkpoint's per-step tables allow (max_steps={source.rows}); "
            f"choose 1..{source.rows}"
        )
    return source


def load_ouroboros_adapter(base_model, adapter_dir: str, num_steps: Optional[int] = None):
    """`PeftModel.from_pretrained` with the depth set to `num_steps` (<= the adapter's max_steps)."""
    from peft import PeftModel

    from ouroboros_peft import OuroborosConfig

    config = OuroborosConfig.from_pretrained(adapter_dir)  # also checks the weights file reads back
    if num_steps is not None:
        # The per-step tables keep their size (max_steps rows); only the number of applied steps changes.
        config.max_steps = config.rows
        config.num_steps = num_steps
        config.validate_spec()
    try:
        return PeftModel.from_pretrained(base_model, adapter_dir, config=config)
    except ValueError as exc:
        raise ValueError(f"peft={adapter_dir}: {exc}") from exc


def load_exported(path: str, dtype: Any, num_steps: Optional[int] = None, config: Optional[dict] = None):
    """An exported checkpoint in `dtype` ("auto": the dtype saved in its config). OuroborosForCausalLM keeps its
    Ouroboros modules (Controller / static table, step norms, gate, SVD bases) in float32 at any dtype."""
    from transformers import AutoModelForCausalLM

    overrides = {"num_steps": num_steps} if num_steps is not None else {}
    if dtype == "auto" or dtype is None:
        saved = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
        dtype = getattr(torch, str(saved).replace("torch.", ""), torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides)


class OuroborosLM(HFLM):
    """HFLM for Ouroboros. model_args: pretrained, peft, num_steps, dtype, batch_size, max_batch_size, device
    (default: cuda when available, else cpu), plus HFLM's max_length, tokenizer, add_bos_token, prefix_token_id,
    truncation, logits_cache, softmax_dtype, use_fast_tokenizer."""

    def __init__(
        self,
        pretrained: Any = None,
        peft: Optional[str] = None,
        num_steps: Any = None,
        dtype: Any = "auto",
        batch_size: Any = 1,
        max_batch_size: Optional[int] = 64,
        device: Optional[str] = None,
        **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - set(PASSTHROUGH_ARGS))
        if unknown:
            raise ValueError(
                f"unknown model_args for --model {MODEL_NAME}: {', '.join(unknown)}. "
                f"Accepted: {', '.join(ACCEPTED_ARGS)}"
            )
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise ValueError("pretrained= must be a model directory; to wrap an already-loaded model use HFLM(pretrained=model)")
        if dtype is not None and not isinstance(dtype, torch.dtype) and str(dtype) != "auto":
            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise ValueError(f"dtype={dtype!r} is not a torch dtype (use auto, float32, bfloat16 or float16)")
        self._source = resolve_source(pretrained, peft, num_steps)
        import ouroboros_peft  # noqa: F401  (Auto classes for exported checkpoints, the OUROBOROS PEFT type)

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(
            pretrained=self._source.pretrained,
            backend="causal",
            peft=self._source.peft,
            dtype=dtype if dtype is not None else "auto",
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            device=str(device),
            **kwargs,
        )

    # -- loading -------------------------------------------------------------------------------------
    def _create_model(self, pretrained: str, dtype: Any = "auto", **_ignored) -> None:
        from transformers import AutoModelForCausalLM

        source = self._source
        torch_dtype = get_dtype(dtype)
        if source.kind == "exported":
            model = load_exported(pretrained, torch_dtype, source.num_steps, source.method)
        else:
            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype)
            if source.kind == "peft":
                model = load_ouroboros_adapter(model, source.peft, source.num_steps)
        self._model = model.eval()
        self._config = getattr(model, "config", self._config)

    # -- forward ---------------------------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Causal LM logits without building a KV cache (lm-eval right-pads loglikelihood batches; with causal
        attention and causal pooling the padding cannot reach the scored positions)."""
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(input_ids=inps, use_cache=False).logits

    # -- reporting -------------------------------------------------------------------------------------
    def ouroboros_info(self) -> dict:
        """What was evaluated: the kind of checkpoint and the depth actually run."""
        source = self._source
        info = {"kind": source.kind, "pretrained": source.pretrained, "peft": source.peft}
        plan = self.active_plan()
        if plan is not None:
            method = source.method
            info.update(
                num_steps=plan.num_steps,
                max_steps=source.rows,
                modulation=method.get("modulation"),
                controller_pooling=method.get("controller_pooling"),
                num_prelude_layers=len(plan.prelude),
                num_coda_layers=len(plan.coda),
            )
        return info

    def active_plan(self):
        """The LayerPlan the loaded model runs (None for a plain base model)."""
        model = self._model
        if self._source.kind == "exported":
            return model.plan
        if self._source.kind == "peft":
            wrapper = model.base_model.model.model
            return wrapper.plans[wrapper.active_ouroboros()]
        return None

    def get_model_info(self) -> dict:
        """Like HFLM's, without asking the Hub about local paths; plus the Ouroboros settings."""
        params = list(self._model.parameters())
        return {
            "model_num_parameters": sum(p.numel() for p in params),
            "model_dtype": str(params[0].dtype) if params else "",
            "model_revision": self.revision,
            "model_sha": "",
            "ouroboros": self.ouroboros_info(),
        }


# `import lm_eval.models.huggingface` above has run lm_eval.models (so the built-in models are registered and,
# with the start-up hook installed, the lazy `ouroboros` placeholder too); this replaces the placeholder by the
# class, or registers it when the hook is switched off.
try:
    model_registry.register(MODEL_NAME)(OuroborosLM)
except ValueError:  # a different object already holds the name (e.g. this module was reloaded): keep it
    pass
