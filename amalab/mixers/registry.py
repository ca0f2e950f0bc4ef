"""Mixers by name, as configs and the command line refer to them (spec sections 3, 4 and 7)."""

from __future__ import annotations

import inspect

import numpy as np

from amalab.mixers.ama_r import AMAR
from amalab.mixers.ama_s import AMAS
from amalab.mixers.base import Mixer, check_k
from amalab.mixers.baselines import FixedMixture

#: name -> one-line description
MIXERS = {
    "ama-r": "AMA-R: exponentiated-gradient task weights on the specialist-clipped excess loss",
    "ama-s": "AMA-S: EXP3 task sampling on the specialist-clipped excess loss",
    "standard": "standard alignment: the union of the data (tasks drawn in proportion to |D_i|)",
    "uniform": "uniform task mixture of the raw losses",
    "mixture": "fixed task mixture of the raw losses (option: weights)",
    "doremi": "DoReMi-style: AMA-R on the excess over the shared pi_ref, smoothing 1e-3, theta on raw loss",
    "odm": "ODM-style: EXP3 task sampling on the raw training loss",
}

# name -> (class, preset options a user may override)
_PRESETS = {
    "ama-r": (AMAR, {}),
    "ama-s": (AMAS, {}),
    "doremi": (AMAR, {"reference": "base", "smoothing": 1e-3, "objective": "loss"}),
    "odm": (AMAS, {"reference": "zero", "clip": "none"}),
}


def _options_of(cls) -> set[str]:
    params = inspect.signature(cls).parameters
    return {name for name, p in params.items() if name not in ("k", "batch_shape")}


def make_mixer(name: str, k: int, *, sizes=None, batch_shape: tuple[int, ...] = (), **options) -> Mixer:
    """Build mixer ``name`` for ``k`` tasks. ``sizes`` (|D_i|) is needed by ``standard`` only."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")
    k = check_k(k)
    if name in ("standard", "uniform", "mixture"):
        allowed = {"weights"} if name == "mixture" else set()
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"mixer {name!r} takes no option {', '.join(sorted(unknown))}"
                             + (f"; valid: {', '.join(sorted(allowed))}" if allowed else ""))
        if name == "standard":
            if sizes is None or len(sizes) != k:
                raise ValueError(f"mixer 'standard' needs the k={k} task sizes, got {sizes!r}")
            return FixedMixture(np.asarray(sizes, float), sampling=True, batch_shape=batch_shape)
        if name == "uniform":
            return FixedMixture(np.ones(k), batch_shape=batch_shape)
        if "weights" not in options or len(options["weights"]) != k:
            raise ValueError(f"mixer 'mixture' needs option weights: a list of k={k} numbers")
        return FixedMixture(options["weights"], batch_shape=batch_shape)
    cls, preset = _PRESETS[name]
    unknown = set(options) - _options_of(cls)
    if unknown:
        raise ValueError(f"mixer {name!r} takes no option {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(sorted(_options_of(cls)))}")
    options = {**preset, **options}
    required = {n for n, p in inspect.signature(cls).parameters.items()
                if p.default is inspect.Parameter.empty and n != "k"}
    if required - set(options):
        raise ValueError(f"mixer {name!r} needs option {', '.join(sorted(required - set(options)))}")
    return cls(k, **options, batch_shape=batch_shape)
