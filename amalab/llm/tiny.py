"""A tiny Llama and its tokenizer, built from a config rather than loaded: for tests and the tiny experiment.

The tokenizer is a byte-level BPE trained on the given text, with SmolLM2's special tokens and chat template
shape; the model is a randomly initialized ``LlamaForCausalLM``, the same weights for the same seed.
"""

from __future__ import annotations

from typing import Iterable

import torch

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
    attn_implementation: str = "sdpa",
):
    """A randomly initialized ``LlamaForCausalLM`` from a ``LlamaConfig``: the same weights for the same seed,
    its attention computed by ``attn_implementation`` (transformers' name, given to the config).

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
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()
