"""The resume state of a conversion: after every finished layer, what the next layer needs (the output writer's
position, the converted layers' config entries, the calibration hidden states of both streams), saved in the
partial output folder so that a killed run continues to the same bytes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mfakit.checkpoint import tensor_bytes
from mfakit.convert.calibration import Streams
from mfakit.errors import MfakitError
from mfakit.loading import DTYPES
from mfakit.outputs import replace_file

RESUME_DIR = "resume"
STATE_FILE = "state.json"


class ResumeError(MfakitError):
    """A partial conversion that cannot be continued as asked."""


@dataclass
class ResumeState:
    """settings: what must not change between a run and its resumption. next_layer: the first layer not written.
    layers: the converted layers' `mfa_layers` entries so far. out_dtype: the dtype of the converted tensors.
    writer: the shard writer's state. streams: the file holding the calibration hidden states."""

    settings: dict
    next_layer: int = 0
    layers: list[dict] | None = None
    out_dtype: str | None = None
    writer: dict | None = None
    streams: str | None = None


def has_resume_state(partial: Path) -> bool:
    return (partial / RESUME_DIR / STATE_FILE).is_file()


def read_resume_state(partial: Path, settings: dict) -> ResumeState | None:
    """The state a killed conversion left in `partial`, or None when there is none; refuses changed settings."""
    if not has_resume_state(partial):
        return None
    state = ResumeState(**json.loads((partial / RESUME_DIR / STATE_FILE).read_text()))
    changed = sorted(k for k in settings.keys() | state.settings.keys() if settings.get(k) != state.settings.get(k))
    if changed:
        raise ResumeError(
            f"{partial} holds a conversion with other settings ({', '.join(changed)}); run without --resume to start over"
        )
    return state


def write_state(partial: Path, state: ResumeState) -> None:
    """Replace the state file (write, then rename: a kill leaves the previous complete state)."""
    replace_file(partial / RESUME_DIR / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(state))))


def save_resume_state(partial: Path, state: ResumeState, streams: Streams) -> None:
    """Save the streams under a new name, then replace the state file that names them (a kill at any point leaves
    the previous complete state), then remove older streams."""
    folder = partial / RESUME_DIR
    folder.mkdir(exist_ok=True)
    state.streams = f"streams-{state.next_layer:05d}.bin"
    write_streams(folder / state.streams, streams)
    write_state(partial, state)
    for old in folder.glob("streams-*"):
        if old.name != state.streams:
            old.unlink()


def write_streams(path: Path, streams: Streams) -> None:
    """The streams' tensors as raw bytes, tensor by tensor, behind a header: its length (8 bytes, little-endian)
    and JSON naming each tensor's stream, shape and dtype. Plain file writes of the tensors' own memory: no
    serialised copy of the hidden states (300 MB a layer for SmolLM2, 2 GB at 70B) is made first, and a full disk
    fails the write with ENOSPC's OSError."""
    tensors = [("source", t) for t in streams.source] + [("converted", t) for t in streams.converted or []]
    header = {
        "converted": streams.converted is not None,
        "tensors": [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in tensors],
    }
    encoded = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, t in tensors:
            f.write(tensor_bytes(t))


def load_streams(partial: Path, state: ResumeState, device: str) -> Streams:
    """The streams `write_streams` saved, on `device`; a short or malformed file is refused."""
    path = partial / RESUME_DIR / state.streams
    loaded: dict[str, list[torch.Tensor]] = {"source": [], "converted": []}
    with path.open("rb") as f:
        try:
            size = path.stat().st_size
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                raise ValueError("its header ends early")
            header = json.loads(f.read(length))
            specs = [(name, shape, _stream_dtype(dtype)) for name, shape, dtype in header["tensors"]]
            # Sized against the file before anything is allocated: a damaged header must not ask for memory.
            if 8 + length + sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs) != size:
                raise ValueError("its size does not match its header")
            for name, shape, dtype in specs:
                t = torch.empty(shape, dtype=dtype)
                if f.readinto(tensor_bytes(t)) != t.numel() * t.element_size():
                    raise ValueError("it ends early")
                loaded[name].append(t.to(device))
            converted = loaded["converted"] if header["converted"] else None
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            raise ResumeError(
                f"{path} is not a complete resume state ({err}); run without --resume to start over"
            ) from err
    return Streams(source=loaded["source"], converted=converted)


def _stream_dtype(name: str) -> torch.dtype:
    """The dtype a streams header names: one of the conversion's (`DTYPES`, the map the streams were made with)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return DTYPES[name]
