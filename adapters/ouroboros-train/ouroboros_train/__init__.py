"""The Ouroboros training application: `ouroboros train` on `transformers.Trainer`, and the Trainer callback that
gives any Trainer run what Ouroboros training needs (calibration, depth sampling, divergence stop).

    from ouroboros_train import OuroborosCallback
    Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[OuroborosCallback()])

    from ouroboros_train import OuroborosDistillTrainer      # distillation from the full model (adapter disabled)
    OuroborosDistillTrainer(model=peft_model, args=args, train_dataset=ds, callbacks=[OuroborosCallback()],
                            distill_weight=0.5, distill_temperature=1.0)

Modules: `train` (`train(TrainConfig(...))`, what `ouroboros train` runs), `callback`, `distill` (the distillation
loss and Trainer), `pruned` (the practitioner's baseline: a pruned model with a standard LoRA), `default_model`
(the embedded SmolLM2-135M) and `data` (the training corpus and the held-out protocol).
"""

from .callback import DivergenceCallback, OuroborosCallback, TrainingDiverged, depth_at

__all__ = ["DivergenceCallback", "OuroborosCallback", "OuroborosDistillTrainer", "TrainingDiverged", "depth_at",
           "distillation_loss", "teacher_logits"]

_LAZY = {"OuroborosDistillTrainer": ".distill", "distillation_loss": ".distill", "teacher_logits": ".distill"}


def __getattr__(name: str):  # the Trainer subclass imports transformers.Trainer: only when asked for
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
