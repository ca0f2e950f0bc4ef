"""Methods: what a generalist trains with, for every caller (the LLM pipeline, the MuJoCo suite, configs).

A method is a mixer of :data:`amalab.mixers.MIXERS`, or a baseline that changes the training loss instead
(:data:`LOSS_BASELINES`). A mixer measures its excess against baseline losses s(z) named by its
``baseline`` (docs/maths.md sections 3 and 7): the specialists' losses, the standard generalist's (DoReMi),
or none; :func:`baseline_losses` is the one place that choice is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from amalab.mixers.base import Mixer
from amalab.mixers.registry import MIXERS, make_mixer

#: Methods that are not a mixer of their own: (the mixer they train with, the loss they train on). ``sft`` is
#: supervised fine-tuning on the chosen responses of the union (reference-free NLL, the size-proportional
#: mixture), the baseline parameter-efficient alignment studies put beside DPO. Every method is still
#: evaluated in the config's loss, so its excess over the specialists is comparable.
LOSS_BASELINES = {"sft": ("standard", "sft")}
METHODS = (*MIXERS, *LOSS_BASELINES)


def method_mixer_and_loss(method: str, loss: str) -> tuple[str, str]:
    """The mixer a generalist method trains with and its training loss (``loss``: the config's)."""
    return LOSS_BASELINES.get(method, (method, loss))


def make_method(method: str, k: int, sizes: list[int], options: dict, loss: str) -> tuple[Mixer, str]:
    """(the mixer, the training loss) of ``method`` over ``k`` tasks of ``sizes`` training examples, with the
    mixer's ``options`` (a method without a mixer of its own takes none)."""
    mixer_name, loss_name = method_mixer_and_loss(method, loss)
    return make_mixer(mixer_name, k, sizes=sizes, **options), loss_name


def baseline_losses(mixer: Mixer, specialist: Callable[[], list], standard: Callable[[], list]) -> list | None:
    """Per task, the s(z) ``mixer`` trains against: ``specialist()``, ``standard()`` (the standard
    generalist's losses, so standard trains first) or None (no baseline, s = 0). Only the chosen one is
    called."""
    source = {"specialist": specialist, "standard": standard}.get(mixer.baseline)
    return None if source is None else source()


@dataclass(frozen=True)
class MethodsConfig:
    #: methods to train generalists with, in order: amalab.mixers names, or "sft" (the standard mixture trained
    #: on the chosen responses' NLL); a method measuring excess over the standard generalist (doremi) comes
    #: after standard (:func:`load_llm_config`)
    names: list[str] = field(default_factory=lambda: ["standard", "ama-r", "ama-s"])
    #: seeds per method (a method listed in seeds_per_method gets that many instead)
    seeds: int = 1
    seeds_per_method: dict = field(default_factory=dict)
    #: methods also trained against the in-sample specialist losses (docs/maths.md section 12), reported as
    #: "<method>-in-sample"; needs [specialists] cross_fit >= 2 and a method measured against the specialists
    in_sample: list[str] = field(default_factory=list)
    #: options of each mixer, e.g. ama-r = { eta_alpha = 1.0 }
    options: dict = field(default_factory=lambda: {"ama-r": {"eta_alpha": 1.0}, "ama-r-sim": {"eta_alpha": 1.0},
                                                   "doremi": {"eta_alpha": 1.0}, "ama-s": {"gamma": 0.3},
                                                   "odm": {"gamma": 0.3}})

    def check(self) -> None:
        if not self.names:
            raise ValueError("names: give at least one method")
        for name in self.names:
            if name not in METHODS:
                raise ValueError(f"names: unknown method {name!r}; known: {', '.join(METHODS)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names: a method is listed twice: {self.names}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for name, n in self.seeds_per_method.items():
            if name not in METHODS:
                raise ValueError(f"seeds_per_method: unknown method {name!r}; known: {', '.join(METHODS)}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"seeds_per_method.{name}: expected an integer >= 1, got {n!r}")
        for name in self.in_sample:
            if name not in self.names:
                raise ValueError(f"in_sample: {name!r} is not one of names {self.names}")
        if len(set(self.in_sample)) != len(self.in_sample):
            raise ValueError(f"in_sample: a method is listed twice: {self.in_sample}")
        for name, opts in self.options.items():
            if name not in MIXERS:
                raise ValueError(f"options: unknown mixer {name!r}")
            if not isinstance(opts, dict):
                raise ValueError(f"options.{name}: expected a table, got {opts!r}")

    def seeds_of(self, name: str) -> int:
        return int(self.seeds_per_method.get(name, self.seeds))

    def runs(self) -> list[tuple[str, str, bool]]:
        """(label, method, in-sample?) of every generalist variant, in order: each method, then its in-sample
        variant right after it (a method's seeds apply to both)."""
        return [(label, name, in_sample) for name in self.names
                for label, in_sample in [(name, False)] + ([(f"{name}-in-sample", True)]
                                                           if name in self.in_sample else [])]
