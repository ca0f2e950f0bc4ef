"""Tests of amalab.llm.data.synthetic: the ECD property checked by independent verifiers, knobs, noise,
errors."""

from __future__ import annotations

import hashlib
import json
import re
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.data.pairs import ASSISTANT_MARKER, example_id
from amalab.llm.data.synthetic import arithmetic, formatting
from amalab.llm.data.synthetic.generator import FAMILIES, GeneratorKnobs, generate_task, parse_source
from amalab.llm.data.synthetic.verifier import failed_constraints, spec_of, verifier_for, verify
from amalab.llm.data.tasks import TaskConfig, load_task

MAX_HARDNESS = {"format": formatting.MAX_HARDNESS, "arithmetic": arithmetic.MAX_HARDNESS}


# --- independent reference checkers: written from the constraint table, not from the module's code -------

def reference_format_check(constraint: dict, response: str) -> bool:
    text = response.strip()
    words = [w for w in text.split() if any(c.isalnum() for c in w)]
    kind = constraint["kind"]
    if kind == "exact_words":
        return len(words) == constraint["n"]
    if kind == "max_words":
        return len(words) <= constraint["n"]
    if kind == "lowercase":
        return not any(c.isupper() for c in text)
    if kind == "uppercase":
        return not any(c.islower() for c in text)
    if kind == "keyword":
        return constraint["word"].lower() in [w.strip(".,!?").lower() for w in words]
    if kind == "ends_with":
        return text.lower().endswith(constraint["phrase"].lower())
    if kind == "bullets":
        lines = [line for line in text.split("\n") if line.strip()]
        return len(lines) == constraint["n"] and all(line.lstrip().startswith("- ") for line in lines)
    raise AssertionError(kind)


def reference_arithmetic_answer(instruction: str) -> tuple[Fraction, str | None]:
    """The answer by plain Python evaluation (eval on a checked character set) and a unit table."""
    if instruction.startswith("What is "):
        expression = instruction[len("What is "):-1]
        assert set(expression) <= set("0123456789+-* ")
        return Fraction(eval(expression)), None  # noqa: S307 - digits and operators only, checked above
    value, source, _, target = re.fullmatch(r"Convert (\S+) (\S+) (to) (\S+)\.", instruction).groups()
    metres = {"km": 1000, "m": 1, "cm": Fraction(1, 100), "mm": Fraction(1, 1000), "kg": 1000, "g": 1,
              "mg": Fraction(1, 1000), "L": 1, "mL": Fraction(1, 1000), "h": 3600, "min": 60, "s": 1}
    return Fraction(value) * metres[source] / metres[target], target


def reference_arithmetic_check(instruction: str, response: str) -> bool:
    answer, unit = reference_arithmetic_answer(instruction)
    numbers = re.findall(r"(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)", response)
    return bool(numbers) and Fraction(numbers[-1][0]) == answer and (unit is None or numbers[-1][1] == unit)


def instruction(prompt: str) -> str:
    return prompt[len("\n\nHuman: "):-len(ASSISTANT_MARKER)]


