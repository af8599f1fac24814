"""Distillation from the full model: the teacher is the same PEFT model with its adapter disabled (no second copy of
the weights), run under `torch.no_grad()`.

    loss = (1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

both terms over the positions the cross-entropy uses (next-token targets: logits[:, :-1] against labels[:, 1:],
label -100 ignored), summed per position over the vocabulary, in fp32, and normalised the way Trainer normalises its
own causal-LM loss (by `num_items_in_batch`, the global batch's target count, when Trainer passes it; else by this
micro-batch's count). The T^2 factor keeps the KL's gradient on the scale of T = 1 when T changes (Hinton et al.).

With `transformers.Trainer` (PEFT user):

    from ouroboros_train import OuroborosCallback, OuroborosDistillTrainer
    trainer = OuroborosDistillTrainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator,
                                      callbacks=[OuroborosCallback()], distill_weight=0.5, distill_temperature=1.0)

`teacher_logits(model, inputs)` and `distillation_loss(...)` are the two halves, for a loop of your own. For a
pruned_lora model (`ouroboros_train.pruned`) the teacher is the whole unpruned base: the adapter-disabled model
alone would be the pruned one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from .pruned import full_model

IGNORE_INDEX = -100
DEFAULT_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 1.0

__all__ = ["OuroborosDistillTrainer", "check_distill_settings", "distillation_loss", "distillation_sums", "teacher_logits"]


def check_distill_settings(weight, temperature, names=("distill_weight", "distill_temperature")) -> None:
    """ValueError naming the setting unless 0 <= weight <= 1 and temperature is a finite number > 0."""
    w_name, t_name = names
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"{w_name} must be a number in [0, 1] (loss = (1 - w) * CE + w * KL), got {weight!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{t_name} must be a finite number > 0, got {temperature!r}")


def _unwrap(model):
    """The PeftModel under DDP / accelerate wrappers (`.module`)."""
    while not hasattr(model, "disable_adapter") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if not hasattr(model, "disable_adapter"):
        raise ValueError(f"distillation needs a PEFT model (its teacher is the model with the adapter disabled); got {type(model).__name__}")
    return model


@torch.no_grad()
def teacher_logits(model, inputs: dict) -> torch.Tensor:
    """The full base model's logits for `inputs` (input_ids / attention_mask / ...; labels are not passed): the PEFT
    model with its adapter disabled, the whole layer stack for a pruned_lora model. No gradient, no copy of the
    weights; the model's mode (train / eval) is left as it is."""
    peft_model = _unwrap(model)
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    kwargs.setdefault("use_cache", False)
    with peft_model.disable_adapter(), full_model(peft_model):
        return peft_model(**kwargs).logits


def distillation_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = DEFAULT_TEMPERATURE, need_kl: bool = True) -> tuple:
    """(CE sum, T^2 x KL(teacher || student) sum, positions): sums over the next-token positions whose label is not
    -100 (logits[:, :-1] against labels[:, 1:]), each position's KL summed over the vocabulary, in fp32."""
    logits = student_logits[..., :-1, :]
    targets = labels[..., 1:].to(logits.device)
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    s = logits[valid].float()  # [N, V]
    tgt = targets[valid]
    if temperature == 1.0:
        log_q = F.log_softmax(s, dim=-1)
        ce = -log_q.gather(-1, tgt[:, None]).sum()
    else:
        ce = F.cross_entropy(s, tgt, reduction="sum")
        log_q = F.log_softmax(s / temperature, dim=-1) if need_kl else None
    if not need_kl:
        return ce, torch.zeros((), device=s.device), count
    t = teacher_logits[..., :-1, :].to(s.device)[valid].float()
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True) * (temperature * temperature)
    return ce, kl, count


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                      weight: float = DEFAULT_WEIGHT, temperature: float = DEFAULT_TEMPERATURE,
                      num_items_in_batch=None) -> torch.Tensor:
    """(1 - weight) * CE + weight * T^2 * KL(teacher || student), each a sum over the CE's positions divided by
    `num_items_in_batch` (when given) or by the number of those positions. teacher_logits may be None at weight 0."""
    check_distill_settings(weight, temperature)
    ce, kl, count = distillation_sums(student_logits, teacher_logits, labels, temperature, need_kl=weight > 0)
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(ce.device)
    return ((1.0 - weight) * ce + weight * kl) / denominator


class OuroborosDistillTrainer(Trainer):
    """`transformers.Trainer` whose loss mixes the cross-entropy with the KL from the full model:
    (1 - distill_weight) * CE + distill_weight * T^2 * KL(full || adapted), T = distill_temperature.

    The model must be a PeftModel (Ouroboros, a LoRA, or `ouroboros_train.pruned`'s pruned_lora); the batch must
    carry `labels` (-100 = ignored: the KL uses exactly the CE's positions). The teacher forward runs first, under
    `torch.no_grad()`, with the adapter disabled. Normalisation, gradient accumulation and several processes are
    Trainer's: the loss is divided by `num_items_in_batch` when Trainer counts it, as its own causal-LM loss is.
    Each logged record also gets `distill_ce` and `distill_kl`: per-target means of the two terms over the updates
    since the last log, on this process's share of the batch."""

    def __init__(self, *args, distill_weight: float = DEFAULT_WEIGHT, distill_temperature: float = DEFAULT_TEMPERATURE, **kwargs):
        check_distill_settings(distill_weight, distill_temperature)
        super().__init__(*args, **kwargs)
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        self._distill_sums = None  # (ce sum, kl sum, positions) since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("OuroborosDistillTrainer needs `labels` in the batch (the positions the CE and the KL use; "
                             "DataCollatorForLanguageModeling(mlm=False) provides them)")
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        weight, temperature = self.distill_weight, self.distill_temperature
        # the teacher first: disabling the adapter toggles requires_grad, which must not happen inside the student's graph
        teacher = teacher_logits(self.accelerator.unwrap_model(model), inputs) if weight > 0 else None
        outputs = model(**inputs)
        ce, kl, count = distillation_sums(outputs.logits, teacher, labels, temperature, need_kl=weight > 0)
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(ce.device)
        loss = ((1.0 - weight) * ce + weight * kl) / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer does for its own loss: num_items_in_batch counts every process's targets, DDP averages
            loss = loss * ((self.accelerator.num_processes // self.get_tp_size()) if self.args.n_gpu <= 1 else self.args.n_gpu)
        if model.training:
            sums = torch.stack([ce.detach().float(), kl.detach().float(), count.float()])
            self._distill_sums = sums if self._distill_sums is None else self._distill_sums + sums
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._distill_sums is not None and "loss" in logs:
            ce, kl, count = self._distill_sums.tolist()
            logs["distill_ce"] = ce / max(count, 1.0)
            logs["distill_kl"] = kl / max(count, 1.0)
            self._distill_sums = None
        super().log(logs, *args, **kwargs)
