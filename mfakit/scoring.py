"""Scoring a causal LM (a model object) on a token stream in sliding windows: the summed negative log-likelihood
that evaluation's perplexity and fine-tuning's held-out checks are built on."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mfakit.errors import OptionsError
from mfakit.texts import TextSourceError


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of every window: window [begin, end) scores the tokens at first_scored..end-1,
    the ones no earlier window scored. Token 0 has no context and is never scored; with stride = seq_len the windows
    do not overlap and each scores its tokens after the first."""
    if not 0 < stride <= seq_len:
        raise OptionsError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if n_tokens < seq_len:
        raise TextSourceError(f"the text has {n_tokens} tokens, fewer than one window of {seq_len}")
    out = []
    scored_to = 1
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + seq_len, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
        scored_to = end
        begin += stride
    return out


@torch.no_grad()
def stream_nll(model, ids: torch.Tensor, seq_len: int, stride: int, batch_size: int = 1) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens over a 1-D token stream (see `windows`)."""
    device = next(model.parameters()).device
    plan = windows(ids.numel(), seq_len, stride)
    total, count = 0.0, 0
    i = 0
    while i < len(plan):
        # Windows of equal length go together; the last one may be shorter.
        length = plan[i][1] - plan[i][0]
        batch = [plan[i]]
        while (
            len(batch) < batch_size
            and i + len(batch) < len(plan)
            and plan[i + len(batch)][1] - plan[i + len(batch)][0] == length
        ):
            batch.append(plan[i + len(batch)])
        i += len(batch)
        inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        for row, (b, e, first) in enumerate(batch):
            # logits at position p predict token p + 1.
            pred = logits[row, first - b - 1 : e - b - 1]
            target = inputs[row, first - b : e - b]
            total += F.cross_entropy(pred, target, reduction="sum").item()
            count += target.numel()
    return total, count
