"""`OuroborosLMConfig`: config.json of an exported checkpoint (`ouroboros export`), with the checks every reader
needs before it builds a model.

config.json is the base family's own config, flat (num_hidden_layers = P + 1 + C physical layers), plus
`base_model_type`, `original_num_hidden_layers` and every `OuroborosSpec` field.
"""

from __future__ import annotations

from typing import Optional

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ouroboros_plugins import OuroborosSpec

MODEL_TYPE = "ouroboros"
ARCHITECTURE = "OuroborosForCausalLM"  # distinct from vLLM's OuroForCausalLM (another looped model)
SPEC_FIELDS = tuple(OuroborosSpec.__dataclass_fields__)


class OuroborosLMConfig(PretrainedConfig):
    """The base model's config fields (flat, with num_hidden_layers = P + 1 + C physical layers), plus
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


def spec_from_config(config) -> OuroborosSpec:
    """The OuroborosSpec of an exported config, checked for consistency (what every host needs before building
    a model). Raises ValueError naming the field."""
    if getattr(config, "model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"not an exported Ouroboros checkpoint: model_type={config.model_type!r}, expected {MODEL_TYPE!r}")
    defaults = OuroborosSpec()
    fields = {name: getattr(config, name, getattr(defaults, name)) for name in SPEC_FIELDS}
    rows, steps = fields["max_steps"], fields["num_steps"]
    if isinstance(rows, int) and isinstance(steps, int) and steps > rows:
        raise ValueError(
            f"num_steps={steps} is deeper than this checkpoint allows: its per-step tables (step embedding, step "
            f"norms, static modulation) have max_steps={rows} rows; use num_steps <= {rows} "
            f"(vLLM: --hf-overrides '{{\"num_steps\": {rows}}}')"
        )
    try:
        spec = OuroborosSpec(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid Ouroboros settings in the checkpoint config: {exc}") from exc
    layers = getattr(config, "num_hidden_layers", None)
    expected = spec.num_prelude_layers + 1 + spec.num_coda_layers
    if layers != expected:
        raise ValueError(
            f"config has num_hidden_layers={layers} but prelude ({spec.num_prelude_layers}) + recurrent (1) + coda "
            f"({spec.num_coda_layers}) = {expected}"
        )
    return spec


class _LazyModel:
    """AutoModelForCausalLM's entry for `OuroborosLMConfig` until `ouroboros_peft` (which holds the transformers
    model and registers it over this entry) is imported: resolves to that class on first use."""

    config_class = OuroborosLMConfig

    @staticmethod
    def _target():
        try:
            from ouroboros_peft import OuroborosForCausalLM
        except ImportError as exc:
            raise ImportError("loading an exported Ouroboros checkpoint with transformers needs ouroboros-peft installed") from exc
        return OuroborosForCausalLM

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._target().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls._target()._from_config(config, **kwargs)

    from_config = _from_config


def register_config() -> None:
    """Idempotent: AutoConfig learns the `ouroboros` model type (and AutoModelForCausalLM a lazy entry for it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, OuroborosLMConfig)
    try:
        AutoModelForCausalLM.register(OuroborosLMConfig, _LazyModel)
    except ValueError:
        pass  # the real model class (ouroboros_peft) or this entry is already there
