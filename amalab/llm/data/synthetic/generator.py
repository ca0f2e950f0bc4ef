"""The pairs of a synthetic task: its knobs, the ``generated:`` source syntax, and the generator.

See the package docstring (:mod:`amalab.llm.data.synthetic`) for the families and what each knob does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair, example_id, single_turn_prompt
from amalab.llm.data.synthetic import arithmetic, formatting

#: family name -> the module that draws, renders, parses and verifies its examples
FAMILY_MODULES = {formatting.FAMILY: formatting, arithmetic.FAMILY: arithmetic}
FAMILIES = tuple(FAMILY_MODULES)

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
        if self.family not in FAMILY_MODULES:
            raise ConfigError(f"generated: unknown task family {self.family!r}; known: {', '.join(FAMILIES)}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"generated:{self.family}: n must be an integer >= 1, got {self.n!r}")
        top = FAMILY_MODULES[self.family].MAX_HARDNESS
        hardness, noise = self.hardness, self.noise
        if isinstance(hardness, bool) or not isinstance(hardness, int) or not 1 <= hardness <= top:
            raise ConfigError(f"generated:{self.family}: hardness must be an integer in [1, {top}], "
                              f"got {self.hardness!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise ConfigError(f"generated:{self.family}: noise must be a fraction in [0, 1], got {noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"generated:{self.family}: seed must be an integer, got {self.seed!r}")
        kinds = FAMILY_MODULES[self.family].DRAW_KINDS
        if self.kind and self.kind not in kinds:
            raise ConfigError(f"generated:{self.family}: kind must be one of {', '.join(kinds)}, "
                              f"got {self.kind!r}")
        low, top = (1, arithmetic.MAX_DIGITS) if self.family == arithmetic.FAMILY else (2, 2)
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not low <= self.digits <= top:
            allowed = f"an integer in [1, {top}]" if low < top else "2 (an arithmetic knob)"
            raise ConfigError(f"generated:{self.family}: digits must be {allowed}, got {self.digits!r}")

    @property
    def noisy_count(self) -> int:
        return round(self.noise * self.n)


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


@dataclass
class GeneratedTask:
    """The pairs of a generated task, the verifier spec of each (by example id), and the swapped ids."""

    knobs: GeneratorKnobs
    pairs: list[PreferencePair]
    specs: dict[str, dict]
    swapped: frozenset[str] = field(default_factory=frozenset)  # ids whose chosen/rejected were swapped


def generate_task(knobs: GeneratorKnobs, task: str | None = None) -> GeneratedTask:
    """``knobs.n`` pairs of distinct prompts, the same for the same knobs (``random.Random(seed)``).

    Then label noise: ``knobs.noisy_count`` pairs, sampled with the same generator, get chosen and rejected
    swapped; their ids are in ``swapped``. ``task`` names the pairs' task (default ``generated-<family>``).
    """
    knobs.check()
    family = FAMILY_MODULES[knobs.family]
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
        prompt = single_turn_prompt(family.render_instruction(spec))
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
