"""The ``format`` family: instructions with verifiable format constraints and ECD hard negatives.

Evolutionary Contrastive Distillation (ECD; "Evolutionary Contrastive Distillation for Language Model
Alignment", Katz-Samuels et al. 2024): an instruction is made more complex by adding one constraint; the
response that satisfied the simpler instruction becomes the rejected answer, because it misses exactly
the added constraint, and the chosen answer satisfies all of them.

Here a response is assembled from pieces, so both answers of a pair come from the same material and
differ only where the added constraint forces them to (a close negative):

    filler words (sentences about the topic, cut to a word budget)
    [+ "Remember <keyword>."]  [+ "<ending phrase>"]     then split into bullets, then the case applied

Constraints, at most one per group (two of a group would contradict or duplicate each other):

==============  ==========================================================  =========================
group           constraint (kind and how it reads in the prompt)            verified by
==============  ==========================================================  =========================
length          exact_words ``Use exactly N words.``                        word count == N
                max_words ``Use at most N words.``                          word count <= N
case            lowercase ``Write in lowercase letters only.``              text == text.lower()
                uppercase ``Write in uppercase letters only.``              text == text.upper()
keyword         keyword ``Include the word "K".``                           K as a whole word
ending          ends_with ``End with the phrase "P".``                      stripped text ends with P
bullets         bullets ``Answer as a list of exactly N bullet points...``  N lines "- ...", no others
==============  ==========================================================  =========================

A word is a whitespace-separated token with at least one letter or digit (bullet dashes do not count);
keyword and ending compare case-insensitively, so that a case constraint never contradicts them.
"""

from __future__ import annotations

import random
import re

from amalab.errors import ConfigError

FAMILY = "format"

#: topic -> sentences about it (the filler material); a topic contains no period (the prompt parser needs it)
TOPICS: dict[str, tuple[str, ...]] = {
    "bread": ("Bread needs flour, water, salt and yeast.", "The dough rises in a warm place.",
              "Bake it until the crust turns brown.", "Fresh bread smells wonderful."),
    "the ocean": ("The ocean covers most of the planet.", "Its water is salty.",
                  "Many fish and whales live there.", "Waves are pushed by the wind."),
    "cats": ("Cats sleep for most of the day.", "They clean their fur with their tongues.",
             "A cat purrs when it is content.", "Cats can see well in dim light."),
    "the moon": ("The moon orbits the earth.", "It reflects light from the sun.",
                 "Its phases repeat about every month.", "Tides follow the pull of the moon."),
    "gardening": ("Plants need light, water and soil.", "Seeds sprout in the spring.",
                  "Weeds compete with the crops.", "A garden rewards steady care."),
    "bicycles": ("A bicycle has two wheels and pedals.", "Riding one is good exercise.",
                 "Gears make hills easier to climb.", "Check the tires before a ride."),
    "rain": ("Rain falls from clouds.", "It fills rivers and lakes.",
             "Plants drink the water from the ground.", "An umbrella keeps you dry."),
    "libraries": ("A library lends books for free.", "Readers keep quiet there.",
                  "Librarians help people find answers.", "Many libraries offer computers too."),
    "coffee": ("Coffee is brewed from roasted beans.", "It contains caffeine.",
               "Many people drink it in the morning.", "Milk makes it milder."),
    "volcanoes": ("A volcano releases molten rock.", "Lava cools into new stone.",
                  "Some volcanoes sleep for centuries.", "Ash can travel very far."),
    "trains": ("Trains run on steel rails.", "They carry people and goods.",
               "A long train can pull many cars.", "Stations connect the lines."),
    "honey bees": ("Bees collect nectar from flowers.", "They turn it into honey.",
                   "A hive has one queen.", "Bees help plants make fruit."),
    "chess": ("Chess is played on a board of squares.", "Each side starts with sixteen pieces.",
              "The goal is to trap the king.", "Good players plan several moves ahead."),
    "winter": ("Winter brings short days.", "Snow covers the fields.",
               "People wear warm coats.", "Lakes can freeze solid."),
    "maps": ("A map shows places from above.", "It has a scale and a legend.",
             "North is usually at the top.", "Maps help travelers find their way."),
    "tea": ("Tea is made from dried leaves.", "Steep it in hot water.",
            "Green and black tea come from one plant.", "Some people add lemon."),
    "rivers": ("A river flows toward the sea.", "It carves valleys over time.",
               "Towns often grow along rivers.", "Fish swim against the current."),
    "clocks": ("A clock shows the time.", "Its hands turn in circles.",
               "Some clocks tick loudly.", "Digital clocks show numbers."),
    "mountains": ("Mountains rise high above the plains.", "The air is thin at the top.",
                  "Snow stays on the peaks.", "Climbers need good boots."),
    "music": ("Music is made of sound and rhythm.", "A melody is a line of notes.",
              "People sing and play instruments.", "Songs can lift the mood."),
}

