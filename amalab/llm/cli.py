"""``amalab llm STAGE CONFIG [--out DIR]``: the LLM pipeline's stages, on one process or under ``torchrun``."""

from __future__ import annotations

import dataclasses

from amalab.llm import pipeline
from amalab.llm.config import load_llm_config
from amalab.training.distributed import close_world, init_world
from amalab.llm.precision import resolve_device


def run_llm_command(stage: str, config_path: str, show_progress: bool = True, out: str | None = None) -> int:
    """Run ``stage`` of the experiment in ``config_path``; ``out``, if given, replaces the config's ``out``."""
    config = load_llm_config(config_path)
    if out:
        config = dataclasses.replace(config, out=out)
    world = init_world(resolve_device(config.device), config.ddp_timeout)
    try:
        if stage == "specialists":
            pipeline.run_all(config, ("specialists",), world, show_progress)
        elif stage == "run":
            pipeline.run_all(config, ("specialists", "generalists"), world, show_progress)
        elif stage == "train":
            pipeline.run_all(config, ("generalists",), world, show_progress)
        else:
            pipeline.reevaluate(config, world, show_progress)
    finally:
        close_world(world)
    return 0