def check_ecd_pairs(family: str, n: int, hardness: int, seed: int, kind: str = "", digits: int = 2) -> None:
    task = generate_task(GeneratorKnobs(family, n=n, hardness=hardness, seed=seed, kind=kind, digits=digits))
    assert len(task.pairs) == n and len({p.prompt for p in task.pairs}) == n
    for pair in task.pairs:
        assert pair.prompt.startswith("\n\nHuman: ") and pair.prompt.endswith(ASSISTANT_MARKER)
        assert pair.chosen.startswith(" ") and pair.rejected.startswith(" ") and pair.chosen != pair.rejected
        assert pair.id == example_id(pair.prompt, pair.chosen, pair.rejected)
        spec = spec_of(pair.prompt)
        assert spec == task.specs[pair.id]  # the prompt alone gives back the spec
        assert verify(spec, pair.chosen) and not verify(spec, pair.rejected)
        if family == "format":
            constraints = spec["constraints"]
            assert len(constraints) == hardness
            assert len({formatting.GROUPS[c["kind"]] for c in constraints}) == hardness
            # chosen meets all; rejected misses exactly the added (last) constraint: by the reference too
            assert [reference_format_check(c, pair.chosen) for c in constraints] == [True] * hardness
            assert [reference_format_check(c, pair.rejected) for c in constraints] == \
                [True] * (hardness - 1) + [False]
            assert failed_constraints(spec, pair.rejected) == [hardness - 1]
            assert not kind or constraints[-1]["kind"] == kind  # the kind knob names the added constraint
        else:
            assert reference_arithmetic_check(instruction(pair.prompt), pair.chosen)
            assert not reference_arithmetic_check(instruction(pair.prompt), pair.rejected)
            question = instruction(pair.prompt)
            assert not kind or question.startswith("What is " if kind == "expression" else "Convert ")
            if question.startswith("What is "):  # operands of + and - (and the first) have <= digits digits
                terms = question[len("What is "):-1].split()
                assert all(len(t) <= digits for i, t in enumerate(terms[::2]) if i == 0 or terms[2 * i - 1] != "*")
            else:
                assert len(question.split()[1].split(".")[0]) <= digits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_chosen_passes_and_every_rejected_misses_exactly_the_added_constraint(family, seed):
    for hardness in range(1, MAX_HARDNESS[family] + 1):
        check_ecd_pairs(family, 100, hardness, seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 2**31), n=st.integers(1, 40),
       hardness=st.integers(1, 5))
def test_ecd_property_over_seeds_and_knobs(family, seed, n, hardness):
    check_ecd_pairs(family, n, min(hardness, MAX_HARDNESS[family]), seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), family=st.sampled_from(FAMILIES), seed=st.integers(0, 2**31), n=st.integers(1, 40),
       hardness=st.integers(1, 5))
def test_ecd_property_with_the_kind_and_digits_knobs(data, family, seed, n, hardness):
    kinds = formatting.DRAW_KINDS if family == "format" else arithmetic.DRAW_KINDS
    kind = data.draw(st.sampled_from(("",) + kinds))
    digits = data.draw(st.integers(1, arithmetic.MAX_DIGITS)) if family == "arithmetic" else 2
    if family == "arithmetic" and digits == 1 and kind == "expression" and hardness == 1:
        n = min(n, 16)  # one one-digit operation: 128 distinct questions in all
    check_ecd_pairs(family, n, min(hardness, MAX_HARDNESS[family]), seed, kind, digits)
    knobs = GeneratorKnobs(family, n=n, hardness=min(hardness, MAX_HARDNESS[family]), seed=seed, kind=kind,
                           digits=digits)
    assert generate_task(knobs).pairs == generate_task(knobs).pairs  # deterministic by seed


def test_default_knobs_make_the_pairs_they_made_before_kind_and_digits_existed():
    """Committed experiments (llm_tiny) depend on these pairs: the digest was computed with the code
    before the kind and digits knobs were added."""
    digest = hashlib.sha256()
    for family in FAMILIES:
        for hardness in range(1, MAX_HARDNESS[family] + 1):
            task = generate_task(GeneratorKnobs(family, n=60, hardness=hardness, noise=0.1, seed=0))
            digest.update(json.dumps([[p.prompt, p.chosen, p.rejected] for p in task.pairs]).encode())
    assert digest.hexdigest() == "60a0155bb31429a0b2b497d34a9dbfb4d378a7ecddf8b9c5c49d3235c4d404fb"


