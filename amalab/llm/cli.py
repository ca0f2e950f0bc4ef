"""``amalab llm STAGE CONFIG``: the LLM pipeline's stages, on one process or under ``torchrun``."""

from __future__ import annotations

from amalab.llm.config import load_llm_config
from amalab.llm.distributed import close_world, init_world
from amalab.llm.models import resolve_device


def run_llm_command(stage: str, config_path: str, show_progress: bool = True) -> int:
    from amalab.llm import pipeline

    config = load_llm_config(config_path)
    world = init_world(resolve_device(config.device))
    try:
        if stage == "specialists":
            pipeline.run_all(config, ("specialists",), world, show_progress)
        elif stage in ("run", "train"):
            pipeline.run_all(config, ("specialists", "generalists"), world, show_progress)
        else:
            pipeline.reevaluate(config, world, show_progress)
    finally:
        close_world(world)
    return 0
