"""Training data for fine-tuning: text specs (as in evaluation) or text sampled from the teacher, packed into
fixed-length sequences, and a deterministic order over them that every rank and every resumed run agrees on.

A training source is any text spec of `mfakit.texts` (a built-in corpus reads its training part, never the
calibration or held-out part) or `generate:N`: N tokens sampled from the teacher, for a user who has no corpus.
Several text sources are mixed in equal shares of the run's sequences, as calibration mixes its texts.
"""

from __future__ import annotations

import zlib

import torch

from mfakit.texts import TextSource, TextSourceError, mixed_windows, parse_text_spec

GENERATE_PREFIX = "generate:"
# Sampling from the teacher's own distribution, nothing cut off: generated text is what the model itself predicts.
PURE_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def parse_training_source(spec: str, text_column: str = "text") -> TextSource | int:
    """A text source, or the number of tokens to sample from the teacher for `generate:N`."""
    if spec.startswith(GENERATE_PREFIX):
        count = spec.removeprefix(GENERATE_PREFIX)
        if not count.isdigit() or int(count) == 0:
            raise TextSourceError(f"generate:N needs a positive token count, got {spec!r}")
        return int(count)
    return parse_text_spec(spec, text_column)


def check_disjoint(train: list[TextSource | int], held_out: TextSource | None) -> None:
    """Refuse to train on the evaluation text. The built-in corpus is the exception: training reads its
    training part and evaluation its held-out part, which share no text."""
    if held_out is None or held_out.kind == "builtin":
        return
    for source in train:
        if isinstance(source, TextSource) and source.identity() == held_out.identity():
            raise TextSourceError(f"{held_out} is both training data and evaluation text; give them different text")


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens, (n, seq_len); the tail shorter than a window is dropped."""
    n = stream.numel() // seq_len
    if n == 0:
        raise TextSourceError(f"the training text has {stream.numel()} tokens, fewer than one sequence of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def sample_teacher(
    teacher: torch.nn.Module, tokenizer, n_tokens: int, seq_len: int, batch_size: int, seed: int
) -> torch.Tensor:
    """About n_tokens tokens (a whole number of seq_len sequences) sampled from the teacher at temperature 1,
    each sequence started from the beginning-of-text token; one stream."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise TextSourceError("generate:N needs a tokenizer with a beginning- or end-of-text token")
    device = next(teacher.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        pieces, total = [], 0
        while total < n_tokens:
            rows = min(batch_size, -(-(n_tokens - total) // seq_len))
            prompt = torch.full((rows, 1), start, dtype=torch.long, device=device)
            out = teacher.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                **PURE_SAMPLING,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=start,
            )
            pieces.append(out.reshape(-1).cpu())
            total += out.numel()
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(pieces)


def training_sequences(
    sources: list[TextSource | int], tokenizer, teacher, seq_len: int, seed: int, wanted: int
) -> torch.Tensor:
    """The training sequences, (n, seq_len): the text sources' training parts in equal shares of `wanted`
    sequences (`mixed_windows`: each share spread evenly over its text, all of a shorter text's windows), then
    the sequences sampled from the teacher for each generate:N, in the order given."""
    texts = [s for s in sources if isinstance(s, TextSource)]
    parts = [mixed_windows(tokenizer, texts, wanted, seq_len, part="training")[0]] if texts else []
    for count in (s for s in sources if isinstance(s, int)):
        if teacher is None:
            raise TextSourceError("generate:N samples from the teacher; give a teacher")
        parts.append(pack(sample_teacher(teacher, tokenizer, count, seq_len, batch_size=8, seed=seed), seq_len))
    return torch.cat(parts)


def sequence_indices(position: int, count: int, n_sequences: int, seed: int) -> list[int]:
    """Sequences `position .. position + count - 1` of an endless stream of epochs, each epoch a fresh permutation
    of the n_sequences seeded by (seed, epoch). A run at any step, on any rank, resumed or not, reads the same."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for p in range(position, position + count):
        epoch = p // n_sequences
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(perms[epoch][p % n_sequences])
    return out


def sequences_fingerprint(sequences: torch.Tensor) -> str:
    """A short checksum of the packed training sequences (their token ids), saved with a run's state: a resumed run
    must read the very sequences it started on."""
    return f"{zlib.crc32(memoryview(sequences.to(torch.int64).contiguous().numpy())):08x}"
