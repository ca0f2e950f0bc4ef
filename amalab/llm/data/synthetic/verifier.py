"""Verifying synthetic tasks: the spec of a prompt parsed back from its text, verifiers, verified labels.

A generated prompt alone determines what a correct answer is (package docstring,
:mod:`amalab.llm.data.synthetic`), so held-out :class:`PreferencePair` objects and generated text are all
a verifier needs.
"""

from __future__ import annotations

from collections.abc import Callable

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair, example_id, single_turn_text
from amalab.llm.data.synthetic.generator import FAMILIES, FAMILY_MODULES


def spec_of(prompt: str) -> dict:
    """The verifier spec of a generated prompt, parsed back from its text (family included)."""
    instruction = single_turn_text(prompt)
    if instruction is not None:
        for module in FAMILY_MODULES.values():
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
    if family not in FAMILY_MODULES:
        raise ConfigError(f"generated: spec has unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILY_MODULES[family].failed_constraints(spec, response)


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
    if family not in FAMILY_MODULES:
        raise ConfigError(f"generated: unknown task family {family!r}; known: {', '.join(FAMILIES)}")

    def verifier(spec: dict, response: str) -> bool:
        if not isinstance(spec, dict) or spec.get("family") != family:
            got = spec.get("family") if isinstance(spec, dict) else type(spec).__name__
            raise ConfigError(f"generated: verifier mismatch: the {family} verifier got a spec of {got!r}")
        return verify(spec, response)

    return verifier
