"""Checkpoint folders: lazy tensor reading from (sharded) safetensors, streamed sharded writing, output folders that
appear only when finished, write-then-rename files, and the files that make a folder an MFA checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mfakit.errors import MfakitError, first_line
from mfakit.model import modeling_mfa
from mfakit.model.modeling_mfa import MFAConfig

WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
FINETUNE_LOG = "finetune-log.jsonl"
TRAINER_DIR = "trainer"
NOT_COPIED = {"config.json", WEIGHT_INDEX, "pytorch_model.bin.index.json", FINETUNE_LOG}
# Code is never copied into an output (a converted checkpoint runs only mfakit's own modeling file), and the
# auto_map entries that would point at it are dropped from copied configs.
NOT_COPIED_SUFFIXES = (*WEIGHT_SUFFIXES, ".py", ".pyc")


class CheckpointError(MfakitError):
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
    """Tensor names and shapes of a (sharded) safetensors checkpoint, read one tensor at a time on demand. Every
    shard's header is read (and so checked) when the checkpoint is opened."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / WEIGHT_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: self.folder / shard for name, shard in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({first_line(err)})") from err
        elif (self.folder / WEIGHT_FILE).exists():
            files = None
        else:
            raise CheckpointError(
                f"{self.folder}: no {WEIGHT_FILE} or {WEIGHT_INDEX} (only safetensors checkpoints are read)"
            )
        shards = sorted(set(files.values())) if files is not None else [self.folder / WEIGHT_FILE]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{self.folder}: the index names missing shard(s) {missing}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        stored: dict[str, Path] = {}
        for shard in shards:
            for name, shape in read_header(shard).items():
                self.shapes[name] = shape
                stored[name] = shard
        if files is not None and (absent := [n for n, f in files.items() if stored.get(n) != f]):
            raise CheckpointError(f"{index}: tensor {absent[0]} is not in the shard the index names")
        self.files = stored if files is None else files
        self.stored: dict[str, str] = {}

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

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.stored.get(name, name)]

    def num_params(self) -> int:
        """Elements of every stored tensor, from the shard headers (no tensor is read)."""
        return sum(math.prod(shape) for shape in self.shapes.values())


