"""Task mixers shared by the convex lab and the LLM trainer: see :mod:`amalab.mixers.base`."""

from amalab.mixers.ama_r import AMAR
from amalab.mixers.ama_s import AMAS
from amalab.mixers.base import Mixer
from amalab.mixers.baselines import FixedMixture
from amalab.mixers.excess import excess_loss, task_excess, task_statistics
from amalab.mixers.exp3 import Exp3, exp3_gamma, exp3_regret_bound
from amalab.mixers.exponentiated_gradient import ExpGradWeights
from amalab.mixers.registry import MIXERS, REGISTRY, make_mixer

__all__ = [
    "AMAR", "AMAS", "Exp3", "ExpGradWeights", "FixedMixture", "MIXERS", "Mixer", "REGISTRY",
    "excess_loss", "exp3_gamma", "exp3_regret_bound", "make_mixer", "task_excess", "task_statistics",
]
