"""The mixer's part of a TRL checkpoint: the mixer, the task samplers and the draw generator, saved into the
Trainer's ``checkpoint-N`` folder and put back by ``AMATrainer.train(resume_from_checkpoint=...)``, so a
resumed run draws and weights exactly as the uninterrupted one (docs/maths.md section 8).

The Trainer writes a checkpoint folder file by file, not atomically: a run killed while saving leaves a
partial ``checkpoint-N``. :data:`MIXER_STATE` is written last and atomically (file and folder fsynced), so it
marks a complete checkpoint; resuming takes the newest folder that has it and says which it passed over.
``AMATrainer`` prunes old folders (``save_total_limit``) only after that file is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from amalab.atomic_write import write_json_atomic
from amalab.mixers import Mixer
from amalab.training.checkpoint import plain_state, unplain_state
from amalab.training.sampler import TaskSampler

#: the file that completes a checkpoint folder
MIXER_STATE = "amalab_mixer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def save_mixer_state(folder: Path, mixer: Mixer, sampler: TaskSampler, draw_rng: np.random.Generator) -> None:
    """Write the mixer's part of checkpoint ``folder`` (last, atomically: it marks the folder complete)."""
    write_json_atomic(Path(folder) / MIXER_STATE, {
        "mixer": plain_state({key: np.asarray(value) for key, value in mixer.state_dict().items()}),
        "sampler": sampler.state_dict(), "draw_rng": plain_state(draw_rng.bit_generator.state)})


def load_mixer_state(folder: Path, mixer: Mixer, sampler: TaskSampler, draw_rng: np.random.Generator) -> None:
    state = json.loads((Path(folder) / MIXER_STATE).read_text())
    mixer.load_state_dict(unplain_state(state["mixer"]))
    sampler.load_state_dict(state["sampler"])
    draw_rng.bit_generator.state = unplain_state(state["draw_rng"])


def complete_checkpoint(output_dir: Path, log=print) -> Path | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` with the mixer's state; the incomplete ones newer
    than it (a save that was interrupted) are named in one line each."""
    folders = sorted(((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                      if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()), reverse=True)
    for _, folder in folders:
        if (folder / MIXER_STATE).is_file():
            return folder
        log(f"{folder}: incomplete checkpoint (a save was interrupted): passed over")
    return None


def resume_folder(output_dir: Path, resume_from_checkpoint: str | bool) -> Path:
    """The checkpoint a ``train(resume_from_checkpoint=...)`` call continues from (ValueError: none, or the
    folder given is incomplete)."""
    if resume_from_checkpoint is True:
        folder = complete_checkpoint(output_dir)
        if folder is None:
            raise ValueError(f"{output_dir}: no complete checkpoint to resume from")
        return folder
    folder = Path(resume_from_checkpoint)
    if not (folder / MIXER_STATE).is_file():
        raise ValueError(f"{folder}: not a complete AMATrainer checkpoint (no {MIXER_STATE}: a save was "
                         "interrupted, or another trainer wrote it); resume_from_checkpoint=True takes the "
                         "newest complete one")
    return folder
