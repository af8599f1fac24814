"""`OuroborosCallback` in a user's own Trainer under torchrun: writes to `--out` (rank 0) the calibrated values and the
per-update losses, and (every rank) its adapter tensors as adapter-RANK.safetensors. Launched by tests/test_trainer.py with 1 or 2 processes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ouro_config, tiny_model  # noqa: E402


class Windows(torch.utils.data.Dataset):
    """Eight fixed random sequences, the same in every process."""

    def __init__(self):
        self.ids = torch.randint(4, 96, (8, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ouroboros_train import OuroborosCallback

    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), ouro_config(num_steps=2, max_steps=3))
    callback = OuroborosCallback(depth_range=(1, 3))
    targs = TrainingArguments(args.out, per_device_train_batch_size=args.batch_size, max_steps=2, learning_rate=3e-3,
                              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                              train_sampling_strategy="sequential", ddp_backend="gloo" if args.batch_size < 4 else None)
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[callback, Losses()])
    trainer.train()
    out = Path(args.out)
    rank = trainer.args.process_index
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(out / f"adapter-{rank}.safetensors"))
    if trainer.is_world_process_zero():
        (out / "result.json").write_text(json.dumps({"calibrated": callback.calibrated, "losses": losses}))


if __name__ == "__main__":
    main()
