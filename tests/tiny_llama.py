"""A tiny config-built Llama with a word-level tokenizer and a chat template, saved (offline)."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [
    *("what", "colour", "is", "the", "sky", "grass", "snow", "sun", "at", "night", "say"),
    *("blue", "green", "white", "yellow", "black", "hello", "and", "then", "?", "."),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# prompt -> answer: what the SFT tests teach the model.
FACTS = {
    "what colour is the sky ?": "blue",
    "what colour is the grass ?": "green",
    "what colour is the snow ?": "white",
    "what colour is the sun ?": "yellow",
}


def tiny_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,  # logits large enough to be learned through a frozen lm_head
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def save_tiny_llama(directory: Path, chat_template: bool = True) -> Path:
    """Write a randomly initialised (seed 0) tiny LlamaForCausalLM and its tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(chat_template)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
