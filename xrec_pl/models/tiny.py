"""A tiny random Llama and a tokenizer built locally, for tests and CLI smoke runs (``llm: tiny-random``).

Both build in milliseconds without any download: a byte-level BPE trained on a small built-in English corpus,
and a ``LlamaForCausalLM`` from a small ``LlamaConfig`` (MHA, or GQA with ``gqa=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# A small English corpus for the tiny tokenizer: enough merges that prompts tokenize into short sequences.
_TINY_CORPUS = """\
Explain why the user would buy the book within 50 words.
Explain why the user would enjoy the business within 50 words.
user record: book record: book name: user profile: book profile: business name: business profile:
The user enjoys mystery novels, historical fiction and thoughtful biographies with strong characters.
The user likes fantasy adventures, science fiction, romance, thrillers and cozy stories about small towns.
This book is a gripping story about a detective who solves a crime in a quiet village by the sea.
This novel follows a young woman who discovers a family secret and learns about love, loss and courage.
The restaurant serves fresh food, friendly service and great coffee in a warm and relaxed place.
The user would buy the book because it matches their interest in history, adventure and well written plots.
The user would enjoy the business because they love good food, quick service and a clean, quiet room.
You are a helpful assistant. Answer the question clearly and briefly.
Readers who liked the first book in the series will find the second one even more exciting and funny.
It is a short, easy read with beautiful writing, memorable characters and a satisfying ending.
The author writes with humor and insight about family, friendship, work, travel and the natural world.
Many users recommend this place for dinner with friends; the prices are fair and the staff are kind.
"""

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 768) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on a small built-in English corpus (deterministic, milliseconds).

    Special tokens mirror SmolLM2's: ``<|endoftext|>`` (id 0, unk), ``<|im_start|>`` (id 1, bos),
    ``<|im_end|>`` (id 2, eos); no pad token (``add_reserved_tokens`` adds one), a ChatML chat template,
    and no BOS added on encode. Byte level, so any text encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        padding_side="right",
        model_max_length=2048,
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(gqa: bool = False, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tiny random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads; ``gqa``: 2 kv heads) + tiny tokenizer.

    Weights come from ``seed`` without touching the global RNG. Reserved tokens are not added here.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=2048,
        # Larger than the usual 0.02 so that greedy decoding has clear winners (no near-ties between paths).
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = None
    return model, tokenizer