#: required words; none occurs in any topic sentence or ending phrase (tested), so a response without the
#: keyword sentence never contains one by accident
KEYWORDS = ("patience", "harmony", "curiosity", "balance", "courage", "lantern", "compass", "velvet",
            "orchard", "puzzle", "silver", "marble", "kindness", "journey", "anchor", "meadow")

#: required endings; no topic sentence or keyword sentence ends like one of them (tested)
ENDINGS = ("Hope this helps.", "That is all.", "Thanks for asking.", "Have a nice day.", "Any questions?",
           "The end.")

VERBS = ("Write about", "Tell me about", "Describe", "Explain")

GROUPS = {"exact_words": "length", "max_words": "length", "lowercase": "case", "uppercase": "case",
          "keyword": "keyword", "ends_with": "ending", "bullets": "bullets"}
KINDS = tuple(GROUPS)
#: what the ``kind`` knob may ask for: the kind of the added constraint
DRAW_KINDS = KINDS

#: hardness = the number of constraints of the evolved instruction: one per group at most
MAX_HARDNESS = len(set(GROUPS.values()))

_WORD = re.compile(r"[A-Za-z0-9]")


# --- rendering and parsing prompts -------------------------------------------------------------------

def render_constraint(constraint: dict) -> str:
    """The sentence of the prompt that states one constraint."""
    kind = constraint["kind"]
    if kind == "exact_words":
        return f"Use exactly {constraint['n']} words."
    if kind == "max_words":
        return f"Use at most {constraint['n']} words."
    if kind == "lowercase":
        return "Write in lowercase letters only."
    if kind == "uppercase":
        return "Write in uppercase letters only."
    if kind == "keyword":
        return f'Include the word "{constraint["word"]}".'
    if kind == "ends_with":
        return f'End with the phrase "{constraint["phrase"]}".'
    if kind == "bullets":
        return f'Answer as a list of exactly {constraint["n"]} bullet points, each starting with "- ".'
    raise ConfigError(f"format: unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")


def render_instruction(spec: dict) -> str:
    sentences = [f"{spec['verb']} {spec['topic']}."] + [render_constraint(c) for c in spec["constraints"]]
    return " ".join(sentences)


_CONSTRAINT_PATTERNS = (
    (re.compile(r"Use exactly (\d+) words\."), lambda m: {"kind": "exact_words", "n": int(m[1])}),
    (re.compile(r"Use at most (\d+) words\."), lambda m: {"kind": "max_words", "n": int(m[1])}),
    (re.compile(r"Write in lowercase letters only\."), lambda m: {"kind": "lowercase"}),
    (re.compile(r"Write in uppercase letters only\."), lambda m: {"kind": "uppercase"}),
    (re.compile(r'Include the word "([^"]+)"\.'), lambda m: {"kind": "keyword", "word": m[1]}),
    (re.compile(r'End with the phrase "([^"]+)"\.'), lambda m: {"kind": "ends_with", "phrase": m[1]}),
    (re.compile(r'Answer as a list of exactly (\d+) bullet points, each starting with "- "\.'),
     lambda m: {"kind": "bullets", "n": int(m[1])}),
)
_HEAD = re.compile(r"(" + "|".join(VERBS) + r") ([^.]+)\.")


def parse_instruction(instruction: str) -> dict | None:
    """The spec of an instruction written by :func:`render_instruction`, or None if it is not one."""
    head = _HEAD.match(instruction)
    if head is None:
        return None
    constraints, position = [], head.end()
    while position < len(instruction):
        if instruction[position] != " ":
            return None
        position += 1
        for pattern, build in _CONSTRAINT_PATTERNS:
            match = pattern.match(instruction, position)
            if match:
                constraints.append(build(match))
                position = match.end()
                break
        else:
            return None
    if not constraints:
        return None
    return {"family": FAMILY, "verb": head[1], "topic": head[2], "constraints": constraints}


# --- verifying ---------------------------------------------------------------------------------------

def count_words(text: str) -> int:
    return sum(1 for token in text.split() if _WORD.search(token))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def satisfies(constraint: dict, response: str) -> bool:
    """Whether ``response`` meets one constraint (see the module docstring for each check)."""
    kind, text = constraint["kind"], response.strip()
    if kind == "exact_words":
        return count_words(text) == constraint["n"]
    if kind == "max_words":
        return count_words(text) <= constraint["n"]
    if kind == "lowercase":
        return text == text.lower() and any(c.isalpha() for c in text)
    if kind == "uppercase":
        return text == text.upper() and any(c.isalpha() for c in text)
    if kind == "keyword":
        return re.search(rf"\b{re.escape(constraint['word'].lower())}\b", text.lower()) is not None
    if kind == "ends_with":
        return text.lower().endswith(constraint["phrase"].lower())
    if kind == "bullets":
        lines = _lines(text)
        return len(lines) == constraint["n"] and all(line.startswith("- ") and count_words(line) > 0
                                                     for line in lines)
    raise ConfigError(f"format: unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")


