"""The resume state of a conversion: after every finished layer, what the next layer needs (the output writer's
position, the converted layers' config entries, the calibration hidden states of both streams), saved in the
partial output folder so that a killed run continues to the same bytes."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mfakit.convert.calibration import Streams
from mfakit.errors import MfakitError
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
    state.streams = f"streams-{state.next_layer:05d}.pt"
    # Serialised in memory first: a full disk then fails the plain file write with ENOSPC, not inside torch.save.
    buffer = io.BytesIO()
    torch.save({"source": streams.source, "converted": streams.converted}, buffer)
    (folder / state.streams).write_bytes(buffer.getbuffer())
    write_state(partial, state)
    for old in folder.glob("streams-*.pt"):
        if old.name != state.streams:
            old.unlink()


def load_streams(partial: Path, state: ResumeState, device: str) -> Streams:
    saved = torch.load(partial / RESUME_DIR / state.streams, map_location=device, weights_only=True)
    return Streams(source=saved["source"], converted=saved["converted"])
