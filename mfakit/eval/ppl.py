"""Sliding-window perplexity of a causal LM (a model object) on a token stream."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from mfakit.errors import MfakitError, OptionsError
from mfakit.scoring import stream_nll, windows
from mfakit.texts import TextSource, fingerprint, load_texts, tokenize


@dataclass
class PerplexityResult:
    model: str
    ppl: float
    nll: float
    tokens: int
    seconds: float
    tokens_per_second: float
    seq_len: int
    stride: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_ids(tokenizer, sources: list[TextSource], max_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """The evaluation text of `sources` (the held-out part of a built-in corpus) as one token stream, cut to
    `max_tokens`, and its description with checksum."""
    texts = [t for source in sources for t in load_texts(source, part="evaluation")]
    ids = tokenize(tokenizer, texts)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, f"{' + '.join(map(str, sources))} [{fingerprint(texts)}]"


def check_windows(seq_len: int, stride: int | None, max_tokens: int | None, batch_size: int) -> None:
    """One-line errors for window settings no evaluation can use, before any model is loaded."""
    if seq_len < 2:
        raise OptionsError(f"seq_len must be at least 2 (a token and its successor), got {seq_len}")
    if stride is not None and not 0 < stride <= seq_len:
        raise OptionsError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise OptionsError(f"max_tokens must be at least 2, got {max_tokens}")
    if batch_size < 1:
        raise OptionsError(f"batch_size must be at least 1, got {batch_size}")


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    batch_size: int = 1,
    name: str = "",
    text: str = "",
) -> PerplexityResult:
    """Perplexity of a model on a 1-D token stream in windows of `seq_len` every `stride` tokens (default:
    non-overlapping); `name` and `text` label the result."""
    stride = seq_len if stride is None else stride
    windows(ids.numel(), seq_len, stride)  # a text shorter than one window is the first thing to say
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise OptionsError(f"seq_len {seq_len} is above the model's context of {context} tokens")
    start = time.time()
    nll, count = stream_nll(model, ids, seq_len, stride, batch_size)
    seconds = time.time() - start
    if not math.isfinite(nll):
        raise MfakitError(
            f"{name or 'the model'}: the log-likelihood is {nll}: its weights hold NaN or infinite values"
        )
    return PerplexityResult(
        model=name,
        ppl=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        seconds=seconds,
        tokens_per_second=count / seconds if seconds > 0 else float("inf"),
        seq_len=seq_len,
        stride=stride,
        text=text,
    )
