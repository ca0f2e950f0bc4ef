"""Verifiable preference tasks the project generates itself, with ECD-style hard negatives.

Families (each deterministic from its seed, each with a verifier):

- ``format`` (:mod:`.formatting`): an instruction about a small topic evolved by one more format
  constraint; rejected = the response to the simpler instruction, missing exactly the added constraint
  (Evolutionary Contrastive Distillation, Katz-Samuels et al. 2024);
- ``arithmetic`` (:mod:`.arithmetic`): sums and unit conversions; rejected = a nearly right answer.

Knobs: ``n`` pairs, ``hardness`` (format: the number of constraints, 1..5; arithmetic: the number of
operations and decimals, 1..4), ``noise`` (label noise: chosen and rejected swapped for exactly
``round(noise * n)`` pairs, Python's half-to-even rounding; mixed-quality data as in preference
diagnostic suites), ``seed``, and two that narrow a family (their defaults leave every pair as it was):
``kind`` (format: the kind of the added constraint, one of ``formatting.KINDS``; arithmetic:
``expression`` or ``conversion`` only) and ``digits`` (arithmetic only: operands of + and - and values to
convert have at most this many digits, 1..3, default 2).

Prompts are in the HH dialogue form of the other tasks, ``"\\n\\nHuman: <instruction>\\n\\nAssistant:"``,
with completions starting with a space (the TruthfulQA convention of :mod:`amalab.llm.data`). The prompt
alone determines what a correct answer is: :func:`spec_of` parses it back into the JSON spec the
verifier checks, so an evaluation that only holds :class:`PreferencePair` objects (or generated text) can
still verify. As a task source: ``generated:<family>?n=500&hardness=2&noise=0.1&seed=0``
(:func:`parse_source`; every knob optional).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from amalab.errors import ConfigError
from amalab.llm.data import ASSISTANT_MARKER, PreferencePair, example_id
from amalab.llm.generated import arithmetic, formatting

HUMAN_MARKER = "\n\nHuman: "

_FAMILIES = {formatting.FAMILY: formatting, arithmetic.FAMILY: arithmetic}
FAMILIES = tuple(_FAMILIES)

#: consecutive draws without a new pair before giving up (a draw is discarded when invalid or its prompt
#: was drawn before): the prompts of the knobs are then about exhausted
_MAX_FRUITLESS_DRAWS = 1000


@dataclass(frozen=True)
class GeneratorKnobs:
    """What a generated task is made from: family, size, hardness, label-noise fraction and seed."""

    family: str
    n: int = 500
    hardness: int = 1
    noise: float = 0.0
    seed: int = 0
    kind: str = ""   # "" = every kind of the family
    digits: int = 2  # arithmetic only

    def check(self) -> None:
        """Raise :class:`ConfigError` (one line) on an unknown family or a knob out of range."""
        if self.family not in _FAMILIES:
            raise ConfigError(f"generated: unknown task family {self.family!r}; known: {', '.join(FAMILIES)}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"generated:{self.family}: n must be an integer >= 1, got {self.n!r}")
        top = _FAMILIES[self.family].MAX_HARDNESS
        hardness, noise = self.hardness, self.noise
        if isinstance(hardness, bool) or not isinstance(hardness, int) or not 1 <= hardness <= top:
            raise ConfigError(f"generated:{self.family}: hardness must be an integer in [1, {top}], "
                              f"got {self.hardness!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise ConfigError(f"generated:{self.family}: noise must be a fraction in [0, 1], got {noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"generated:{self.family}: seed must be an integer, got {self.seed!r}")
        kinds = _FAMILIES[self.family].DRAW_KINDS
        if self.kind and self.kind not in kinds:
            raise ConfigError(f"generated:{self.family}: kind must be one of {', '.join(kinds)}, got {self.kind!r}")
        low, top = (1, arithmetic.MAX_DIGITS) if self.family == arithmetic.FAMILY else (2, 2)
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not low <= self.digits <= top:
            allowed = f"an integer in [1, {top}]" if low < top else "2 (an arithmetic knob)"
            raise ConfigError(f"generated:{self.family}: digits must be {allowed}, got {self.digits!r}")

    @property
    def noisy_count(self) -> int:
        return round(self.noise * self.n)


@dataclass
class GeneratedTask:
    """The pairs of a generated task, the verifier spec of each (by example id), and the swapped ids."""

    knobs: GeneratorKnobs
    pairs: list[PreferencePair]
    specs: dict[str, dict]
    swapped: frozenset[str] = field(default_factory=frozenset)  # ids whose chosen/rejected were swapped


def prompt_of(instruction: str) -> str:
    return f"{HUMAN_MARKER}{instruction}{ASSISTANT_MARKER}"


def instruction_of(prompt: str) -> str | None:
    if prompt.startswith(HUMAN_MARKER) and prompt.endswith(ASSISTANT_MARKER):
        return prompt[len(HUMAN_MARKER):-len(ASSISTANT_MARKER)]
    return None


def generate_task(knobs: GeneratorKnobs, task: str | None = None) -> GeneratedTask:
    """``knobs.n`` pairs of distinct prompts, the same for the same knobs (``random.Random(seed)``).

    Then label noise: ``knobs.noisy_count`` pairs, sampled with the same generator, get chosen and rejected
    swapped; their ids are in ``swapped``. ``task`` names the pairs' task (default ``generated-<family>``).
    """
    knobs.check()
    family = _FAMILIES[knobs.family]
    task = task or f"generated-{knobs.family}"
    rng = random.Random(f"amalab.generated\0{knobs.family}\0{knobs.seed}")
    drawn: list[tuple[dict, str, str, str]] = []
    prompts: set[str] = set()
    fruitless = 0
    while len(drawn) < knobs.n and fruitless < _MAX_FRUITLESS_DRAWS:
        fruitless += 1
        example = family.draw_example(rng, knobs)
        if example is None:
            continue
        spec, chosen, rejected = example
        prompt = prompt_of(family.render_instruction(spec))
        if prompt in prompts:
            continue
        prompts.add(prompt)
        drawn.append((spec, prompt, chosen, rejected))
        fruitless = 0
    if len(drawn) < knobs.n:
        raise ConfigError(f"generated:{knobs.family}: could only make {len(drawn)} distinct pairs of the "
                          f"{knobs.n} asked for at hardness {knobs.hardness}; ask for fewer")
    noisy = set(rng.sample(range(knobs.n), knobs.noisy_count))
    pairs, specs, swapped = [], {}, set()
    for index, (spec, prompt, chosen, rejected) in enumerate(drawn):
        if index in noisy:
            chosen, rejected = rejected, chosen
        pair_id = example_id(prompt, chosen, rejected)
        pairs.append(PreferencePair(pair_id, task, prompt, chosen, rejected))
        specs[pair_id] = spec
        if index in noisy:
            swapped.add(pair_id)
    return GeneratedTask(knobs, pairs, specs, frozenset(swapped))


def spec_of(prompt: str) -> dict:
    """The verifier spec of a generated prompt, parsed back from its text (family included)."""
    instruction = instruction_of(prompt)
    if instruction is not None:
        for module in _FAMILIES.values():
            spec = module.parse_instruction(instruction)
            if spec is not None:
                return spec
    raise ConfigError(f"generated: the prompt {prompt[:80]!r} is not one of a generated family "
                      f"({', '.join(FAMILIES)})")


def is_generated_prompt(prompt: str) -> bool:
    try:
        spec_of(prompt)
    except ConfigError:
        return False
    return True


def failed_constraints(spec: dict, response: str) -> list[int]:
    """Indices of the spec's constraints the response misses (arithmetic: [0] for a wrong answer)."""
    family = spec.get("family") if isinstance(spec, dict) else None
    if family not in _FAMILIES:
        raise ConfigError(f"generated: spec has unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _FAMILIES[family].failed_constraints(spec, response)


def verify(spec: dict, response: str) -> bool:
    """Whether a response meets every constraint of its spec."""
    return not failed_constraints(spec, response)


def with_verified_labels(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """The pairs with chosen and rejected put back in the order the verifier gives.

    Label noise belongs to the training data (mixed quality); held-out pairs are scored against the truth, so
    a noisy pair whose chosen response fails its verifier while the rejected one passes is turned round (and
    gets the id of its new content).
    """
    out = []
    for pair in pairs:
        spec = spec_of(pair.prompt)
        if not verify(spec, pair.chosen) and verify(spec, pair.rejected):
            pair = PreferencePair(example_id(pair.prompt, pair.rejected, pair.chosen), pair.task, pair.prompt,
                                  pair.rejected, pair.chosen)
        out.append(pair)
    return out


def verifier_for(family: str) -> Callable[[dict, str], bool]:
    """The verifier of one family: (spec, response) -> bool; a spec of another family is an error."""
    if family not in _FAMILIES:
        raise ConfigError(f"generated: unknown task family {family!r}; known: {', '.join(FAMILIES)}")

    def verifier(spec: dict, response: str) -> bool:
        if not isinstance(spec, dict) or spec.get("family") != family:
            got = spec.get("family") if isinstance(spec, dict) else type(spec).__name__
            raise ConfigError(f"generated: verifier mismatch: the {family} verifier got a spec of {got!r}")
        return verify(spec, response)

    return verifier


_KNOB_TYPES = {"n": int, "hardness": int, "noise": float, "seed": int, "kind": str, "digits": int}


def parse_source(rest: str) -> GeneratorKnobs:
    """Knobs from what follows ``generated:`` in a source: ``<family>?n=..&hardness=..&noise=..&seed=..``
    (and ``&kind=..&digits=..``)."""
    family, _, query = rest.partition("?")
    values: dict = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
        if key not in _KNOB_TYPES:
            raise ConfigError(f"generated:{rest}: unknown knob {key!r}; known: {', '.join(_KNOB_TYPES)}")
        try:
            values[key] = _KNOB_TYPES[key](text)
        except ValueError:
            raise ConfigError(f"generated:{rest}: knob {key}={text!r} is not "
                              f"{'a number' if _KNOB_TYPES[key] is float else 'an integer'}") from None
    knobs = GeneratorKnobs(family, **values)
    knobs.check()
    return knobs


__all__ = [
    "FAMILIES", "GeneratedTask", "GeneratorKnobs", "failed_constraints", "generate_task", "instruction_of",
    "is_generated_prompt", "parse_source", "prompt_of", "spec_of", "verifier_for", "verify",
    "with_verified_labels",
]
