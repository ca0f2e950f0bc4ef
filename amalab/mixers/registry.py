"""Mixers by name, as configs and the command line refer to them (docs/maths.md sections 3, 4 and 7).

One row per name: its description, the class, the preset options, the options a user may set and those
a user must set. ``standard`` and ``uniform`` take their weights from the task sizes and k.
"""

from __future__ import annotations

import numpy as np

from amalab.mixers.ama_r import AMAR
from amalab.mixers.ama_s import AMAS
from amalab.mixers.base import Mixer, check_k
from amalab.mixers.baselines import FixedMixture

_AMA_R = ("eta_alpha", "clip", "objective", "smoothing", "baseline", "simultaneous")
_AMA_S = ("gamma", "gain_scale", "eta", "clip", "draw_per", "baseline")

#: name -> (description, class, preset options, options a user may set, options a user must set)
REGISTRY: dict[str, tuple[str, type, dict, tuple[str, ...], tuple[str, ...]]] = {
    "ama-r": ("AMA-R: exponentiated-gradient task weights on the specialist-clipped excess loss "
              "(theta steps with alpha_{t+1})",
              AMAR, {}, _AMA_R, ("eta_alpha",)),
    "ama-r-sim": ("AMA-R, simultaneous play: theta steps with alpha_t, alpha updated from the same batch "
                  "(what gradient accumulation and several ranks need)",
                  AMAR, {"simultaneous": True}, _AMA_R, ("eta_alpha",)),
    "ama-s": ("AMA-S: EXP3 task sampling on the specialist-clipped excess loss",
              AMAS, {}, _AMA_S, ("gamma",)),
    "standard": ("standard alignment: the union of the data (tasks drawn in proportion to |D_i|)",
                 FixedMixture, {"sampling": True}, (), ()),
    "uniform": ("uniform task mixture of the raw losses", FixedMixture, {}, (), ()),
    "mixture": ("fixed task mixture of the raw losses (option: weights)",
                FixedMixture, {}, ("weights",), ("weights",)),
    "doremi": ("DoReMi-style: AMA-R on the excess over the model trained on the standard mixture, "
               "smoothing 1e-3, theta on raw loss",
               AMAR, {"baseline": "standard", "smoothing": 1e-3, "objective": "loss"},
               ("eta_alpha", "smoothing", "simultaneous", "objective", "clip"), ("eta_alpha",)),
    "odm": ("ODM-style: EXP3 task sampling on the raw training loss",
            AMAS, {"baseline": "none", "clip": "none"}, ("gamma", "gain_scale", "eta", "draw_per"), ("gamma",)),
}
#: name -> one-line description
MIXERS = {name: row[0] for name, row in REGISTRY.items()}


def make_mixer(name: str, k: int, *, sizes=None, batch_shape: tuple[int, ...] = (), **options) -> Mixer:
    """Build mixer ``name`` for ``k`` tasks. ``sizes`` (|D_i|) is needed by ``standard`` only."""
    if name not in REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(REGISTRY)}")
    k = check_k(k)
    _, cls, preset, allowed, required = REGISTRY[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"mixer {name!r} takes no option {', '.join(unknown)}"
                         + (f"; valid: {', '.join(allowed)}" if allowed else ""))
    missing = [option for option in required if option not in options]
    if missing:
        raise ValueError(f"mixer {name!r} needs option {', '.join(missing)}")
    options = {**preset, **options}
    if cls is FixedMixture:
        if name == "standard":
            if sizes is None or len(sizes) != k:
                raise ValueError(f"mixer 'standard' needs the k={k} task sizes, got {sizes!r}")
            options["weights"] = np.asarray(sizes, float)
        elif name == "uniform":
            options["weights"] = np.ones(k)
        elif len(options["weights"]) != k:
            raise ValueError(f"mixer 'mixture' needs option weights: a list of k={k} numbers")
        return FixedMixture(options.pop("weights"), **options, batch_shape=batch_shape)
    return cls(k, **options, batch_shape=batch_shape)
