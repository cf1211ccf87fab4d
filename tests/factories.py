"""Tiny tokenizers and models made inside the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model learns from a large model.",
    "distillation moves knowledge from teacher to student.",
    "temperature softens the teacher's distribution over the next token.",
] * 20


def make_tokenizer(texts: list[str] = TEXTS, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    from kd.world import train_tokenizer

    return train_tokenizer(texts, vocab_size=vocab_size)


def make_model(tokenizer, arch: str = "gpt2", n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
               vocab_pad: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    vocab = len(tokenizer) + vocab_pad
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head,
                      num_key_value_heads=n_head, intermediate_size=2 * n_embd, max_position_embeddings=128,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(cfg)


def save_pretrained_pair(path: Path, tokenizer, model) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
