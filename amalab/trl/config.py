"""``AMAConfig``: TRL's ``DPOConfig`` with the task mixer's settings as flat fields, so that TRL's
``TrlParser`` (and every ``HfArgumentParser``) reads them from the command line or a YAML file.

Each mixer option is None unless set; :meth:`AMAConfig.mixer_options` passes on the ones set, adds the
defaults amalab's own configs use for the options a mixer needs (``eta_alpha`` 1.0 for the AMA-R family,
``gamma`` 0.3 for EXP3), and refuses an option the chosen mixer does not take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from amalab.mixers import MIXERS
from amalab.mixers.registry import REGISTRY

#: flat field -> the mixer option it sets (amalab.mixers.registry)
OPTION_FIELDS = {"eta_alpha": "eta_alpha", "gamma": "gamma", "excess_clip": "clip",
                 "mixture_weights": "weights", "mixer_smoothing": "smoothing", "exp3_eta": "eta",
                 "gain_scale": "gain_scale", "draw_per": "draw_per"}
#: what amalab's configs use for an option a mixer requires, when the field is left unset
REQUIRED_DEFAULTS = {"eta_alpha": 1.0, "gamma": 0.3}


@dataclass
class AMAConfig(DPOConfig):
    """A ``DPOConfig`` that trains the generalist of docs/maths.md sections 3, 4 and 8 with a task mixer."""

    mixer: str = field(default="ama-r-sim", metadata={
        "help": "the task mixer: " + "; ".join(f"{name}: {text}" for name, text in MIXERS.items())})
    eta_alpha: float | None = field(default=None, metadata={
        "help": "AMA-R / DoReMi step size of the exponentiated-gradient task weights (default 1.0)"})
    gamma: float | None = field(default=None, metadata={
        "help": "AMA-S / ODM: EXP3's exploration rate in (0, 1] (default 0.3)"})
    excess_clip: str | None = field(default=None, metadata={
        "help": "where the excess over s(z) is clipped at 0: 'example' (default), 'task' or 'none'"})
    mixture_weights: list[float] | None = field(default=None, metadata={
        "help": "mixer 'mixture': the fixed task weights, one per task in sorted task-name order"})
    mixer_smoothing: float | None = field(default=None, metadata={
        "help": "AMA-R / DoReMi: mixing of the weights with uniform"})
    exp3_eta: float | None = field(default=None, metadata={"help": "AMA-S / ODM: EXP3's learning rate"})
    gain_scale: str | None = field(default=None, metadata={"help": "AMA-S / ODM: EXP3's gain scale"})
    draw_per: str | None = field(default=None, metadata={
        "help": "AMA-S / ODM: draw a task per 'example' (default) or per 'batch'"})
    task_column: str = field(default="task", metadata={"help": "the dataset column naming each pair's task"})
    task_names: list[str] | None = field(default=None, metadata={
        "help": "the tasks in order (the order of mixture_weights and of the logged weights); default: the "
                "task column's values, sorted"})
    baseline_column: str = field(default="baseline_loss", metadata={
        "help": "the dataset column holding each pair's baseline loss s(z) (its specialist's loss)"})

    def __post_init__(self):
        super().__post_init__()
        self.mixer_options()  # refused where it is set: on TrlParser's command line, before any model loads

    def mixer_options(self) -> dict:
        """The options of ``self.mixer`` set here (ValueError naming the field: an unknown mixer, or an option
        the mixer does not take)."""
        if self.mixer not in REGISTRY:
            raise ValueError(f"AMAConfig.mixer: unknown mixer {self.mixer!r}; known: {', '.join(REGISTRY)}")
        _, _, _, allowed, required = REGISTRY[self.mixer]
        options = {}
        for name, option in OPTION_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if option not in allowed:
                raise ValueError(f"AMAConfig.{name}: mixer {self.mixer!r} takes no such option"
                                 + (f" (it takes {', '.join(_fields_of(allowed))})" if allowed else ""))
            options[option] = list(value) if name == "mixture_weights" else value
        for option in required:
            field_name = _fields_of([option])[0]
            if option in options:
                continue
            if field_name not in REQUIRED_DEFAULTS:
                raise ValueError(f"AMAConfig.{field_name}: mixer {self.mixer!r} needs it")
            options[option] = REQUIRED_DEFAULTS[field_name]
        return options


def _fields_of(options) -> list[str]:
    by_option = {option: name for name, option in OPTION_FIELDS.items()}
    return [by_option[o] for o in options if o in by_option]
