"""The ``arithmetic`` family: short sums and unit conversions, the rejected answer nearly right.

Two kinds of question, drawn half and half:

- ``What is 37 + 48 - 12?``: integers, ``+``, ``-`` and (hardness >= 2) ``*`` with one-digit factors,
  usual precedence; ``hardness`` operations. Chosen ``" The answer is 73."``; rejected the same sentence
  with an answer off by one, off by ten, or with two adjacent digits swapped.
- ``Convert 3.5 km to m.``: length, mass and volume in powers of ten, time from larger to smaller units
  (every answer is a terminating decimal); values with ``hardness - 1`` decimals (at most 2). Chosen
  ``" 3.5 km is 3500 m."``; rejected the same sentence with a wrong conversion factor (ten times too
  large or too small, or the factor of a neighbouring unit), the hard negative of a unit slip.

The ``kind`` knob keeps one kind of question (``expression`` or ``conversion``); the ``digits`` knob bounds
the operands of + and - and the values to convert (``digits = 1``: ``What is 7 - 3?``; default 2, as above).

The verifier reads the last number of the response (and, for a conversion, the unit right after it)
and compares it exactly (as a fraction) with the answer computed from the question.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

FAMILY = "arithmetic"

#: unit -> (dimension, size in the dimension's base unit)
UNITS: dict[str, tuple[str, Fraction]] = {
    "km": ("length", Fraction(1000)), "m": ("length", Fraction(1)), "cm": ("length", Fraction(1, 100)),
    "mm": ("length", Fraction(1, 1000)),
    "kg": ("mass", Fraction(1000)), "g": ("mass", Fraction(1)), "mg": ("mass", Fraction(1, 1000)),
    "L": ("volume", Fraction(1)), "mL": ("volume", Fraction(1, 1000)),
    "h": ("time", Fraction(3600)), "min": ("time", Fraction(60)), "s": ("time", Fraction(1)),
}

MAX_HARDNESS = 4
#: what the ``kind`` knob may ask for: one kind of question only
DRAW_KINDS = ("expression", "conversion")
#: the ``digits`` knob: operands of + and - and values to convert have at most this many digits
MAX_DIGITS = 3

_NUMBER = r"-?\d+(?:\.\d+)?"
_EXPRESSION_QUESTION = re.compile(r"What is ([0-9+\-* ]+)\?")
_CONVERT_QUESTION = re.compile(rf"Convert ({_NUMBER}) ([A-Za-z]+) to ([A-Za-z]+)\.")
_ANSWER = re.compile(rf"({_NUMBER})(?:\s*([A-Za-z]+))?")


def decimal_text(value: Fraction) -> str:
    """A terminating fraction as a plain decimal: 3500, 0.035, -12 (no exponent, no trailing zeros)."""
    sign = "-" if value < 0 else ""
    value = abs(value)
    whole, rest = divmod(value.numerator, value.denominator)
    digits = []
    while rest and len(digits) < 30:
        rest *= 10
        digit, rest = divmod(rest, value.denominator)
        digits.append(str(digit))
    if rest:
        raise ValueError(f"{value} is not a terminating decimal")
    return sign + str(whole) + ("." + "".join(digits) if digits else "")


def evaluate_expression(expression: str) -> int:
    """The value of an expression of integers, +, - and * (parsed by ``ast``: nothing else is evaluated)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            return left + right if isinstance(node.op, ast.Add) else (
                left - right if isinstance(node.op, ast.Sub) else left * right)
        raise ValueError(f"not an arithmetic expression of integers: {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def parse_instruction(instruction: str) -> dict | None:
    """The spec of a question written by this family (answer and unit computed from it), or None."""
    match = _EXPRESSION_QUESTION.fullmatch(instruction)
    if match:
        try:
            answer = evaluate_expression(match[1])
        except (ValueError, SyntaxError):
            return None
        return {"family": FAMILY, "question": instruction, "answer": str(answer), "unit": None}
    match = _CONVERT_QUESTION.fullmatch(instruction)
    if match and match[2] in UNITS and match[3] in UNITS and UNITS[match[2]][0] == UNITS[match[3]][0]:
        answer = Fraction(match[1]) * UNITS[match[2]][1] / UNITS[match[3]][1]
        return {"family": FAMILY, "question": instruction, "answer": decimal_text(answer), "unit": match[3]}
    return None


def render_instruction(spec: dict) -> str:
    return spec["question"]


def failed_constraints(spec: dict, response: str) -> list[int]:
    """[0] if the last number of the response (with its unit, for a conversion) is not the answer, else []."""
    matches = list(_ANSWER.finditer(response))
    if not matches:
        return [0]
    last = matches[-1]
    if Fraction(last[1]) != Fraction(spec["answer"]):
        return [0]
    if spec["unit"] is not None and last[2] != spec["unit"]:
        return [0]
    return []


def _digit_swap(value: int, rng: random.Random) -> int | None:
    digits = list(str(abs(value)))
    places = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
    if not places:
        return None
    i = rng.choice(places)
    digits[i], digits[i + 1] = digits[i + 1], digits[i]
    if digits[0] == "0":
        return None
    return int("".join(digits)) * (-1 if value < 0 else 1)


def _draw_expression(rng: random.Random, hardness: int, digits: int) -> tuple[str, str, str] | None:
    largest = 10 ** digits - 1
    terms = [str(rng.randint(2, largest))]
    for _ in range(hardness):
        operator = rng.choice("+-*" if hardness >= 2 else "+-")
        terms += [operator, str(rng.randint(2, 9) if operator == "*" else rng.randint(2, largest))]
    question = f"What is {' '.join(terms)}?"
    answer = evaluate_expression(" ".join(terms))
    slip = rng.choice(("off_by_one", "off_by_ten", "digit_swap"))
    if slip == "off_by_one":
        wrong = answer + rng.choice((-1, 1))
    elif slip == "off_by_ten":
        wrong = answer + rng.choice((-10, 10))
    else:
        wrong = _digit_swap(answer, rng)
        if wrong is None:
            return None
    return question, f" The answer is {answer}.", f" The answer is {wrong}."


def _draw_conversion(rng: random.Random, hardness: int, digits: int) -> tuple[str, str, str] | None:
    source = rng.choice(sorted(UNITS))
    dimension, size = UNITS[source]
    targets = [u for u, (d, s) in UNITS.items() if d == dimension and u != source
               and (dimension != "time" or s < size)]  # time only downward: 7 min = 7/60 h never ends
    if not targets:
        return None
    target = rng.choice(sorted(targets))
    decimals = min(hardness - 1, 2)
    value = Fraction(rng.randint(1, (10 ** digits - 1) * 10 ** decimals), 10 ** decimals)
    factor = size / UNITS[target][1]
    answer = value * factor
    wrong_factors = [factor * 10, factor / 10] + [s1 / s2 for u1, (d1, s1) in UNITS.items()
                                                  for u2, (d2, s2) in UNITS.items()
                                                  if d1 == d2 == dimension and s1 / s2 != factor and s1 > s2
                                                  and (factor > 1) == (s1 / s2 > 1)]
    wrong = value * rng.choice(wrong_factors)
    if wrong == answer:
        return None
    try:
        wrong_text = decimal_text(wrong)
    except ValueError:
        return None
    question = f"Convert {decimal_text(value)} {source} to {target}."
    chosen = f" {decimal_text(value)} {source} is {decimal_text(answer)} {target}."
    return question, chosen, f" {decimal_text(value)} {source} is {wrong_text} {target}."


def draw_example(rng: random.Random, knobs) -> tuple[dict, str, str] | None:
    """One (spec, chosen, rejected) at ``knobs.hardness`` with ``knobs.digits``-digit numbers, of kind
    ``knobs.kind`` or else either kind half and half; None when the draw gives no nearly-right answer
    (drawn again)."""
    if knobs.kind:
        draw = _draw_expression if knobs.kind == "expression" else _draw_conversion
    else:
        draw = _draw_expression if rng.random() < 0.5 else _draw_conversion
    drawn = draw(rng, knobs.hardness, knobs.digits)
    if drawn is None:
        return None
    question, chosen, rejected = drawn
    spec = parse_instruction(question)
    if spec is None or failed_constraints(spec, chosen) or failed_constraints(spec, rejected) != [0]:
        return None
    return spec, chosen, rejected
