"""The stages of an LLM experiment, each a set of functions of a prepared :class:`~amalab.llm.experiment.Experiment`:

- :mod:`~amalab.llm.stages.specialists`: one specialist per task and the cached losses s(z), in-sample and
  cross-fitted (folds: :mod:`~amalab.llm.stages.cross_fit`);
- :mod:`~amalab.llm.stages.generalists`: the generalists of every method and seed, and the base model;
- :mod:`~amalab.llm.stages.merges`: the merged-specialist baselines.

What they share: fresh and trained policies (:mod:`~amalab.llm.stages.policies`) and scoring against the
specialist losses (:mod:`~amalab.llm.stages.scoring`). :mod:`amalab.llm.pipeline` runs them in order.
"""
