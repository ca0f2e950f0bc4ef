"""The preference pair z = (x, y_w, y_l) of docs/maths.md section 1, its stable id, and the HH dialogue form.

Every source of pairs (the readers of :mod:`amalab.llm.data.sources` and the synthetic tasks of
:mod:`amalab.llm.data.synthetic`) builds :class:`PreferencePair` objects with :func:`example_id`, and writes
single-turn prompts in the HH-RLHF dialogue form (:func:`single_turn_prompt`), so that tasks mixed in one
model share one format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: ``chosen`` (y_w) is preferred to ``rejected`` (y_l) as a reply to ``prompt``.

    ``id`` is a content hash, stable across runs and machines, that caches key on.
    """

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str


#: the turn marker of HH-RLHF transcripts; an implicit prompt ends with the last one the replies share
ASSISTANT_MARKER = "\n\nAssistant:"
#: the other turn marker of HH-RLHF transcripts: a transcript holding either marker is a dialogue
HUMAN_MARKER = "\n\nHuman:"
#: how a single-turn prompt starts: the human turn marker and the space before the human's text
HUMAN_TURN_OPENING = HUMAN_MARKER + " "


def example_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content hash of a pair: 32 hex digits of sha256(prompt NUL chosen NUL rejected).

    Independent of the task, the file and the row order, so caches keyed on it survive reshuffles. NUL
    separates the fields so that moving text between fields changes the id.
    """
    data = "\0".join((prompt, chosen, rejected)).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:32]


def single_turn_prompt(text: str) -> str:
    """``"\\n\\nHuman: <text>\\n\\nAssistant:"``: one human turn in the HH dialogue form.

    The replies to such a prompt start with a space (TruthfulQA and the synthetic tasks), the shape of the
    HH-RLHF pairs, so a completion is never glued to its prompt without a separator.
    """
    return f"{HUMAN_TURN_OPENING}{text}{ASSISTANT_MARKER}"


def single_turn_text(prompt: str) -> str | None:
    """The human's text of a prompt made by :func:`single_turn_prompt`; None for any other prompt."""
    if prompt.startswith(HUMAN_TURN_OPENING) and prompt.endswith(ASSISTANT_MARKER):
        return prompt[len(HUMAN_TURN_OPENING):-len(ASSISTANT_MARKER)]
    return None


def is_dialogue(transcript: str) -> bool:
    """Whether a transcript is an HH-RLHF dialogue: it holds ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``."""
    return HUMAN_MARKER in transcript or ASSISTANT_MARKER in transcript


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two transcripts sharing a prefix into (prompt, chosen completion, rejected completion).

    HH-RLHF transcripts: the prompt ends with the last ``"\\n\\nAssistant:"`` inside the longest common
    prefix, so both completions are whole assistant replies starting after "Assistant:" (usually with a
    space), even when the two replies happen to begin with the same words. Other transcripts follow
    TRL's ``extract_prompt`` (trl/data_utils.py): the longest common prefix, moved back by one character
    when it ends just after a space, so that the completions keep their leading space.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind(ASSISTANT_MARKER, 0, n)
    if marker >= 0:
        n = marker + len(ASSISTANT_MARKER)
    elif n < limit and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]
