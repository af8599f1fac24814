"""The Ouroboros training application: `ouroboros train` on `transformers.Trainer`, and the Trainer callback that
gives any Trainer run what Ouroboros training needs (calibration, depth sampling, divergence stop).

    from ouroboros_train import OuroborosCallback
    Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[OuroborosCallback()])

Modules: `train` (`train(TrainConfig(...))`, what `ouroboros train` runs), `callback`, `default_model` (the
embedded SmolLM2-135M) and `data` (the training corpus and the held-out protocol).
"""

from .callback import OuroborosCallback, TrainingDiverged, depth_at

__all__ = ["OuroborosCallback", "TrainingDiverged", "depth_at"]
