"""AMA inside TRL: ``AMAConfig`` and ``AMATrainer`` bring amalab's task mixers to TRL's ``DPOTrainer``.

    from amalab.trl import AMAConfig, AMATrainer

    args = AMAConfig(output_dir="out", mixer="ama-s", gamma=0.3)   # a DPOConfig with the mixer's settings
    trainer = AMATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()                                                # dataset: a "task" and a "baseline_loss" column
"""

from amalab.trl.config import AMAConfig
from amalab.trl.trainer import AMATrainer
from amalab.trl.versions import warn_untested

warn_untested()

__all__ = ["AMAConfig", "AMATrainer"]
