"""Text sources shared by calibration, evaluation and fine-tuning, and their tokenisation into fixed windows.

A text spec is one of
    builtin:pydoc                      the documentation topics of the standard library (`pydoc_data.topics`)
    builtin:stdlib                     the standard library's source code (every module outside its tests)
    builtin:docstrings                 the docstrings of those modules (prose about code)
    file:PATH  (or just PATH)          a plain text file; .json/.jsonl/.parquet/.csv files go through `datasets`
    dataset:NAME[:CONFIG[:SPLIT]]      anything `datasets.load_dataset` resolves (a hub name, a local folder)

Every built-in corpus ships with Python and is split into three parts that share no document: the documents (topics
by name, modules by path), sorted, go by their index modulo 5: 0 and 1 to the calibration part, 2 to the held-out
evaluation part (16 of 79 topics in Python 3.11), 3 and 4 to the training part. Conversion reads the calibration
part, fine-tuning the training part, evaluation the evaluation part, so that no fine-tuning run learns the text its
conversion was fitted on. The source-code corpora are large (12 MB); calibration and training read the heads of
documents spread evenly over them, so that their windows come from many modules.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mfakit.errors import MfakitError, first_line

BUILTINS = ("pydoc", "stdlib", "docstrings")
# What conversion calibrates on unless told otherwise: all three built-in corpora in equal shares. Chosen on the
# quality benchmark's development domains (docs/benchmarks.md): against pydoc alone, MFA-KR at a quarter of the
# cache went from 4.41x to 3.40x the source's perplexity on text neither had seen.
DEFAULT_CALIBRATION = tuple(f"builtin:{name}" for name in BUILTINS)
# A large built-in corpus is read as the heads of documents spread over it, of this many characters per window
# token, until as many heads' worth of text as there are windows: 3-4 characters make a token, so the windows
# come from about as many modules as there are windows.
CHARS_PER_WINDOW_SAMPLED = 6
STDLIB_SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# The part of a built-in corpus each document belongs to, by its sorted index modulo 5 (the evaluation part, index 2,
# is the held-out split every earlier table used; calibration and training halve the rest).
PART_BY_INDEX = ("calibration", "calibration", "evaluation", "training", "training")
PARTS = ("calibration", "training", "evaluation")
DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class TextSourceError(MfakitError):
    """A text spec that cannot be read."""


@dataclass(frozen=True)
class TextSource:
    """kind: 'builtin', 'file' or 'dataset'; name: builtin name, path, or dataset NAME[:CONFIG[:SPLIT]]."""

    kind: str
    name: str
    text_column: str = "text"

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def identity(self) -> str:
        """What two specs share when they read the same text (a resolved path for files)."""
        return str(Path(self.name).resolve()) if self.kind == "file" else str(self)


def parse_text_spec(spec: str, text_column: str = "text") -> TextSource:
    """The text source a spec names (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "builtin":
        if rest not in BUILTINS:
            raise TextSourceError(f"unknown built-in corpus {rest!r} (known: {', '.join(BUILTINS)})")
        return TextSource("builtin", rest)
    if sep and kind == "dataset":
        return TextSource("dataset", rest, text_column)
    if sep and kind == "file":
        return TextSource("file", rest, text_column)
    if spec in BUILTINS:
        return TextSource("builtin", spec)
    if Path(spec).exists():
        return TextSource("file", spec, text_column)
    raise TextSourceError(
        f"{spec!r} is neither an existing file nor builtin:NAME, file:PATH or dataset:NAME[:CONFIG[:SPLIT]]"
    )


def builtin_texts(name: str, part: str | tuple[str, ...], sample: tuple[int, int] | None = None) -> list[str]:
    """The documents of one part of a built-in corpus, or of several parts in corpus order (see the module docstring
    for the split). A source-code corpus read with `sample` = (characters per document, characters in all) gives
    documents spread evenly over the corpus, each cut to its first characters, until the total: many documents'
    worth of text for few windows."""
    if name not in BUILTINS:
        raise TextSourceError(f"unknown built-in corpus {name!r} (known: {', '.join(BUILTINS)})")
    parts = (part,) if isinstance(part, str) else part
    if not set(parts) <= set(PARTS):
        raise ValueError(f"parts must be among {PARTS}")
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for i, k in enumerate(sorted(topics)) if PART_BY_INDEX[i % 5] in parts]
    files = [f for i, f in enumerate(stdlib_modules()) if PART_BY_INDEX[i % 5] in parts]
    read = _read_source if name == "stdlib" else _docstrings
    head, wanted = sample if sample is not None else (None, None)
    texts: dict[int, str] = {}
    total = 0
    for index in _spread_order(len(files)):
        text = read(files[index])[:head]
        if text.strip():
            texts[index] = text
            total += len(text)
        if wanted is not None and total >= wanted:
            break
    return [texts[i] for i in sorted(texts)]


