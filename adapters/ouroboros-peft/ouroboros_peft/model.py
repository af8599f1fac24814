"""`OuroborosModel`: the PEFT tuner. Injection = surgery (plan the cut, SVD bases from the removed layers)
plus wrapping the decoder in `OuroborosDecoder`. The base model's own weights are left as they are."""

from __future__ import annotations

import os

from peft.tuners.tuners_utils import BaseTuner

from ouroboros_plugins import build_adapter, check_fingerprint, find_backbone, fingerprint, plan_for

from .config import check_adapter_weights
from .layer import OuroborosDecoder
from .registration import PREFIX
from .runtime import check_generation


def decoder_parent(model):
    """(parent, attribute) holding the decoder: `model.model` for transformers causal LMs."""
    attr = getattr(model, "base_model_prefix", None) or "model"
    if not hasattr(model, attr):
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (expected attribute {attr!r})")
    return model, attr


class OuroborosModel(BaseTuner):
    prefix = PREFIX
    tuner_layer_cls = OuroborosDecoder
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, *args, **kwargs):  # injection is whole-model surgery, see inject_adapter
        raise NotImplementedError

    def _check_target_module_exists(self, peft_config, key):
        return False

    def inject_adapter(self, model, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        backbone = find_backbone(model_type)
        parent, attr = decoder_parent(model)
        wrapper = getattr(parent, attr)
        decoder = wrapper.base_layer if isinstance(wrapper, OuroborosDecoder) else wrapper
        plan = plan_for(backbone, model.config, decoder, config)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        actual = fingerprint(backbone, model.config, decoder, plan, head)
        weights_file = getattr(config, "weights_file", None)  # set when loading a saved adapter: its bases come from it
        expected = config.base_fingerprint
        if weights_file is not None and not (expected and (expected.get("weights") or expected.get("recurrent_layer_sha256"))):
            # every saved adapter has one, with weight signatures (or, saved before them, a layer hash): an edited file
            raise ValueError(
                f"{os.path.dirname(weights_file)}/adapter_config.json has no base_fingerprint with weight signatures, so "
                "nothing says which base model the adapter belongs to; refusing to load it (restore the field from the "
                "original file)"
            )
        if expected:
            check_fingerprint(expected, actual)
            if not expected.get("weights"):  # saved before weight signatures: passed the older check, now upgraded
                config.base_fingerprint = actual
        else:
            config.base_fingerprint = actual
        adapter, plan = build_adapter(backbone, model.config, decoder, config, compute_bases=weights_file is None)
        if weights_file is not None:
            check_adapter_weights(weights_file, adapter)
        if not isinstance(wrapper, OuroborosDecoder):
            wrapper = OuroborosDecoder(decoder, backbone)
            setattr(parent, attr, wrapper)
        wrapper.add_adapter(adapter_name, adapter, plan)
        self.targeted_module_names.append(attr)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for p in adapter.parameters():
                p.requires_grad = False

    def generate(self, *args, **kwargs):
        """`PeftModelForCausalLM.generate` lands here; refuse what the active adapter cannot generate before any work."""
        for name in self.active_adapters:
            check_generation(self.peft_config[name], getattr(self.model, "generation_config", None), kwargs)
        return self.model.generate(*args, **kwargs)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint keys carry no adapter name: `...ouroboros_adapter.<name>.controller.mlp.0.weight` is saved
        as `...ouroboros_adapter.controller.mlp.0.weight` (PEFT builds the load mapping from this same function)."""
        return key.replace(f".ouroboros_adapter.{adapter_name}.", ".ouroboros_adapter.", 1)

    def _mark_only_adapters_as_trainable(self, model) -> None:
        for name, param in model.named_parameters():
            param.requires_grad = ".ouroboros_adapter." in name and self.active_adapter_in(name)

    def active_adapter_in(self, name: str) -> bool:
        return any(f".ouroboros_adapter.{a}." in name for a in self.active_adapters)
