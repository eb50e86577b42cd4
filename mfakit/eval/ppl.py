"""Sliding-window perplexity of a causal LM (a model object) on a token stream."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from mfakit.scoring import stream_nll
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
    start = time.time()
    nll, count = stream_nll(model, ids, seq_len, stride, batch_size)
    seconds = time.time() - start
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
