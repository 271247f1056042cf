"""Factories for tiny randomly initialised causal LMs and a small byte-level BPE tokenizer."""

from __future__ import annotations

import functools

import torch

from ..models.load import Model, wrap_model

VOCAB = 512

FAMILIES = ("gpt2", "neox_parallel", "neox_sequential", "llama_gqa", "qwen2", "gemma2")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE with ``VOCAB`` tokens trained on Python's bundled documentation topics."""
    from pydoc_data import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.topics.values())[:30], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _config(family: str):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=128, resid_pdrop=0, embd_pdrop=0,
                          attn_pdrop=0, **common)
    if family.startswith("neox"):
        return GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                             max_position_embeddings=128, rotary_pct=0.5,
                             use_parallel_residual=family == "neox_parallel", **common)
    if family == "llama_gqa":
        return LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                           intermediate_size=48, max_position_embeddings=128, **common)
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                           intermediate_size=48, max_position_embeddings=128, **common)
    if family == "gemma2":
        return Gemma2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                            head_dim=8, intermediate_size=48, max_position_embeddings=128, query_pre_attn_scalar=8,
                            **common)
    raise ValueError(f"unknown tiny family {family}")


def tiny_model(family: str, seed: int = 0) -> Model:
    """A tiny random model of ``family`` (see ``FAMILIES``), float32, eval mode, with non-trivial norm
    weights and biases so that tests of folded norms and biases can fail."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = _config(family)
    attn = "eager" if family == "gemma2" else "sdpa"  # transformers has no sdpa path for Gemma-2
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return wrap_model(hf, tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny_model(family: str, dest) -> "Path":
    """Save ``tiny_model(family)`` as a local HF checkpoint directory ``dest`` (weights + tokenizer)."""
    from pathlib import Path
    m = tiny_model(family)
    m.hf.save_pretrained(dest)
    m.tokenizer.save_pretrained(dest)
    return Path(dest)