def stdlib_modules() -> list[Path]:
    """The standard library's .py files outside its test folders, sorted by their path inside the library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIPPED]
        found += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread evenly over the range (van der Corput: bit-reversed)."""
    bits = max(1, (n - 1).bit_length())
    order = sorted(range(1 << bits), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
    return [i for i in order if i < n]


def _read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _docstrings(path: Path) -> str:
    """The module, class and function docstrings of a Python file, in file order, as one text."""
    try:
        tree = ast.parse(_read_source(path))
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def _dataset_texts(
    path_or_name: str, config: str | None, split: str, column: str, data_files: str | None = None
) -> list[str]:
    import datasets

    try:
        if data_files is not None:
            ds = datasets.load_dataset(path_or_name, data_files=data_files, split=split)
        else:
            ds = datasets.load_dataset(path_or_name, config, split=split)
    except Exception as err:  # datasets raises many types (network, missing, format); one line is what helps
        raise TextSourceError(f"dataset {path_or_name!r} could not be loaded: {first_line(err)}") from err
    if column not in ds.column_names:
        raise TextSourceError(
            f"dataset {path_or_name!r} has no column {column!r} (columns: {', '.join(ds.column_names)})"
        )
    return [t for t in ds[column] if isinstance(t, str) and t]


def load_texts(source: TextSource, part: str = "calibration", sample: tuple[int, int] | None = None) -> list[str]:
    """The documents of a text source. `part` chooses the side of a built-in corpus (and `sample` the documents and
    characters of a source-code corpus's sample, see `builtin_texts`); other sources are read whole."""
    if source.kind == "builtin":
        texts = builtin_texts(source.name, part, sample)
    elif source.kind == "file":
        path = Path(source.name)
        if not path.is_file():
            raise TextSourceError(f"{path}: no such file")
        if path.suffix in DATASET_SUFFIXES:
            texts = _dataset_texts(
                DATASET_SUFFIXES[path.suffix], None, "train", source.text_column, data_files=str(path)
            )
        else:
            try:
                texts = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as err:
                raise TextSourceError(f"{path}: not UTF-8 text") from err
    else:
        name, config, split = (source.name.split(":") + [None, None])[:3]
        texts = _dataset_texts(name, config or None, split or "train", source.text_column)
    if not any(t.strip() for t in texts):
        raise TextSourceError(f"{source}: the text is empty")
    return texts


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long token stream: documents joined by a blank line, tokenised once, without special tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def spread_windows(stream: torch.Tensor, seq_len: int, n_windows: int) -> torch.Tensor:
    """n_windows windows of seq_len tokens spread evenly over the stream (as many as fit without overlap when
    the stream is short), shape (n, seq_len)."""
    available = stream.numel() // seq_len
    if available == 0:
        raise TextSourceError(f"the text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    n = min(n_windows, available)
    starts = torch.linspace(0, stream.numel() - seq_len, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def mixed_windows(
    tokenizer, sources: list[TextSource], n_windows: int, seq_len: int, part: str = "calibration"
) -> tuple[torch.Tensor, str]:
    """About n_windows windows of seq_len tokens, (n, seq_len), from the sources (a built-in corpus: its `part`) in
    equal shares (the first ones take the remainder), each share spread evenly over its text (all of a shorter text's
    windows; a large built-in corpus: one document's head per window); and a description of the texts with their
    checksums."""
    windows, described = [], []
    head = CHARS_PER_WINDOW_SAMPLED * seq_len
    for k, source in enumerate(sources):
        share = n_windows // len(sources) + (k < n_windows % len(sources))
        texts = load_texts(source, part=part, sample=(head, share * head))
        if share:
            windows.append(spread_windows(tokenize(tokenizer, texts), seq_len, share))
        described.append(f"{source} [{fingerprint(texts)}]")
    return torch.cat(windows), " + ".join(described)


def fingerprint(texts: list[str]) -> str:
    """A short checksum of a text collection, recorded in converted checkpoints and logs."""
    crc = 0
    for t in texts:
        crc = zlib.crc32(t.encode("utf-8"), crc)
    return f"{crc:08x}"


def train_bpe_tokenizer(vocab: int):
    """A byte-level BPE tokenizer of `vocab` tokens trained on the documentation topics outside their evaluation part
    (<unk> = 0, <eos> = 1), for synthetic and test checkpoints that have no tokenizer of their own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(builtin_texts("pydoc", ("calibration", "training")), trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