def test_kind_and_digits_from_a_source():
    knobs = parse_source("arithmetic?n=100&hardness=1&kind=expression&digits=1&seed=3")
    assert (knobs.kind, knobs.digits, knobs.n) == ("expression", 1, 100)
    questions = [instruction(p.prompt) for p in generate_task(knobs).pairs]
    assert all(re.fullmatch(r"What is [2-9] [+-] [2-9]\?", q) for q in questions)
    keyword = generate_task(parse_source("format?n=30&kind=keyword"))
    assert all([c["kind"] for c in spec["constraints"]] == ["keyword"] for spec in keyword.specs.values())


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(FAMILIES), n=st.integers(1, 60), noise=st.floats(0, 1), seed=st.integers(0, 99))
def test_label_noise_swaps_exactly_round_noise_n_pairs(family, n, noise, seed):
    noisy = generate_task(GeneratorKnobs(family, n=n, noise=noise, seed=seed))
    clean = generate_task(GeneratorKnobs(family, n=n, noise=0.0, seed=seed))
    assert len(noisy.swapped) == round(noise * n)
    for pair, original in zip(noisy.pairs, clean.pairs, strict=True):
        assert pair.prompt == original.prompt
        swapped = (pair.chosen, pair.rejected) == (original.rejected, original.chosen)
        assert swapped == (pair.id in noisy.swapped)
        assert swapped or (pair.chosen, pair.rejected) == (original.chosen, original.rejected)
        # the verifier finds the swapped pairs: their chosen fails
        assert verify(noisy.specs[pair.id], pair.chosen) == (not swapped)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_pairs_other_seed_other_pairs(family):
    knobs = GeneratorKnobs(family, n=50, hardness=2, noise=0.2, seed=3)
    first, second = generate_task(knobs), generate_task(knobs)
    assert first.pairs == second.pairs and first.swapped == second.swapped
    other = generate_task(GeneratorKnobs(family, n=50, hardness=2, noise=0.2, seed=4))
    assert [p.id for p in other.pairs] != [p.id for p in first.pairs]


def test_known_responses_are_scored_right():
    spec = spec_of('\n\nHuman: Describe cats. Use at most 5 words. Include the word "velvet".'
                   '\n\nAssistant:')
    assert verify(spec, " Cats like velvet.")
    assert not verify(spec, " Cats like soft velvet pillows a lot.")  # 7 words
    assert failed_constraints(spec, " Cats sleep.") == [1]
    assert not verify(spec, " Cats like velvety things.")  # a whole word, not a prefix
    bullets = spec_of('\n\nHuman: Explain rain. Answer as a list of exactly 2 bullet points, each starting '
                      'with "- ".\n\nAssistant:')
    assert verify(bullets, " - Rain falls.\n- It is wet.") and not verify(bullets, " - Rain falls.")
    assert not verify(bullets, " Rain:\n- falls\n- is wet")  # a line that is not a bullet
    sum_spec = spec_of("\n\nHuman: What is 37 + 48 * 2?\n\nAssistant:")
    assert sum_spec["answer"] == "133"
    assert verify(sum_spec, " The answer is 133.") and not verify(sum_spec, " The answer is 170.")
    convert = spec_of("\n\nHuman: Convert 3.5 km to m.\n\nAssistant:")
    assert verify(convert, " 3.5 km is 3500 m.") and verify(convert, "3500.0 m")
    assert not verify(convert, " 3.5 km is 350 m.") and not verify(convert, " 3.5 km is 3500 cm.")
    assert not verify(convert, " I do not know.")


def test_vocabularies_cannot_satisfy_a_constraint_by_accident():
    topic_words = {w.strip(".,").lower() for sentences in formatting.TOPICS.values() for s in sentences
                   for w in s.split()}
    ending_words = {w.strip(".?").lower() for e in formatting.ENDINGS for w in e.split()}
    assert not set(formatting.KEYWORDS) & (topic_words | ending_words | {"remember"})
    assert all("." not in topic for topic in formatting.TOPICS)
    for sentences in formatting.TOPICS.values():
        for sentence in sentences:
            assert not any(sentence.lower().endswith(e.lower()) for e in formatting.ENDINGS)


def test_the_check_can_fail():
    """Breaking the construction (the rejected built with every constraint) is caught by the check."""
    spec = spec_of("\n\nHuman: Describe cats. Write in lowercase letters only.\n\nAssistant:")
    broken = formatting.build_response("cats", spec["constraints"], start=0, natural_length=10)
    assert failed_constraints(spec, broken) != [0]
    assert not reference_format_check(spec["constraints"][0], " Cats sleep.")


