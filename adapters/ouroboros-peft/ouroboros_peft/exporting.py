"""`ouroboros export`: base model + Ouroboros adapter -> one standalone checkpoint directory.

Everything is checked before any work starts (OUT may not be, lie inside or contain an input folder; the dtype is
one of `DTYPES`), the checkpoint is written to a temporary directory beside OUT_DIR and swapped into place at the
end (`atomic_dir`), so a failed or killed export leaves OUT as it was, and never destroys an input.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ouroboros_plugins.atomic import atomic_dir

from .config import read_adapter_config
from .modeling import ARCHITECTURE, SPEC_FIELDS, OuroborosLMConfig

DROP_KEYS = ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map", "num_hidden_layers", "layer_types")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_out_dir(out_dir: Path, inputs: dict) -> None:
    """OUT must not be, lie inside, or contain an input folder: replacing it (--overwrite) would destroy that input."""
    out = out_dir.resolve()
    for what, folder in inputs.items():
        src = folder.resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = "is" if out == src else ("lies inside" if src in out.parents else "contains")
            raise ValueError(f"--out {out_dir} {relation} the {what} folder {folder}; export to a separate folder")


def check_dtype(dtype) -> None:
    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")


def check_inputs(base_dir: Path, adapter_dir: Path, out_dir: Path, overwrite: bool, dtype=None) -> dict:
    check_dtype(dtype)
    check_out_dir(out_dir, {"base model": base_dir, "adapter": adapter_dir})
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {base_dir} has no config.json")
    # adapter_config.json valid JSON with peft_type "OUROBOROS", adapter_model.safetensors (never a pickled .bin)
    # complete; its tensors are checked against the config when PeftModel.from_pretrained builds the adapter
    adapter_cfg = read_adapter_config(adapter_dir)
    if not any((base_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer in {base_dir} (expected tokenizer.json, tokenizer.model or vocab.json)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    return adapter_cfg


def exported_state_dict(peft_model) -> tuple:
    """(tensors, full base config, OuroborosSpec, LayerPlan) for the active adapter of a PEFT-wrapped model."""
    causal_lm = peft_model.base_model.model
    wrapper = causal_lm.model
    name = wrapper.active_ouroboros()
    if name is None:
        raise ValueError("the model has no active Ouroboros adapter")
    decoder, adapter, plan = wrapper.base_layer, wrapper.ouroboros_adapter[name], wrapper.plans[name]
    tensors = {f"model.embed_tokens.{k}": v for k, v in decoder.embed_tokens.state_dict().items()}
    for new, old in enumerate(plan.prelude + (plan.recurrent,) + plan.coda):
        tensors.update({f"model.layers.{new}.{k}": v for k, v in decoder.layers[old].state_dict().items()})
    tensors.update({f"model.norm.{k}": v for k, v in decoder.norm.state_dict().items()})
    if not causal_lm.config.tie_word_embeddings:
        tensors["lm_head.weight"] = causal_lm.lm_head.weight
    tensors.update({f"ouroboros.{k}": v for k, v in adapter.state_dict().items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return tensors, causal_lm.config, adapter.spec, plan


def exported_config(base_config, spec, plan) -> OuroborosLMConfig:
    fields = {k: v for k, v in base_config.to_dict().items() if k not in DROP_KEYS}
    kept = plan.prelude + (plan.recurrent,) + plan.coda
    layer_types = getattr(base_config, "layer_types", None)
    if layer_types:
        fields["layer_types"] = [layer_types[i] for i in kept]
    fields.update({name: getattr(spec, name) for name in SPEC_FIELDS})
    fields["recurrent_layer_index"] = plan.recurrent  # its index in the original model, for provenance
    fields["max_steps"] = spec.rows  # the per-step tables' size: the deepest recurrence this checkpoint can run
    config = OuroborosLMConfig(
        base_model_type=base_config.model_type,
        original_num_hidden_layers=base_config.num_hidden_layers,
        num_hidden_layers=len(kept),
        **fields,
    )
    config.architectures = [ARCHITECTURE]
    return config


def export(base_dir, adapter_dir, out_dir, overwrite: bool = False, dtype=None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files to `out_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import ouroboros_peft  # noqa: F401  (registers the PEFT type)

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    check_inputs(base_dir, adapter_dir, out_dir, overwrite, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype or "auto")
    peft_model = PeftModel.from_pretrained(base, adapter_dir)  # refuses an adapter made for another base
    tensors, base_config, spec, plan = exported_state_dict(peft_model)
    config = exported_config(base_config, spec, plan)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            generation = GenerationConfig.from_pretrained(base_dir)
        except OSError:
            generation = GenerationConfig.from_model_config(base_config)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def load_exported(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` for an exported directory (after registering the classes)."""
    from transformers import AutoModelForCausalLM

    import ouroboros_peft  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