def failed_constraints(spec: dict, response: str) -> list[int]:
    """Indices of the constraints of ``spec`` that ``response`` misses."""
    return [i for i, c in enumerate(spec["constraints"]) if not satisfies(c, response)]


# --- building responses ------------------------------------------------------------------------------

def _filler_words(topic: str, start: int, count: int) -> list[str]:
    """``count`` words of the topic's sentences, read cyclically from sentence ``start``; the last word
    closes a sentence (a period is added when the cut falls mid-sentence)."""
    sentences = TOPICS[topic]
    words: list[str] = []
    index = start
    while len(words) < count:
        words.extend(sentences[index % len(sentences)].split())
        index += 1
    words = words[:count]
    if words and not words[-1].endswith((".", "!", "?")):
        words[-1] = words[-1].rstrip(",") + "."
    return words


def build_response(topic: str, constraints: list[dict], *, start: int, natural_length: int) -> str | None:
    """The response meeting ``constraints``, from the topic's sentences (None when they cannot all be met).

    ``natural_length``: the word count when no length constraint says otherwise (max_words caps it).
    """
    by_kind = {c["kind"]: c for c in constraints}
    tail: list[str] = []
    if "keyword" in by_kind:
        tail += ["Remember", by_kind["keyword"]["word"] + "."]
    if "ends_with" in by_kind:
        tail += by_kind["ends_with"]["phrase"].split()
    total = natural_length
    if "exact_words" in by_kind:
        total = by_kind["exact_words"]["n"]
    elif "max_words" in by_kind:
        total = min(total, by_kind["max_words"]["n"])
    items = by_kind["bullets"]["n"] if "bullets" in by_kind else 1
    filler_count = total - len(tail)
    if filler_count < items:  # every bullet (or the one paragraph) needs at least one word of its own
        return None
    # the filler budget split evenly into the items, each item starting at a sentence of its own; the
    # keyword sentence and the ending close the last one
    cuts = [round(i * filler_count / items) for i in range(items + 1)]
    parts = [_filler_words(topic, start + i, cuts[i + 1] - cuts[i]) for i in range(items)]
    parts[-1] = parts[-1] + tail
    if "bullets" in by_kind:
        text = "\n".join("- " + " ".join(part) for part in parts)
    else:
        text = " ".join(parts[0])
    if "lowercase" in by_kind:
        text = text.lower()
    elif "uppercase" in by_kind:
        text = text.upper()
    return " " + text  # completions start with a space, as in the other tasks


def _draw_constraint(kind: str, rng: random.Random) -> dict:
    """A constraint of ``kind`` with random parameters (a length or count is redrawn if it cannot be met)."""
    if kind in ("exact_words", "max_words"):
        return {"kind": kind, "n": rng.randint(6, 40)}
    if kind == "keyword":
        return {"kind": kind, "word": rng.choice(KEYWORDS)}
    if kind == "ends_with":
        return {"kind": kind, "phrase": rng.choice(ENDINGS)}
    if kind == "bullets":
        return {"kind": kind, "n": rng.randint(2, 5)}
    return {"kind": kind}


def draw_example(rng: random.Random, knobs) -> tuple[dict, str, str] | None:
    """One (spec, chosen, rejected) with ``knobs.hardness`` constraints, the last one added by evolution
    (of kind ``knobs.kind`` when one is given; the others then from the other groups).

    None when the draw cannot make a valid pair (e.g. a word budget too small for the other constraints,
    or the base response already meets the added constraint); the caller draws again.
    """
    hardness = knobs.hardness
    topic = rng.choice(sorted(TOPICS))
    if knobs.kind:
        others = sorted(set(GROUPS.values()) - {GROUPS[knobs.kind]})
        groups = rng.sample(others, hardness - 1)
        kinds = [rng.choice([k for k, g in GROUPS.items() if g == group]) for group in groups] + [knobs.kind]
    else:
        groups = rng.sample(sorted(set(GROUPS.values())), hardness)
        kinds = [rng.choice([k for k, g in GROUPS.items() if g == group]) for group in groups]
    constraints = [_draw_constraint(kind, rng) for kind in kinds]
    spec = {"family": FAMILY, "verb": rng.choice(VERBS), "topic": topic, "constraints": constraints}
    start, natural_length = rng.randrange(len(TOPICS[topic])), rng.randint(12, 30)
    rejected = build_response(topic, constraints[:-1], start=start, natural_length=natural_length)
    chosen = build_response(topic, constraints, start=start, natural_length=natural_length)
    if rejected is None or chosen is None:
        return None
    # the ECD property, checked by the verifier itself: the draw is kept only if it holds
    if failed_constraints(spec, chosen) or failed_constraints(spec, rejected) != [len(constraints) - 1]:
        return None
    return spec, chosen, rejected
