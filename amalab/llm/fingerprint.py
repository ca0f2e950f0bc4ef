"""Fingerprints: what identifies a model, a policy and a tokenizer in cache manifests and ``run.json``.

A cache silently reusing reference log-probs or losses of another model is what these guard against
(docs/maths.md section 11): a model's fingerprint covers its config (without load paths) and every byte of
its state dict.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from amalab.errors import ConfigError
from amalab.training.distributed import is_sharded
from amalab.training.state import trainable_tensors
from amalab.training.tensor_identity import state_digest, streamed_digest

#: config keys that say where or how a model was loaded, not what it computes: left out of fingerprints
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "quantization_config", "_commit_hash", "use_cache"}
)


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
    """:func:`model_fingerprint` of a policy; of a sharded one (FSDP), the digest of its trainable tensors,
    each gathered whole in turn (every rank gets the same; gathering is a collective), so no rank holds more
    than one whole tensor beside its shards; equal to the digest of ``trainable_state`` gathered at once."""
    if not is_sharded(model):
        return model_fingerprint(model)
    names, aliases, whole = trainable_tensors(model)
    return streamed_digest(names, aliases, whole, prefix="sharded policy, trainable tensors:")


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
