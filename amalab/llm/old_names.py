"""Config keys renamed to the name TRL's ``DPOConfig`` (with transformers' ``TrainingArguments``) gives the
same setting (README, "Names a TRL user knows").

Each table maps an old key to (its new name, whose name that is). :func:`amalab.config.load_section` refuses
a config that still uses an old key, in one line naming the new one; the README's table lists every entry
(a test compares the two).
"""

TRL = "TRL's name"

#: [train] and [specialists.optim] (:class:`amalab.llm.config.OptimConfig`)
OPTIM_OLD_NAMES = {
    "steps": ("max_steps", TRL),
    "lr": ("learning_rate", TRL),
    "grad_clip": ("max_grad_norm", TRL),
    "eval_every": ("eval_steps", TRL),
    "checkpoint_every": ("save_steps", TRL),
    "keep_checkpoints": ("save_total_limit", TRL),
    "eval_batch_size": ("per_device_eval_batch_size", TRL),
    "min_lr_ratio": ("min_lr_rate", "TRL's lr_scheduler_kwargs name for the cosine_with_min_lr schedule"),
}

#: [loss] (:class:`amalab.llm.losses.PreferenceLoss`)
LOSS_OLD_NAMES = {"name": ("loss_type", TRL)}

#: [model] (:class:`amalab.llm.config.ModelConfig`)
MODEL_OLD_NAMES = {"compile": ("torch_compile", TRL)}

#: config table -> its old names
OLD_NAMES = {"train": OPTIM_OLD_NAMES, "specialists.optim": OPTIM_OLD_NAMES, "loss": LOSS_OLD_NAMES,
             "model": MODEL_OLD_NAMES}
