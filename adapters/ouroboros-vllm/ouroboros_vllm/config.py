"""The `ouroboros` config type as vLLM needs it, without peft.

Why a class of our own: `ouroboros_peft` defines the same config (with the exported model), but importing
any of its modules imports peft, and every vLLM process (front end, engine core, workers) would pay for it
and require it. This class reads the same config.json; the serving model only reads attributes, so an
instance of either class works.

Both packages may run in one process (an HF reference next to a vLLM engine). Whichever registers the
`ouroboros` model type with AutoConfig first wins:
- `ouroboros_peft` first: we leave its classes alone.
- we first: transformers' AutoModelForCausalLM maps our class to `_ExportedModelProxy`, which loads the
  real model class from `ouroboros_peft` when it is used, so `AutoModelForCausalLM.from_pretrained(OUT_DIR)`
  works whatever the import order.
"""

from __future__ import annotations

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ouroboros_plugins import OuroborosSpec

MODEL_TYPE = "ouroboros"
SPEC_FIELDS = tuple(OuroborosSpec.__dataclass_fields__)
SUPPORTED_BASES = ("llama", "qwen2")


class OuroborosLMConfig(PretrainedConfig):
    """Flat config of an exported checkpoint: the base family's fields (num_hidden_layers = P + 1 + C),
    `base_model_type`, `original_num_hidden_layers` and every `OuroborosSpec` field."""

    model_type = MODEL_TYPE

    def __init__(self, base_model_type: str = "llama", original_num_hidden_layers: Optional[int] = None, **kwargs):
        self.base_model_type = base_model_type
        self.original_num_hidden_layers = original_num_hidden_layers
        defaults = OuroborosSpec()
        for name in SPEC_FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        super().__init__(**kwargs)

    def spec(self) -> OuroborosSpec:
        return spec_from_config(self)


class _ExportedModelProxy:
    """AutoModelForCausalLM entry for `OuroborosLMConfig` above: resolves to `ouroboros_peft`'s model class
    on first use (the transformers implementation lives there)."""

    config_class = OuroborosLMConfig

    @staticmethod
    def _target(config):
        try:
            from ouroboros_peft import OuroborosForCausalLM
        except ImportError as exc:  # pragma: no cover - ouroboros-peft is installed alongside in this repo
            raise ImportError("loading an exported Ouroboros checkpoint with transformers needs ouroboros-peft installed") from exc
        if config is not None and not isinstance(config, OuroborosForCausalLM.config_class):
            config = OuroborosForCausalLM.config_class.from_dict(config.to_dict())
        return OuroborosForCausalLM, config

    @classmethod
    def from_pretrained(cls, *args, config=None, **kwargs):
        target, config = cls._target(config)
        return target.from_pretrained(*args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        target, config = cls._target(config)
        return target._from_config(config, **kwargs)

    from_config = _from_config


def register_config_classes() -> None:
    """Idempotent. Registers `ouroboros` with AutoConfig unless something (ouroboros_peft) already has."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, OuroborosLMConfig)
    try:
        AutoModelForCausalLM.register(OuroborosLMConfig, _ExportedModelProxy)
    except ValueError:
        pass


def spec_from_config(config) -> OuroborosSpec:
    """The OuroborosSpec of an exported config (ours, ouroboros_peft's, or anything with the same attributes),
    checked for what serving needs. Raises ValueError naming the problem."""
    if getattr(config, "model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"not an exported Ouroboros checkpoint: model_type={config.model_type!r}, expected {MODEL_TYPE!r}")
    defaults = OuroborosSpec()
    fields = {name: getattr(config, name, getattr(defaults, name)) for name in SPEC_FIELDS}
    rows, steps = fields["max_steps"], fields["num_steps"]
    if isinstance(rows, int) and isinstance(steps, int) and steps > rows:
        raise ValueError(
            f"num_steps={steps} is deeper than this checkpoint allows: its per-step tables (step embedding, step "
            f"norms, static modulation) have max_steps={rows} rows; serve with num_steps <= {rows} "
            f"(vLLM: --hf-overrides '{{\"num_steps\": {rows}}}')"
        )
    try:
        spec = OuroborosSpec(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid Ouroboros settings in the checkpoint config: {exc}") from exc
    if spec.modulation == "controller" and spec.controller_pooling == "sequence_mean":
        raise ValueError(
            "controller_pooling='sequence_mean' cannot be served: every position would read future tokens, so "
            "nothing can be generated token by token. Export an adapter trained with controller_pooling='causal_mean' "
            "or 'token' (or modulation='static')"
        )
    base = getattr(config, "base_model_type", None)
    if base not in SUPPORTED_BASES:
        raise ValueError(f"base_model_type={base!r} is not supported by ouroboros-vllm; supported: {list(SUPPORTED_BASES)}")
    layers = getattr(config, "num_hidden_layers", None)
    expected = spec.num_prelude_layers + 1 + spec.num_coda_layers
    if layers != expected:
        raise ValueError(
            f"config has num_hidden_layers={layers} but prelude ({spec.num_prelude_layers}) + recurrent (1) + coda "
            f"({spec.num_coda_layers}) = {expected}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    return spec
