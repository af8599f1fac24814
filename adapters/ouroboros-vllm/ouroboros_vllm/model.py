"""`OuroborosForCausalLM` for vLLM: Prelude -> N modulated recurrent steps -> Coda, on vLLM's flattened
token layout ([num_tokens, hidden] for the whole batch) and paged KV cache.

Structure (every module takes `prefix`; the attention prefixes hold exactly one integer, unique per
KV-cache slot, as vLLM requires):

    model.embed_tokens
    model.layers.{0..P-1}           prelude: vLLM's own decoder layers (the class the backbone names)
    model.layers.{P}                the recurrent layer (vLLM's decoder layer); its attention is step 0's slot
    model.layers.{P+t}.attn         t = 1..N-1: one more `Attention` per step (own KV cache, shared weights)
    model.layers.{P+N+k}            coda: vLLM decoder layers
    model.layers.{P+N+C+j}.attn     causal_mean only: the pooling slots (see `CausalMeanPool`)
    model.norm, lm_head
    model.ouroboros                 the core's `OuroborosAdapter` (bases, controller/static, step norms, gate), fp32

The checkpoint stores the recurrent layer once at `model.layers.{P}` and the coda at P+1..P+C; the mapping
in `load_weights` shifts the coda by N-1.

The recurrence is the core's (`ouroboros_plugins.recurrence.recur`: step, gate, norms, coda LoRA, fp32 residual
stream) and so is the layer's arithmetic (the backbone's `layer`, `ouroboros_plugins.layer.llama_style_layer`):
this module only supplies vLLM's pieces of them. `VllmHost` is the core's `Host` (prelude and plain coda as vLLM's
own layer calls, step t's KV-cache slot, the causal_mean statistic from the paged cache); `VllmPieces` is one
layer's pieces (fused q/k/v and gate/up matmuls split per projection, vLLM's rotary and paged attention), so the
low-rank paths (`ouroboros_plugins.lora.LowRank`) are added to each projection's slice of the fused output. The
decoder-layer class comes from the backbone plugin (`Backbone.vllm_layer`); nothing here names a model family.

Tensor parallel (tensor_parallel_size = W): vLLM's layers hold their rank's shard; the Ouroboros adapter is
built with this rank's projection shapes (`TPLayout`) and its low-rank factors are sliced at load the way vLLM
slices the weight they modulate (B rows for q/k/v/gate/up, A columns for o_proj/down_proj);
`row_parallel_reduce` (the host's `LowRank` reduce) all-reduces the row-parallel z. Controller, static table, step
norms and gate read the full hidden state, which every rank holds: they are replicated. Pipeline parallel is refused (front end: `checkpoint.verify_parallel`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix

from ouroboros_plugins import OuroborosAdapter, find_backbone
from ouroboros_plugins.layer import GATE_UP, QKV
from ouroboros_plugins.recurrence import recur

from .config import serving_spec

# Tensor parallelism, per projection: vLLM shards the output dim of the column-parallel ones (qkv, gate_up) and
# the input dim of the row-parallel ones (o_proj, down_proj; the backbone's `row_parallel`). The low-rank factors
# follow: column-parallel -> A [r, d_in] replicated, B [d_out, r] row-sliced to this rank's output shard;
# row-parallel -> A column-sliced to this rank's input shard, B replicated, and z = x_shard A_shard^T summed over
# the TP group before m and B.


def decoder_layer(backbone, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    """vLLM's decoder layer for this family (`backbone.vllm_layer`, "module:Class"), built with whichever of
    vllm_config / config / cache_config / quant_config / prefix its constructor takes."""
    module, name = backbone.vllm_layer.split(":")
    cls = getattr(importlib.import_module(module), name)
    offered = {
        "vllm_config": vllm_config,
        "config": vllm_config.model_config.hf_config,
        "cache_config": vllm_config.cache_config,
        "quant_config": vllm_config.quant_config,
        "prefix": prefix,
    }
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in offered.items() if key in accepted})


class TPLayout:
    """This rank's share of each target projection, read off the recurrent layer's own vLLM modules (so it
    slices exactly as vLLM's weight loaders do, GQA KV-head replication included).
    `slices[(proj, "A"|"B")] = (dim, start, size, full)`: the rank's part of a checkpoint factor is
    `tensor.narrow(dim, start, size)`; `full` is the checkpoint's size along dim. Identity at W = 1."""

    def __init__(self, layer: nn.Module, hidden: int, intermediate: int):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = attn.qkv_proj, mlp.gate_up_proj
        self.tp_rank, self.tp_size = qkv.tp_rank, qkv.tp_size
        q, kv = attn.q_size, attn.kv_size  # per rank
        kv_rank = qkv.tp_rank // qkv.num_kv_head_replicas  # ranks sharing a replicated KV head read the same rows
        inter = intermediate // self.tp_size
        total_kv = qkv.total_num_kv_heads * qkv.head_size  # kv_size of the whole model
        column = {
            "q_proj": (q * self.tp_rank, q, q * self.tp_size),
            "k_proj": (kv * kv_rank, kv, total_kv),
            "v_proj": (kv * kv_rank, kv, total_kv),
            "gate_proj": (inter * gate_up.tp_rank, inter, intermediate),
            "up_proj": (inter * gate_up.tp_rank, inter, intermediate),
        }
        row = {
            "o_proj": (q * attn.o_proj.tp_rank, q, q * self.tp_size),
            "down_proj": (inter * mlp.down_proj.tp_rank, inter, intermediate),
        }
        self.slices = {(name, "B"): (0, *spec) for name, spec in column.items()}
        self.slices.update({(name, "A"): (1, *spec) for name, spec in row.items()})
        self.shapes = {name: (size, hidden) for name, (_, size, _) in column.items()}  # [d_out, d_in] per rank
        self.shapes.update({name: (hidden, size) for name, (_, size, _) in row.items()})

    def shard(self, proj: str, factor: str, tensor: torch.Tensor):
        """This rank's part of checkpoint factor `proj`_`factor`, or None when its size along the sharded dim is
        not the model's (the caller reports a wrong shape)."""
        rule = self.slices.get((proj, factor))
        if rule is None:
            return tensor
        dim, start, size, full = rule
        if tensor.dim() != 2 or tensor.shape[dim] != full:
            return None
        return tensor.narrow(dim, start, size)


class StepSlot(nn.Module):
    """The KV-cache slot of one extra recurrence step: an `Attention` shaped like the recurrent layer's, no weights."""

    def __init__(self, like: nn.Module, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.attn = Attention(
            like.attn.num_heads,
            like.attn.head_size,
            like.scaling,
            num_kv_heads=like.attn.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.attn",
        )


class PoolSlot(nn.Module):
    """Stores h_t (a slice of it) in a KV cache so `causal_mean` can read every earlier position."""

    def __init__(self, num_kv_heads: int, head_dim: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.attn = Attention(
            num_kv_heads,
            head_dim,
            1.0,
            num_kv_heads=num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.attn",
        )


class CausalMeanPool:
    """`causal_mean` pooling on vLLM's own machinery: the mean of h_t over positions <= i is exactly causal
    attention with all scores equal (q = k = 0 -> uniform softmax weights) and values v_j = h_t[j]. Each step
    therefore gets `groups` attention slots of the model's own KV shape (num_kv_heads x head_dim each, so the
    KV cache stays one uniform group) whose values are h_t split into slices. The statistic then lives in the
    paged KV cache: it survives decode steps, chunked prefill, preemption and prefix caching (cached blocks
    hold the same h_t, a function of the prefix alone) with no per-request state of ours.
    Precision: the values are stored in the KV-cache dtype (the model dtype), h_t's own dtype."""

    def __init__(self, hidden: int, num_kv_heads: int, head_dim: int):
        self.hidden = hidden
        self.width = num_kv_heads * head_dim
        self.groups = math.ceil(hidden / self.width)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def __call__(self, slots: list, h: torch.Tensor) -> torch.Tensor:
        tokens = h.shape[0]
        padded = self.groups * self.width
        v_all = h if padded == self.hidden else torch.nn.functional.pad(h, (0, padded - self.hidden))
        zeros = h.new_zeros(tokens, self.width)
        outs = [slot.attn(zeros, zeros, v_all[:, g * self.width : (g + 1) * self.width].contiguous()) for g, slot in enumerate(slots)]
        return torch.cat(outs, dim=-1)[:, : self.hidden].to(torch.float32)


class VllmPieces:
    """One vLLM Llama-style decoder layer's pieces for the core's layer arithmetic (`LayerPieces`): tensors
    [tokens, features]; projections through the layer's fused matmuls, split per projection; rotary and paged
    attention through `kv` (the KV-cache slot of this call). Inputs are cast to the model dtype at each piece (the
    recurrence's residual stream is fp32)."""

    def __init__(self, layer: nn.Module, kv: Attention, positions: torch.Tensor, sizes: dict, dtype: torch.dtype):
        self.layer, self.kv, self.positions, self.sizes, self.dtype = layer, kv, positions, sizes, dtype
        attn, mlp = layer.self_attn, layer.mlp
        self.fused = {QKV: attn.qkv_proj, ("o_proj",): attn.o_proj, GATE_UP: mlp.gate_up_proj, ("down_proj",): mlp.down_proj}

    def input_norm(self, h):
        return self.layer.input_layernorm(h.to(self.dtype))  # no residual argument: returns a new tensor

    def post_attention_norm(self, h):
        return self.layer.post_attention_layernorm(h.to(self.dtype))

    def project(self, names, x):
        y, _ = self.fused[names](x.to(self.dtype))
        return list(y.split([self.sizes[name] for name in names], dim=-1)) if len(names) > 1 else [y]

    def attend(self, q, k, v):
        q, k = self.layer.self_attn.rotary_emb(self.positions, q.to(self.dtype), k.to(self.dtype))
        return self.kv(q, k, v.to(self.dtype))

    def activate(self, gate, up):
        return self.layer.mlp.act_fn(torch.cat([gate, up], dim=-1).to(self.dtype))


class VllmHost:
    """The core's `recurrence.Host` on vLLM for one forward: flattened tokens [T, d], vLLM's layers and caches."""

    def __init__(self, model: "OuroborosModel", positions: torch.Tensor):
        self.model, self.positions = model, positions
        self.num_steps, self.num_coda = model.num_steps, model.num_coda
        self.reduce = model.row_parallel_reduce if model.tp.tp_size > 1 and model.row_reduce else None

    def _plain(self, layers, h):
        residual = None
        for layer in layers:
            h, residual = layer(self.positions, h, residual)
        return h if residual is None else h + residual  # vLLM layers hand back (branch output, residual)

    def prelude(self, h):
        return self._plain(self.model.layers[: self.model.num_prelude], h)

    def pooled(self, t, h):
        return self.model.pooled(t, h)

    def recurrent(self, t, h, lowrank):
        model = self.model
        return model.run_layer(model.layers[model.num_prelude], model.step_attention(t), self.positions, h, lowrank)

    def coda(self, k, h, lowrank=None):
        model = self.model
        layer = model.layers[model.num_prelude + model.num_steps + k]
        if lowrank is None:
            return self._plain([layer], h)
        return model.run_layer(layer, layer.self_attn.attn, self.positions, h, lowrank)

    def final_norm(self, h):
        return self.model.norm(h)


class OuroborosModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size != 1:  # normally refused in the front end (checkpoint.verify_parallel)
            raise ValueError("ouroboros-vllm does not support pipeline parallelism: serve with pipeline_parallel_size=1")
        self.spec = spec = serving_spec(config)
        self.backbone = backbone = find_backbone(config.base_model_type)
        self.config = config
        p, n, c = spec.num_prelude_layers, spec.num_steps, spec.num_coda_layers
        self.num_prelude, self.num_steps, self.num_coda = p, n, c

        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        layers: list[nn.Module] = [decoder_layer(backbone, vllm_config, f"{prefix}.layers.{i}") for i in range(p + 1)]
        recurrent_attn = layers[p].self_attn.attn
        layers += [StepSlot(layers[p].self_attn, vllm_config, f"{prefix}.layers.{p + t}") for t in range(1, n)]
        layers += [decoder_layer(backbone, vllm_config, f"{prefix}.layers.{p + n + k}") for k in range(c)]
        self.pool = None
        if spec.modulation == "controller" and spec.controller_pooling == "causal_mean":
            self.pool = CausalMeanPool(config.hidden_size, recurrent_attn.num_kv_heads, recurrent_attn.head_size)
            first = p + n + c
            layers += [
                PoolSlot(self.pool.num_kv_heads, self.pool.head_dim, vllm_config, f"{prefix}.layers.{first + j}")
                for j in range(n * self.pool.groups)
            ]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        self.tp = TPLayout(self.layers[p], config.hidden_size, config.intermediate_size)
        self.row_reduce = True  # False only in the TP test's negative control (a deliberately wrong model)
        self.sizes = {name: shape[0] for name, shape in self.tp.shapes.items()}  # this rank's output width per projection
        self.dtype = vllm_config.model_config.dtype
        shapes = self.tp.shapes  # this rank's [d_out, d_in]: the adapter's bases and coda LoRA are built sharded
        device = torch.empty(()).device  # vLLM builds the model under its target device
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # Ouroboros state is fp32 whatever the model dtype (as in HF)
        try:
            self.ouroboros = OuroborosAdapter(spec, config.hidden_size, shapes, float(config.rms_norm_eps), device=device)
        finally:
            torch.set_default_dtype(previous)
        self.ouroboros.requires_grad_(False)

    # -- layout ----------------------------------------------------------------------------------
    def step_attention(self, t: int) -> Attention:
        p = self.num_prelude
        return self.layers[p].self_attn.attn if t == 0 else self.layers[p + t].attn

    def pool_slots(self, t: int) -> list:
        first = self.num_prelude + self.num_steps + self.num_coda + t * self.pool.groups
        return [self.layers[first + g] for g in range(self.pool.groups)]

    def checkpoint_to_module(self, name: str) -> str:
        """Checkpoint name inside `model.` -> this module's name: the coda moves up by N - 1 slots."""
        if name.startswith("layers."):
            index, rest = name[len("layers.") :].split(".", 1)
            index = int(index)
            if index > self.num_prelude:
                index += self.num_steps - 1
            return f"layers.{index}.{rest}"
        return name

    def adapter_part(self, ckpt_name: str, tensor: torch.Tensor):
        """This rank's part of an `ouroboros.` checkpoint tensor: the low-rank factors of the recurrent bases and
        of the coda LoRA are sliced like the projection they modulate (`TPLayout`); everything else (controller,
        static table, norms, gate) is replicated. None when a sharded factor has the wrong size."""
        leaf = ckpt_name.rsplit(".", 1)[-1]
        if ckpt_name.startswith(("ouroboros.bases.", "ouroboros.coda_lora.")) and leaf[-2:] in ("_A", "_B"):
            return self.tp.shard(leaf[:-2], leaf[-1], tensor)
        return tensor

    # -- forward ---------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def pooled(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """What step t's Controller reads: the causal mean from the pooling slots, or the token itself."""
        if self.pool is not None:
            return self.pool(self.pool_slots(t), h.to(self.dtype))
        return h.to(torch.float32)

    def row_parallel_reduce(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """`LowRank`'s reduce under tensor parallelism: a row-parallel projection sees this rank's slice of its
        input, so z = x A^T is a partial sum: summed over the TP group (vLLM's RowParallelLinear all-reduces y
        itself, so the delta is then added to the full output on every rank)."""
        return tensor_model_parallel_all_reduce(z) if name in self.backbone.row_parallel else z

    def run_layer(self, layer: nn.Module, kv: Attention, positions: torch.Tensor, h: torch.Tensor, lowrank) -> torch.Tensor:
        """A vLLM decoder layer through the backbone's layer arithmetic, attending through `kv`, plus `lowrank`."""
        return self.backbone.layer(VllmPieces(layer, kv, positions, self.sizes, self.dtype), h, lowrank)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return recur(self.ouroboros, VllmHost(self, positions), h)


class OuroborosForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": list(QKV), "gate_up_proj": list(GATE_UP)}  # vLLM's Llama-style layers

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = OuroborosModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def checkpoint_to_module(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (module tensor name, shard id or None)."""
        if name.startswith("ouroboros."):
            return "model." + name, None
        if name.startswith("model."):
            name = "model." + self.model.checkpoint_to_module(name[len("model.") :])
        if name.startswith("model.layers."):
            parent, proj, leaf = name.rsplit(".", 2)
            stacked = self.model.backbone.vllm_stacked
            if proj in stacked:
                fused, shard = stacked[proj]
                return f"{parent}.{fused}.{leaf}", shard
        return name, None

    def module_to_checkpoint(self, name: str, shard) -> str:
        """The inverse of `checkpoint_to_module`, for error messages."""
        if name.startswith("model.ouroboros."):
            return name[len("model.") :]
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers.") :].split(".", 1)
            index = int(index)
            if index > self.model.num_prelude:
                index -= self.model.num_steps - 1
            if shard is not None:
                parent, fused, leaf = rest.rsplit(".", 2)
                proj = next(p for p, (f, s) in self.model.backbone.vllm_stacked.items() if f == fused and s == shard)
                rest = f"{parent}.{proj}.{leaf}"
            return f"model.layers.{index}.{rest}"
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict: every parameter and buffer must be filled exactly once, every checkpoint tensor used."""
        targets = dict(self.named_parameters())
        targets.update(dict(self.model.ouroboros.named_buffers(prefix="model.ouroboros")))
        shards: dict = {}
        for fused, shard in self.model.backbone.vllm_stacked.values():
            shards.setdefault(fused, []).append(shard)
        expected = {(name, shard) for name in targets for shard in shards.get(name.rsplit(".", 2)[-2], (None,))}
        filled: set = set()
        unexpected, wrong, nonfinite = [], [], []
        for ckpt_name, tensor in weights:
            name, shard = self.checkpoint_to_module(ckpt_name)
            if name not in targets:
                unexpected.append(ckpt_name)
                continue
            target = targets[name]
            loader = getattr(target, "weight_loader", None)
            if shard is None and loader is None:  # vLLM's own loaders (padded vocab, shards) check their shapes
                part = self.model.adapter_part(ckpt_name, tensor)  # this rank's part of a sharded factor
                if part is None or tuple(target.shape) != tuple(part.shape):
                    wrong.append(f"{ckpt_name} {tuple(tensor.shape)} (expected {tuple(target.shape)} on this rank)")
                    continue
                if ckpt_name.startswith("ouroboros.") and not bool(torch.isfinite(part).all()):
                    nonfinite.append(ckpt_name)  # the adapter's own tensors: NaN / inf would serve NaN logits
                    continue
                default_weight_loader(target, part)
            elif shard is None:
                loader(target, tensor)
            else:
                target.weight_loader(target, tensor, shard)
            filled.add((name, shard))
        missing = sorted(self.module_to_checkpoint(n, s) for n, s in expected - filled)
        if unexpected or wrong or missing or nonfinite:
            raise ValueError(
                "checkpoint does not match the Ouroboros model: "
                f"missing {missing[:8]}, unexpected {sorted(unexpected)[:8]}, wrong shapes {wrong[:8]}, "
                f"NaN or inf values {sorted(nonfinite)[:8]}"
            )
        return set(targets)
