"""A few AdamW steps of a tiny Ouroboros PEFT model, optionally sharded with torch's FSDP2 per decoder layer.

    torchrun --nproc-per-node 2 tests/fsdp_train.py --out DIR --shard    (gloo, CPU)
    torchrun --nproc-per-node 1 tests/fsdp_train.py --out DIR            (the unsharded reference)

--shard: `fully_shard` on every decoder layer, then on the causal LM as the root. With --accelerate-config FILE
the model is sharded by accelerate's own FSDP2 code instead, from the plugin that `accelerate launch
--config_file FILE` would build (its mixed precision left out, so the run compares with the fp32 reference).
--checkpointing adds gradient checkpointing (the recurrence is recomputed in backward, re-gathering the layers).

Every run sees the same global batch per step (4 sequences of 32 tokens from a seeded generator); rank k takes
the k-th contiguous slice of it. Rank 0 writes, per architecture, DIR/<arch>/losses.json (global mean loss per
step), DIR/<arch>/{initial,final}.safetensors (the full trainable adapter tensors before and after training) and
DIR/<arch>/grads.safetensors (their full gradients at the first step). tests/test_fsdp.py compares the sharded
runs against the reference.

OUROBOROS_FSDP_BYPASS=1 makes `call_layer` treat sharded layers as plain ones (its FSDP path off): the negative
control, which must fail with the mixed Tensor/DTensor error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ARCHS, ouro_config, randomize_adapter, tiny_model  # noqa: E402

GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 32, (4, 96)


def decoder_layers(peft_model):
    """The decoder layers of the base model, behind PEFT's wrapper and the Ouroboros decoder."""
    return peft_model.base_model.model.model.base_layer.layers


def accelerate_plugin(config_file, num_processes: int):
    """The `FullyShardedDataParallelPlugin` that a script started by `accelerate launch --config_file FILE` gets:
    the launcher's own argument handling and environment, then the plugin read from that environment. Mixed
    precision is not part of it (the `Accelerator` adds it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(config_file), "--num_processes", str(num_processes), "--main_process_port", "0", "train.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if not args.use_fsdp:
        raise ValueError(f"{config_file} does not select FSDP")
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return FullyShardedDataParallelPlugin()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shard_with_accelerate(model, config_file):
    """accelerate's FSDP2 preparation of `model` (one unit per `_no_split_modules` layer, the input embeddings, the
    output head, the PEFT model as root). A real `Accelerator` turns FSDP on only with GPUs, so this passes the few
    attributes that `fsdp2_prepare_model` reads."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerate_plugin(config_file, dist.get_world_size())
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
        torch_device_mesh=None,
    )
    return fsdp2_prepare_model(accelerator, model)


def full_trainable(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every trainable tensor (or its gradient), unsharded: a collective under FSDP, all ranks must call it."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.grad if grads else p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def train(arch: str, args) -> None:
    from peft import get_peft_model
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the global batch ({GLOBAL_BATCH}) must split evenly over {world} ranks")
    model = get_peft_model(tiny_model(arch, seed=0), ouro_config())
    randomize_adapter(model, seed=1)  # off the zero init, so every adapter parameter gets a real gradient
    model.train()
    if args.checkpointing:
        model.base_model.model.gradient_checkpointing_enable()
    if args.shard and args.accelerate_config:
        model = shard_with_accelerate(model, args.accelerate_config)
    elif args.shard:
        for layer in decoder_layers(model):
            fully_shard(layer)
        # The root is the causal LM inside PEFT's wrappers: it owns the embeddings, final norm, lm_head and the
        # adapter, and its forward is the one PeftModel's forward ends in.
        fully_shard(model.base_model.model)
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    initial = full_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    data = torch.Generator().manual_seed(1234)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for _ in range(args.steps):
        batch = torch.randint(*VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=data)
        ids = batch[rank * per_rank : (rank + 1) * per_rank]
        # No padding, same token count per rank: the mean of the ranks' mean losses is the global mean, and
        # FSDP's gradient reduce-scatter averages over ranks to match.
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if not losses:
            first_grads = full_trainable(model, grads=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    final = full_trainable(model)

    if rank == 0:
        target = args.out / arch
        target.mkdir(parents=True, exist_ok=True)
        meta = {"arch": arch, "world_size": world, "fsdp_units": units, "losses": losses}
        (target / "losses.json").write_text(json.dumps(meta))
        save_file(initial, str(target / "initial.safetensors"))
        save_file(final, str(target / "final.safetensors"))
        save_file(first_grads, str(target / "grads.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", action="store_true", help="fully_shard every decoder layer, then the root")
    parser.add_argument("--accelerate-config", type=Path, help="with --shard: shard as accelerate does with this config")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if os.environ.get("OUROBOROS_FSDP_BYPASS") == "1":
        import ouroboros_plugins.layer

        ouroboros_plugins.layer._fsdp_module_class = lambda: None
    dist.init_process_group("gloo")
    try:
        for arch in args.arch:
            train(arch, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