def test_generated_source_in_a_task_config(tmp_path):
    source = "generated:format?n=40&hardness=3&noise=0.25&seed=2"
    config = load_section(TaskConfig, {"name": "fmt", "source": source, "held_out": 8}, tmp_path / "c.toml")
    data = load_task(config)
    assert (len(data.train), len(data.eval), sum(data.dropped.values())) == (32, 8, 0)
    task = generate_task(GeneratorKnobs("format", n=40, hardness=3, noise=0.25, seed=2))
    by_prompt = {p.prompt: p for p in task.pairs}
    assert {p.id for p in data.train} <= {p.id for p in task.pairs}
    assert {p.prompt for p in data.train + data.eval} == set(by_prompt)
    assert all(p.task == "fmt" for p in data.train + data.eval)
    # label noise stays in training (mixed quality); held-out pairs are put back in their true order
    assert any(p.id in task.swapped for p in data.train)
    eval_swapped = [p for p in data.eval if by_prompt[p.prompt].id in task.swapped]
    assert eval_swapped, "this seed should put a noisy pair in the held-out set"
    for pair in data.eval:
        generated = by_prompt[pair.prompt]
        if generated.id in task.swapped:
            assert (pair.chosen, pair.rejected) == (generated.rejected, generated.chosen)
            assert pair.id == example_id(pair.prompt, pair.chosen, pair.rejected) != generated.id
        else:
            assert (pair.id, pair.chosen, pair.rejected) == (generated.id, generated.chosen, generated.rejected)
    assert parse_source("arithmetic") == GeneratorKnobs("arithmetic")


@pytest.mark.parametrize("source, message", [
    ("generated:poetry?n=5", "unknown task family 'poetry'"),
    ("generated:format?n=-3", "n must be an integer >= 1, got -3"),
    ("generated:format?noise=1.5", "noise must be a fraction in [0, 1], got 1.5"),
    ("generated:format?noise=-0.1", "noise must be a fraction in [0, 1]"),
    ("generated:arithmetic?hardness=9", "hardness must be an integer in [1, 4], got 9"),
    ("generated:format?size=3", "unknown knob 'size'"),
    ("generated:format?n=many", "knob n='many' is not an integer"),
    ("generated:format?kind=rhyme", "kind must be one of exact_words, max_words"),
    ("generated:arithmetic?kind=keyword", "kind must be one of expression, conversion, got 'keyword'"),
    ("generated:arithmetic?digits=4", "digits must be an integer in [1, 3], got 4"),
    ("generated:format?digits=1", "digits must be 2 (an arithmetic knob), got 1"),
])
def test_bad_knobs_are_one_line_config_errors(tmp_path, source, message):
    with pytest.raises(ConfigError) as error:
        load_section(TaskConfig, {"name": "g", "source": source}, tmp_path / "c.toml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_verifier_mismatch_and_unknown_family_are_errors():
    format_spec = spec_of("\n\nHuman: Describe cats. Write in lowercase letters only.\n\nAssistant:")
    with pytest.raises(ConfigError, match="verifier mismatch: the arithmetic verifier got a spec of 'format"):
        verifier_for("arithmetic")(format_spec, " cats")
    assert verifier_for("format")(format_spec, " cats sleep.")
    with pytest.raises(ConfigError, match="unknown task family 'poetry'"):
        verifier_for("poetry")
    with pytest.raises(ConfigError, match="not one of a generated family"):
        spec_of("\n\nHuman: How do I bake bread?\n\nAssistant:")


def test_asking_for_more_distinct_prompts_than_exist_is_an_error(monkeypatch):
    # one topic: at most 4 verbs x 98 single constraints = 392 distinct prompts at hardness 1
    monkeypatch.setattr(formatting, "TOPICS", {"cats": formatting.TOPICS["cats"]})
    assert len(generate_task(GeneratorKnobs("format", n=300, hardness=1)).pairs) == 300
    with pytest.raises(ConfigError, match=r"could only make 3\d\d distinct pairs of the 1000 asked for"):
        generate_task(GeneratorKnobs("format", n=1000, hardness=1))
