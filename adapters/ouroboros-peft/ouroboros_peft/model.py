"""`OuroborosModel`: the PEFT tuner. Injection = surgery (plan the cut, SVD bases from the removed layers)
plus wrapping the decoder in `OuroborosDecoder`. The base model's own weights are left as they are."""

from __future__ import annotations

import os
import sys

from peft.tuners.tuners_utils import BaseTuner

from ouroboros_plugins import build_adapter, check_fingerprint, find_backbone, fingerprint, plan_for

from .config import WEIGHTS_NAME, check_adapter_weights, check_weights_file
from .layer import OuroborosDecoder
from .registration import PREFIX
from .runtime import check_generation


def decoder_parent(model):
    """(parent, attribute) holding the decoder: `model.model` for transformers causal LMs."""
    attr = getattr(model, "base_model_prefix", None) or "model"
    if not hasattr(model, attr):
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (expected attribute {attr!r})")
    return model, attr


def host_call(module_path: str, function: str, max_depth: int = 12):
    """The local variables of the nearest caller frame running `function` from the file ending in `module_path`
    (e.g. transformers' `integrations/peft.py`), or None. Two host entry points hand the tuner nothing it needs:
    transformers' `load_adapter` (the folder whose weights it will load after injection) and PEFT's
    `PeftModel.save_pretrained` (`safe_serialization`). Reading them lets the tuner refuse before anything changes;
    when a host version moves them, this returns None and the tuner behaves as without the check (the hostile-load
    tests then fail)."""
    suffix = module_path.replace("/", os.sep)
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code.co_name == function and frame.f_code.co_filename.endswith(suffix):
            return frame.f_locals
    return None


def transformers_adapter_source():
    """When transformers' `model.load_adapter(...)` is injecting this adapter: the local adapter weights file or
    the state dict it is about to load (after the injection, with no way to undo it on a failure), else None."""
    call = host_call("transformers/integrations/peft.py", "load_adapter")
    if call is None:
        return None
    if call.get("adapter_state_dict") is not None:
        return call["adapter_state_dict"]
    folder = call.get("peft_model_id")
    load_config = call.get("load_config")
    subfolder = (getattr(load_config, "download_kwargs", None) or {}).get("subfolder") or ""
    if folder is None or not os.path.isdir(os.path.join(os.fspath(folder), subfolder)):
        return None  # a Hub id: transformers downloads it later; checked by the load itself only
    path = os.path.join(os.fspath(folder), subfolder, WEIGHTS_NAME)
    check_weights_file(path)  # refuses a pickled adapter_model.bin (which transformers would unpickle) by name
    return path


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
        # set when loading a saved adapter (its bases come from it): PEFT's loaders via OuroborosConfig.from_pretrained,
        # transformers' load_adapter read from its call
        weights_file = getattr(config, "weights_file", None)
        if weights_file is None:
            weights_file = transformers_adapter_source()
        expected = config.base_fingerprint
        if weights_file is not None and not (expected and (expected.get("weights") or expected.get("recurrent_layer_sha256"))):
            # every saved adapter has one, with weight signatures (or, saved before them, a layer hash): an edited file
            where = f"{os.path.dirname(weights_file)}/adapter_config.json" if isinstance(weights_file, str) else "the adapter config"
            raise ValueError(
                f"{where} has no base_fingerprint with weight signatures, so "
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
            # what unload() restores: the caller's requires_grad flags (injection freezes the base)
            self.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
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

    # -- merging, unloading, saving ------------------------------------------------------------------

    def _check_merge_allowed(self):
        """`merge_and_unload()` / `merge_adapter()` call this first: refuse before anything is changed."""
        raise ValueError(
            "an Ouroboros adapter cannot be merged into the base weights: it replaces the removed layers by one layer "
            "run num_steps times with input-dependent (Controller) modulation, a gate and per-step norms, which no "
            "single set of weights reproduces. Nothing was changed. Use unload() to get the base model back, or "
            "`ouroboros export` for a standalone checkpoint"
        )

    def _replace_module(self, parent, child_name, new_module, child):
        """unload(): put the original decoder back as it was (PEFT's default also copies `.weight` / `.bias` from
        the wrapper, which a whole decoder does not have)."""
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        saved = getattr(self, "base_requires_grad", None) or {}
        for name, param in model.named_parameters():
            if name in saved:
                param.requires_grad = saved[name]
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        save = host_call("peft/peft_model.py", "save_pretrained")
        if save is not None and save.get("safe_serialization") is False:
            raise ValueError(
                "save_pretrained(safe_serialization=False) would write a pickled adapter_model.bin, which Ouroboros "
                f"loaders refuse (nothing here unpickles); call save_pretrained(folder) to write {WEIGHTS_NAME}. "
                "No adapter file was written"
            )
        return super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict, unwanted_adapter_names=unwanted_adapter_names
        )

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