def read_header(shard: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file holds, read from its header; a one-line error naming the file when it
    is not a complete safetensors file (truncated, corrupt header, data not covering the file)."""
    try:
        with safe_open(shard, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{shard}: not a complete safetensors file ({first_line(err)})") from err


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
COPY_CHUNK = 64 * 1024**2


def _row_blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensor as consecutive blocks of rows of at most about COPY_CHUNK bytes each, in storage order once each
    is made contiguous: a large view (a slice of the converter's per-head tensors) is checked and written through
    one block-sized copy at a time, never a copy of the whole."""
    if tensor.dim() == 0 or tensor.numel() * tensor.element_size() <= COPY_CHUNK:
        yield tensor
        return
    rows = max(1, COPY_CHUNK // max(1, tensor[0].numel() * tensor.element_size()))
    yield from tensor.split(rows)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN and no infinity, from its least and greatest values block by
    block (both are NaN where any value is): an elementwise isfinite over 134M bf16 values takes 0.35 s on 2 cores,
    this 0.01 s, and at 7B sizes every layer is checked when read and when written. float8, which aminmax does not
    take, is checked in float32."""
    for block in _row_blocks(tensor):
        if block.numel() == 0:
            continue
        lo, hi = torch.aminmax(block.float() if block.element_size() == 1 else block)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return False
    return True


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's memory as bytes: a view of it, without a copy, for a contiguous CPU tensor (which may then be read
    into through it); else of a contiguous CPU copy."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


class ShardedWriter:
    """Streams tensors into safetensors shards of at most max_shard_bytes.

    Each tensor's bytes are appended to the open shard's data file as it comes (memory: one tensor, whatever the
    shard size); a full shard gets its header and becomes `shard-XXXXX.tmp`; `finish` names the shards and writes
    the index. `state()` after any `add` describes everything written so far, and a writer built with that state
    continues exactly there (bytes appended after it are cut off), which is what a resumed conversion needs.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, state: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        state = state or {"shards": [], "entries": [], "data_bytes": 0, "total_bytes": 0, "elements": 0}
        self.shards: list[list[str]] = [list(s) for s in state["shards"]]
        self.entries: list[list] = [list(e) for e in state["entries"]]
        self.data_bytes: int = state["data_bytes"]
        self.total_bytes: int = state["total_bytes"]
        self.elements: int = state["elements"]
        self.names = {n for s in self.shards for n in s} | {e[0] for e in self.entries}
        data = self._data_path()
        if self.data_bytes and not data.exists():
            self._recover_data(data)
        if data.exists():
            with open(data, "r+b") as f:
                f.truncate(self.data_bytes)
        self._drop_later_files()

    def _drop_later_files(self) -> None:
        """Remove what a run killed after this state wrote beyond it: closed shards from the open one on, and the
        data files of later shards (they would be appended to otherwise)."""
        for path in self.folder.glob("shard-*.*"):
            index, suffix = int(path.stem.removeprefix("shard-")), path.suffix
            if index > len(self.shards) or (index == len(self.shards) and suffix == ".tmp"):
                path.unlink()
            elif index < len(self.shards) and suffix == ".data":
                path.unlink()

    def _recover_data(self, data: Path) -> None:
        """A run killed after closing the open shard (a later state than the one resumed) removed its data file;
        the closed shard's data section starts with the same bytes."""
        shard = self._tmp_path(len(self.shards))
        if not shard.exists():
            raise CheckpointError(f"{data} is missing: the partial conversion cannot be resumed")
        with open(shard, "rb") as src, open(data, "wb") as out:
            (header_len,) = struct.unpack("<Q", src.read(8))
            src.seek(8 + header_len)
            left = self.data_bytes
            while left:
                chunk = src.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{shard} is shorter than its recorded data: cannot resume")
                out.write(chunk)
                left -= len(chunk)

    def _data_path(self) -> Path:
        return self.folder / f"shard-{len(self.shards):05d}.data"

    def _tmp_path(self, i: int) -> Path:
        """Closed shard i before `finish` names it."""
        return self.folder / f"shard-{i:05d}.tmp"

    def state(self) -> dict:
        """Everything written so far, as plain values (what a resumed writer starts from)."""
        return {
            "shards": self.shards,
            "entries": self.entries,
            "data_bytes": self.data_bytes,
            "total_bytes": self.total_bytes,
            "elements": self.elements,
        }

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise CheckpointError(f"tensor {name!r} written twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        tensor = tensor.detach()
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"tensor {name} would be written with NaN or infinite values")
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.data_bytes + size > self.max_shard_bytes:
            self.flush()
        with open(self._data_path(), "ab") as f:
            for block in _row_blocks(tensor):
                f.write(tensor_bytes(block))
        dtype = SAFETENSORS_DTYPES[tensor.dtype]
        self.entries.append([name, dtype, list(tensor.shape), [self.data_bytes, self.data_bytes + size]])
        self.names.add(name)
        self.data_bytes += size
        self.total_bytes += size
        self.elements += tensor.numel()

    def flush(self) -> None:
        """Close the open shard: header (8-byte length, JSON padded to 8 bytes), then the data, streamed."""
        if not self.entries:
            return
        header = {"__metadata__": {"format": "pt"}}
        header.update({n: {"dtype": d, "shape": s, "data_offsets": o} for n, d, s, o in self.entries})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        data = self._data_path()
        with open(self._tmp_path(len(self.shards)), "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(src, out, COPY_CHUNK)
        data.unlink()
        self.shards.append([e[0] for e in self.entries])
        self.entries, self.data_bytes = [], 0

    def final_name(self, i: int) -> str:
        """Shard i's name in the finished checkpoint (the total number of shards is known once all are closed)."""
        n = len(self.shards)
        return WEIGHT_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def _closed_shard(self, i: int) -> Path:
        """Where closed shard i is: under its temporary name, or already under its final one (a resumed finish)."""
        tmp = self._tmp_path(i)
        return tmp if tmp.exists() else self.folder / self.final_name(i)

    def close(self) -> None:
        """Close the last shard and check every shard: its header parses, its data covers the file exactly, and it
        holds exactly the tensors recorded for it. After this the writer's state names complete shards only."""
        self.flush()
        for i, names in enumerate(self.shards):
            shard = self._closed_shard(i)
            if not shard.is_file() or sorted(read_header(shard)) != sorted(names):
                raise CheckpointError(f"{shard} does not hold the tensors recorded for it: the output is not finished")

    def finish(self) -> None:
        """Give the closed shards their final names, model-XXXXX-of-YYYYY.safetensors (or model.safetensors), and
        write the index. Repeating it after a kill part-way through finishes the same files."""
        weight_map = {}
        for i, names in enumerate(self.shards):
            if self._tmp_path(i).exists():
                os.replace(self._tmp_path(i), self.folder / self.final_name(i))
            weight_map.update({name: self.final_name(i) for name in names})
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer files, generation config, chat template and the like: everything but weights, configs, code
    and a fine-tuning log (it belongs to the run that wrote it); JSON files lose their `auto_map` entries."""
    copied = []
    for item in sorted(source.iterdir()):
        if not item.is_file() or item.name in NOT_COPIED or item.name.endswith(NOT_COPIED_SUFFIXES):
            continue
        data = _json_without_auto_map(item) if item.suffix == ".json" else None
        if data is None:
            shutil.copy2(item, dest / item.name)
        else:
            (dest / item.name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        copied.append(item.name)
    return copied


def _json_without_auto_map(path: Path) -> dict | None:
    """The JSON object in `path` less its `auto_map` (pointers to code in the folder), or None when it has none."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "auto_map" not in data:
        return None
    return {k: v for k, v in data.items() if k != "auto_map"}


def write_mfa_files(folder: Path, source: Path, config: MFAConfig, tokenizer_class: str | None = None) -> None:
    """What makes `folder` an MFA checkpoint beside its weights: config.json pointing the Auto classes at the
    modeling file, mfakit's own modeling_mfa.py, and the source folder's tokenizer and generation files. The
    tokenizer config names the class the source's tokenizer resolves to, since transformers picks some families'
    tokenizer classes from their model type, which the converted config no longer has."""
    config.auto_map = {
        "AutoConfig": "modeling_mfa.MFAConfig",
        "AutoModelForCausalLM": "modeling_mfa.MFAForCausalLM",
    }
    config.save_pretrained(folder)
    shutil.copy2(modeling_mfa.__file__, Path(folder) / "modeling_mfa.py")
    copy_side_files(source, folder)
    tokenizer_config = Path(folder) / "tokenizer_config.json"
    if tokenizer_class is not None and tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text())
        data["tokenizer_class"] = tokenizer_class
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
