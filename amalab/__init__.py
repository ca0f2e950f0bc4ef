"""amalab: multi-task preference alignment with AutoMixAlign (AMA-R and AMA-S).

The optimizers live in :mod:`amalab.mixers` and are shared by the convex lab
(:mod:`amalab.convex`) and the LLM trainer. The maths is in ``docs/maths.md``.
"""

__version__ = "0.1.0"
