"""Checkpoint I/O: lazy tensor reading from (sharded) safetensors, sharded writing, and atomic output folders."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# A fine-tuning log belongs to the run that wrote it, not to checkpoints made from its output.
NOT_COPIED = {"config.json", WEIGHT_INDEX, "pytorch_model.bin.index.json", "finetune-log.jsonl"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read or written as asked."""


def looks_local(source: str | os.PathLike) -> bool:
    """A path rather than a hub name: it exists, or it is written as a path."""
    return Path(source).exists() or str(source).startswith((".", "/", "~"))


def check_checkpoint_folder(source: str | os.PathLike) -> None:
    """One-line errors for local paths that are not checkpoint folders (hub names pass through)."""
    path = Path(source)
    if not path.exists() and looks_local(source):
        raise CheckpointError(f"{source}: no such folder")
    if path.exists() and not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(f"{source}: not a checkpoint folder (no config.json)")


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local folder, or anything `from_pretrained` resolves (a hub name), downloaded without its optional extras."""
    check_checkpoint_folder(source)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        )
    except Exception as err:  # the hub client raises many types; the user needs the one line
        raise CheckpointError(
            f"{source}: not a local folder, and the hub did not provide it ({type(err).__name__})"
        ) from err


class LazyCheckpoint:
    """Tensor names of a (sharded) safetensors checkpoint, read one tensor at a time on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / WEIGHT_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / shard for name, shard in weight_map.items()}
        elif (self.folder / WEIGHT_FILE).exists():
            with safe_open(self.folder / WEIGHT_FILE, framework="pt") as f:
                self.files = {name: self.folder / WEIGHT_FILE for name in f.keys()}
        else:
            raise CheckpointError(
                f"{self.folder}: no {WEIGHT_FILE} or {WEIGHT_INDEX} (only safetensors checkpoints are read)"
            )
        self.stored: dict[str, str] = {}
        missing = {str(p) for p in self.files.values() if not p.exists()}
        if missing:
            raise CheckpointError(f"{self.folder}: the index names missing shard(s) {sorted(missing)}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))

    def add_base_prefix(self, prefix: str, outside: tuple[str, ...]) -> None:
        """Name the tensors `prefix.name` when none is (checkpoints saved from the base model, such as the hub's
        GPT-2 (`h.0...`) and OPT (`decoder.layers...`), whose causal LMs keep the base model under `prefix`);
        names under `outside` (the causal LM's own modules, such as `lm_head.`) keep theirs."""
        if not prefix or any(n.startswith(f"{prefix}.") for n in self.files):
            return
        renamed = {n: n if n.startswith(outside) else f"{prefix}.{n}" for n in self.files}
        self.stored = {new: old for old, new in renamed.items()}
        self.files = {renamed[n]: f for n, f in self.files.items()}

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))


class ShardedWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes as they come, then the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Name the shards model-XXXXX-of-YYYYY.safetensors (or model.safetensors) and write the index."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / WEIGHT_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer files, generation config, chat template and the like (everything but weights and config)."""
    copied = []
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name not in NOT_COPIED and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dest / item.name)
            copied.append(item.name)
    return copied


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the block finishes; removed if it fails, so an
    interrupted run never leaves a folder that looks like a checkpoint."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
