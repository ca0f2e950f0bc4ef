"""Synthetic verifiable preference tasks the project makes itself, with ECD-style hard negatives.

Families (each deterministic from its seed, each with a verifier):

- ``format`` (:mod:`.formatting`): an instruction about a small topic evolved by one more format
  constraint; rejected = the response to the simpler instruction, missing exactly the added constraint
  (Evolutionary Contrastive Distillation, Katz-Samuels et al. 2024);
- ``arithmetic`` (:mod:`.arithmetic`): sums and unit conversions; rejected = a nearly right answer.

Knobs (:class:`.generator.GeneratorKnobs`): ``n`` pairs, ``hardness`` (format: the number of constraints,
1..5; arithmetic: the number of operations and decimals, 1..4), ``noise`` (label noise: chosen and rejected
swapped for exactly ``round(noise * n)`` pairs, Python's half-to-even rounding; mixed-quality data as in
preference diagnostic suites), ``seed``, and two that narrow a family (their defaults leave every pair as
it was): ``kind`` (format: the kind of the added constraint, one of ``formatting.KINDS``; arithmetic:
``expression`` or ``conversion`` only) and ``digits`` (arithmetic only: operands of + and - and values to
convert have at most this many digits, 1..3, default 2).

Prompts are single human turns in the HH dialogue form of the other tasks,
``"\\n\\nHuman: <instruction>\\n\\nAssistant:"`` (:func:`amalab.llm.data.pairs.single_turn_prompt`), with
completions starting with a space. The prompt alone determines what a correct answer is:
:func:`.verifier.spec_of` parses it back into the JSON spec the verifier checks, so an evaluation that
only holds :class:`~amalab.llm.data.pairs.PreferencePair` objects (or generated text) can still verify.
As a task source: ``generated:<family>?n=500&hardness=2&noise=0.1&seed=0``
(:func:`.generator.parse_source`; every knob optional).

Modules: :mod:`.generator` (knobs, the source syntax, the pairs of a task), :mod:`.verifier` (specs parsed
from prompts, verification, verified labels), one module per family.
"""
