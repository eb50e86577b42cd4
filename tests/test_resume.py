"""A conversion killed at any write boundary resumes to the same bytes as an uninterrupted run.

Rather than one process per kill point, one conversion runs with every file-system write of the converter (tensor
appends, renames, removals, file writes, files opened for writing) preceded by a copy of the partial output folder:
each copy is exactly what SIGKILL at that point leaves on disk (every write goes through a closed file, so nothing
is left in user-space buffers). Each copy then becomes the partial folder of a `--resume` run, which must finish to
the reference bytes; tests/test_scale.py kills a real process once as well."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mfakit.checkpoint import ShardedWriter
from mfakit.convert import ConvertOptions, convert
from mfakit.convert.calibration import Streams
from mfakit.convert.resume import RESUME_DIR, ResumeError, ResumeState, load_streams, save_resume_state
from mfakit.outputs import partial_folder
from tests.conftest import build_tiny

OPTIONS = ConvertOptions(
    variant="mfa-kr",
    kv_ratio=0.5,
    calibration_tokens=256,
    calibration_seq_len=128,
    max_shard_mb=0.1,  # several output shards, and shard boundaries inside layers
    progress=False,
)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("llama-gqa", tmp_path_factory.mktemp("src") / "src", tokenizer, seed=5)


def snapshots_of_a_run(source: Path, out: Path, snapshots: Path, monkeypatch) -> list[Path]:
    """Run a conversion into `out`, copying its partial folder before every file-system write."""
    partial = partial_folder(out)
    taken: list[Path] = []

    def snapshot() -> None:
        if partial.is_dir():
            shutil.copytree(partial, snapshots / f"{len(taken):03d}", symlinks=True)
            taken.append(snapshots / f"{len(taken):03d}")

    def before(function):
        def wrapped(*args, **kwargs):
            snapshot()
            return function(*args, **kwargs)

        return wrapped

    def opened(function):
        def wrapped(path, mode="r", *args, **kwargs):
            if set(mode) & set("wax"):
                snapshot()
            return function(path, mode, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "replace", before(os.replace))
    monkeypatch.setattr(Path, "open", opened(Path.open))
    monkeypatch.setattr(shutil, "rmtree", before(shutil.rmtree))
    for name in ("unlink", "write_text", "write_bytes"):
        monkeypatch.setattr(Path, name, before(getattr(Path, name)))
    monkeypatch.setattr(ShardedWriter, "add", before(ShardedWriter.add))
    convert(source, out, OPTIONS)
    monkeypatch.undo()
    return taken


def test_killed_at_every_write_boundary_resumes_to_the_same_bytes(source, tmp_path, monkeypatch):
    reference = files(convert(source, tmp_path / "reference", OPTIONS) and tmp_path / "reference")
    assert sum(name.endswith(".safetensors") for name in reference) > 2
    taken = snapshots_of_a_run(source, tmp_path / "probe", tmp_path / "snapshots", monkeypatch)
    assert files(tmp_path / "probe") == reference
    assert len(taken) > 30, len(taken)
    out = tmp_path / "out"
    resumed_from_state = 0
    for snap in taken:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial_folder(out), ignore_errors=True)
        shutil.copytree(snap, partial_folder(out), symlinks=True)
        resumed_from_state += (snap / "resume" / "state.json").is_file()
        convert(source, out, replace(OPTIONS, resume=True))
        assert files(out) == reference, snap.name
        assert not partial_folder(out).exists()
    assert resumed_from_state > len(taken) // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("converted", [False, True])
def test_saved_streams_load_bit_identical(tmp_path, dtype, converted):
    """Both streams (the converted one absent until a layer changes it) come back with their shapes, dtype and
    bits; only the newest streams file is kept."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=generator).to(dtype), torch.randn(1, 5, 8, generator=generator).to(dtype)]
    streams = Streams(batches, [b * 3 for b in batches] if converted else None)
    state = ResumeState(settings={})
    for layer in (1, 2):
        state.next_layer = layer
        save_resume_state(tmp_path, state, streams)
    assert [p.name for p in (tmp_path / RESUME_DIR).glob("streams-*")] == [state.streams]
    loaded = load_streams(tmp_path, state, "cpu")
    pairs = list(zip(streams.source, loaded.source, strict=True))
    assert (loaded.converted is None) == (not converted)
    if converted:
        pairs += list(zip(streams.converted, loaded.converted, strict=True))
    for saved, read in pairs:
        assert read.dtype == dtype and torch.equal(read.view(torch.uint8), saved.view(torch.uint8))


@pytest.mark.parametrize("cut", [0, 5, 12, -1])
def test_damaged_streams_are_refused_and_left_as_they_are(tmp_path, cut):
    state = ResumeState(settings={}, next_layer=1)
    save_resume_state(tmp_path, state, Streams([torch.ones(2, 3, 4)]))
    path = tmp_path / RESUME_DIR / state.streams
    damaged = path.read_bytes()[:cut]
    path.write_bytes(damaged)
    with pytest.raises(ResumeError, match="not a complete resume state.*without --resume"):
        load_streams(tmp_path, state, "cpu")
    assert path.read_bytes() == damaged


def test_streams_header_without_its_fields_is_refused(tmp_path):
    state = ResumeState(settings={}, next_layer=1, streams="streams-00001.bin")
    header = b'{"tensors": []}'
    (tmp_path / RESUME_DIR).mkdir()
    (tmp_path / RESUME_DIR / state.streams).write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ResumeError, match="not a complete resume state.*'converted'"):
        load_streams(tmp_path, state, "cpu")


@pytest.mark.parametrize(
    ("tensors", "why"),
    [([["source", [2**31, 2**10], "float32"]], "size does not match"), ([["source", [1], "nn"]], "unknown dtype")],
)
def test_streams_header_is_checked_before_anything_is_allocated(tmp_path, monkeypatch, tensors, why):
    """A damaged header naming an 8 TiB tensor (or no dtype) is refused from the file's size before torch allocates
    anything: a resume must not exhaust memory on a corrupt file."""
    state = ResumeState(settings={}, next_layer=1, streams="streams-00001.bin")
    header = json.dumps({"converted": False, "tensors": tensors}).encode()
    (tmp_path / RESUME_DIR).mkdir()
    (tmp_path / RESUME_DIR / state.streams).write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    allocated = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a))
    with pytest.raises(ResumeError, match=f"not a complete resume state.*{why}"):
        load_streams(tmp_path, state, "cpu")
    assert allocated == []
