"""Checks an exported checkpoint against its config before vLLM builds anything.

Runs in the process that creates the engine (through vLLM's per-architecture config hook, see
`ouroboros_vllm.register`), so `vllm serve` / `LLM(...)` fail at once with a message naming the problem.
Only safetensors headers are read (names and shapes), never tensor data. The expected tensors are those of
the transformers implementation (the base family's model built on the meta device, plus the Ouroboros
adapter's state), the same set `OuroborosForCausalLM.from_pretrained` insists on.
"""

from __future__ import annotations

import json
import os

import torch

from .config import serving_spec

PER_STEP_TABLES = ("ouroboros.norms.weight", "ouroboros.controller.step_embed.weight")


def checkpoint_shapes(model_dir: str) -> dict[str, tuple]:
    """name -> shape of every tensor in the directory's safetensors file(s) (header only)."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (exported Ouroboros checkpoints are safetensors only)")
    shapes = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def expected_shapes(config) -> dict[str, tuple]:
    """name -> shape of every tensor an exported checkpoint with this config must hold."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from ouroboros_plugins import OuroborosAdapter, find_backbone

    spec = serving_spec(config)
    backbone = find_backbone(config.base_model_type)
    with torch.device("meta"):
        decoder = MODEL_MAPPING[CONFIG_MAPPING[config.base_model_type]](config)
    shapes = {f"model.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()}
    if not getattr(config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    projections = backbone.projection_shapes(decoder.layers[spec.num_prelude_layers])
    adapter = OuroborosAdapter(spec, config.hidden_size, projections, backbone.rms_eps(config), device="meta")
    shapes.update({f"ouroboros.{k}": tuple(v.shape) for k, v in adapter.state_dict().items()})
    return shapes


def compare(expected: dict, found: dict, spec, where: str) -> None:
    """Raise ValueError listing missing, unexpected and mis-shaped tensors (depth mismatches called out)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    depth = [k for k in wrong if k in PER_STEP_TABLES or k.startswith("ouroboros.static.")]
    if depth:
        rows = found[depth[0]][0]
        problems.append(
            f"depth mismatch: the per-step tables have {rows} rows ({', '.join(depth)}) but config.json says "
            f"max_steps={spec.rows} (num_steps={spec.num_steps})"
        )
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    other = [k for k in wrong if k not in depth]
    if other:
        problems.append("wrong shapes: " + ", ".join(f"{k} {found[k]} (expected {expected[k]})" for k in other[:8]))
    if problems:
        raise ValueError(f"{where} does not match its Ouroboros config: " + "; ".join(problems))


def check_checkpoint(model_dir: str, config) -> None:
    spec = serving_spec(config)
    compare(expected_shapes(config), checkpoint_shapes(model_dir), spec, f"checkpoint {model_dir}")


def verify_model_config(model_config) -> None:
    """vLLM's ModelConfig hook: settings first (pooling, depth, layer count), then the tensors of a local
    checkpoint directory."""
    config = model_config.hf_config
    serving_spec(config)
    path = str(model_config.model)
    if os.path.isdir(path):
        check_checkpoint(path, config)
    prefer_eager_on_cpu(model_config)


def verify_parallel(vllm_config) -> None:
    """vLLM's VllmConfig hook (runs before vLLM's own parallel checks and before any engine or worker process):
    refuse the parallel layouts the model cannot be served with, naming the setting.
    - pipeline_parallel_size > 1: not supported (the recurrence runs one layer N times with per-step KV slots and
      the causal_mean statistic in one stage; splitting it across stages is not implemented).
    - tensor_parallel_size must divide the attention heads and the MLP width, and the KV heads must split or
      replicate evenly (vLLM's QKVParallelLinear); the low-rank factors are then sliced the same way."""
    parallel = vllm_config.parallel_config
    config = vllm_config.model_config.hf_config
    pp = parallel.pipeline_parallel_size
    if pp != 1:
        raise ValueError(
            f"pipeline_parallel_size={pp} (--pipeline-parallel-size) is not supported by ouroboros-vllm: serve with "
            "pipeline_parallel_size=1 and spread the model with --tensor-parallel-size instead"
        )
    tp = parallel.tensor_parallel_size
    if tp == 1:
        return
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads} (must be a multiple or a divisor of it)")
    if config.intermediate_size % tp:
        problems.append(f"intermediate_size={config.intermediate_size}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={tp} (--tensor-parallel-size) does not divide this checkpoint's "
            + ", ".join(problems)
            + f"; choose a tensor_parallel_size that divides num_attention_heads={heads}"
        )


def prefer_eager_on_cpu(model_config) -> None:
    """The Ouroboros model is not torch.compile'd (its forward is plain eager code around vLLM's layers), so
    on CPU vLLM's compile warm-up (a full max_num_batched_tokens dummy batch) buys nothing and costs ~50 s of
    start-up on a small machine. Run eager there unless the user chose otherwise."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not model_config.enforce_eager:
        model_config.enforce_eager = True
