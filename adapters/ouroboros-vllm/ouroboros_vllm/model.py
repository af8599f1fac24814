"""`OuroborosForCausalLM` for vLLM: Prelude -> N modulated recurrent steps -> Coda, on vLLM's flattened
token layout ([num_tokens, hidden] for the whole batch) and paged KV cache.

Structure (every module takes `prefix`; the attention prefixes hold exactly one integer, unique per
KV-cache slot, as vLLM requires):

    model.embed_tokens
    model.layers.{0..P-1}           prelude: vLLM's own Llama/Qwen2 decoder layers
    model.layers.{P}                the recurrent layer (vLLM's decoder layer); its attention is step 0's slot
    model.layers.{P+t}.attn         t = 1..N-1: one more `Attention` per step (own KV cache, shared weights)
    model.layers.{P+N+k}            coda: vLLM decoder layers
    model.layers.{P+N+C+j}.attn     causal_mean only: the pooling slots (see `CausalMeanPool`)
    model.norm, lm_head
    model.ouroboros                 the core's `OuroborosAdapter` (bases, controller/static, step norms, gate), fp32

The checkpoint stores the recurrent layer once at `model.layers.{P}` and the coda at P+1..P+C; the mapping
in `load_weights` shifts the coda by N-1. One step (the core's math, see ouroboros_plugins.recurrence):

    m_t = Controller(pool(h_t), t) | static[t]
    u_t = layer(h_t) with y = W x + b + (alpha/r) B (m_t * A x) on each target projection
    h_{t+1} = g * RMSNorm_t(u_t) + (1 - g) * h_t

With `coda_lora_r > 0` every projection of coda layer k also carries a LoRA (`ouroboros.coda_lora.layers.k.*`):
y = W x + b + B (A x), scale 1, no modulation.

vLLM fuses q/k/v and gate/up into one matmul each; the low-rank deltas are computed per projection and
added to their slice (`_with_deltas`). The step is written out with the layer's own modules rather than
calling the layer (`layer_forward`): the layer's forward passes its input on as the residual, which vLLM's
fused add+RMSNorm overwrites in place (on GPU), and the gate still needs h_t. Nothing here writes into h_t.
A coda with a LoRA runs through the same `layer_forward`; a plain coda is vLLM's own layer call.

Tensor parallel (tensor_parallel_size = W): vLLM's layers hold their rank's shard; the Ouroboros adapter is
built with this rank's projection shapes (`TPLayout`) and its low-rank factors are sliced at load the way vLLM
slices the weight they modulate (B rows for q/k/v/gate/up, A columns for o_proj/down_proj); `_with_deltas`
all-reduces the row-parallel z. Controller, static table, step norms and gate read the full hidden state,
which every rank holds: they are replicated. Pipeline parallel is refused (front end: `checkpoint.verify_parallel`).
"""

from __future__ import annotations

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

from ouroboros_plugins import OuroborosAdapter

from .config import spec_from_config

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
PROJECTIONS = QKV + ("o_proj",) + GATE_UP + ("down_proj",)

# checkpoint projection -> (vLLM fused parameter, shard id); one table for loading, one loop in load_weights.
STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
SHARDS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}
# Tensor parallelism, per projection: vLLM shards the output dim of the column-parallel ones (qkv, gate_up) and
# the input dim of the row-parallel ones (o_proj, down_proj). The low-rank factors follow: column-parallel ->
# A [r, d_in] replicated, B [d_out, r] row-sliced to this rank's output shard; row-parallel -> A column-sliced
# to this rank's input shard, B replicated, and z = x_shard A_shard^T summed over the TP group before m and B.
ROW_PARALLEL = ("o_proj", "down_proj")


def decoder_layer(base_model_type: str, vllm_config: VllmConfig, prefix: str) -> nn.Module:
    config = vllm_config.model_config.hf_config
    if base_model_type == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

        return Qwen2DecoderLayer(
            config=config, cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=prefix
        )
    if base_model_type == "llama":
        from vllm.model_executor.models.llama import LlamaDecoderLayer

        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    raise ValueError(f"base_model_type={base_model_type!r} is not supported (llama, qwen2)")


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


class OuroborosModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size != 1:  # normally refused in the front end (checkpoint.verify_parallel)
            raise ValueError("ouroboros-vllm does not support pipeline parallelism: serve with pipeline_parallel_size=1")
        self.spec = spec = spec_from_config(config)
        self.config = config
        p, n, c = spec.num_prelude_layers, spec.num_steps, spec.num_coda_layers
        self.num_prelude, self.num_steps, self.num_coda = p, n, c

        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        layers: list[nn.Module] = [decoder_layer(config.base_model_type, vllm_config, f"{prefix}.layers.{i}") for i in range(p + 1)]
        recurrent_attn = layers[p].self_attn.attn
        layers += [StepSlot(layers[p].self_attn, vllm_config, f"{prefix}.layers.{p + t}") for t in range(1, n)]
        layers += [decoder_layer(config.base_model_type, vllm_config, f"{prefix}.layers.{p + n + k}") for k in range(c)]
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

    def modulation(self, t: int, h: torch.Tensor) -> dict:
        if self.spec.modulation == "static":
            return self.ouroboros.static(t)
        if self.pool is not None:
            pooled = self.pool(self.pool_slots(t), h)
        else:  # token pooling: position i reads itself
            pooled = h.to(torch.float32)
        return self.ouroboros.controller(pooled, t)

    def step_lora(self, m: dict) -> dict:
        """The recurrent layer's low-rank paths under modulation m: name -> (A [r, d_in], B [d_out, r], m [T, r])."""
        return {name: (*self.ouroboros.bases.pair(name), m[name]) for name in m}

    def coda_lora(self, k: int) -> dict:
        """Coda layer k's LoRA: name -> (A [r, d_in], B [d_out, r], None), every projection, unmodulated."""
        layer = self.ouroboros.coda_lora.layers[k]
        return {name: (getattr(layer, f"{name}_A"), getattr(layer, f"{name}_B"), None) for name in PROJECTIONS}

    def _with_deltas(self, y: torch.Tensor, x: torch.Tensor, names: tuple, lora: dict, scale: float) -> torch.Tensor:
        """The one place for "projection + low-rank delta". y = the (fused) projection's output on this rank
        [T, sum of its parts], x its input; add scale * B (m * A x) (fp32, m = 1 when None) to the slice of each
        projection in `lora` (name -> (A, B, m), this rank's factors). Row-parallel projections see only this
        rank's slice of x, so z = x A^T is a partial sum: summed over the TP group first (y itself is already
        all-reduced by vLLM's RowParallelLinear, so the delta is added to the full output on every rank)."""
        if not any(name in lora for name in names):
            return y
        parts = list(y.split([self.tp.shapes[name][0] for name in names], dim=-1))
        xf = None
        for i, name in enumerate(names):
            if name not in lora:
                continue
            a, b, m = lora[name]
            if xf is None:
                xf = x.to(a.dtype)
            z = xf @ a.t()  # [T, r]
            if name in ROW_PARALLEL and self.tp.tp_size > 1 and self.row_reduce:
                z = tensor_model_parallel_all_reduce(z)
            delta = (z if m is None else z * m) @ b.t()
            parts[i] = parts[i] + (scale * delta).to(y.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def layer_forward(
        self, layer: nn.Module, kv: Attention, positions: torch.Tensor, h: torch.Tensor, lora: dict, scale: float
    ) -> torch.Tensor:
        """A vLLM decoder layer written out with its own modules, attending through `kv` (the KV-cache slot),
        every projection plus its low-rank delta (`_with_deltas`). h [T, d] -> h + attn + mlp [T, d]."""
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)  # no residual argument: returns a new tensor
        qkv, _ = attn.qkv_proj(x)
        qkv = self._with_deltas(qkv, x, QKV, lora, scale)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        o = kv(q, k, v)
        out, _ = attn.o_proj(o)
        mid = h + self._with_deltas(out, o, ("o_proj",), lora, scale)

        x = layer.post_attention_layernorm(mid)
        gate_up, _ = mlp.gate_up_proj(x)
        gate_up = self._with_deltas(gate_up, x, GATE_UP, lora, scale)
        act = mlp.act_fn(gate_up)
        down, _ = mlp.down_proj(act)
        return mid + self._with_deltas(down, act, ("down_proj",), lora, scale)

    def step(self, t: int, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        lora = self.step_lora(self.modulation(t, h))
        u = self.layer_forward(self.layers[self.num_prelude], self.step_attention(t), positions, h, lora, self.spec.scale)
        return self.ouroboros.update(u, h, t)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[: self.num_prelude]:
            h, residual = layer(positions, h, residual)
        if residual is not None:
            h = h + residual  # vLLM layers hand back (branch output, residual); the hidden state is their sum
        for t in range(self.num_steps):
            h = self.step(t, positions, h)
        first = self.num_prelude + self.num_steps
        coda = self.layers[first : first + self.num_coda]
        if self.spec.coda_lora_r:
            for k, layer in enumerate(coda):
                h = self.layer_forward(layer, layer.self_attn.attn, positions, h, self.coda_lora(k), 1.0)
            return self.norm(h)
        residual = None
        for layer in coda:
            h, residual = layer(positions, h, residual)
        if residual is None:
            return self.norm(h)
        h, _ = self.norm(h, residual)
        return h


class OuroborosForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": list(QKV), "gate_up_proj": list(GATE_UP)}

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
            if proj in STACKED:
                fused, shard = STACKED[proj]
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
                proj = next(p for p, (f, s) in STACKED.items() if f == fused and s == shard)
                rest = f"{parent}.{proj}.{leaf}"
            return f"model.layers.{index}.{rest}"
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict: every parameter and buffer must be filled exactly once, every checkpoint tensor used."""
        targets = dict(self.named_parameters())
        targets.update(dict(self.model.ouroboros.named_buffers(prefix="model.ouroboros")))
        expected = {(name, shard) for name in targets for shard in SHARDS.get(name.rsplit(".", 2)[-2], (None,))}
        filled: set = set()
        unexpected, wrong = [], []
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
                default_weight_loader(target, part)
            elif shard is None:
                loader(target, tensor)
            else:
                target.weight_loader(target, tensor, shard)
            filled.add((name, shard))
        missing = sorted(self.module_to_checkpoint(n, s) for n, s in expected - filled)
        if unexpected or wrong or missing:
            raise ValueError(
                "checkpoint does not match the Ouroboros model: "
                f"missing {missing[:8]}, unexpected {sorted(unexpected)[:8]}, wrong shapes {wrong[:8]}"
            )
        return set(targets)
