"""Bounded memory and resumption on multi-shard synthetic checkpoints (scripts/synthetic_checkpoint.py): the peak
resident memory of `mfakit convert` stays well below the checkpoint's size and does not grow with the number of
layers, and a conversion killed mid-way resumes with `--resume` to the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the benchmarks' own plumbing, as the scripts import it
from benchlib import run_measured  # noqa: E402

SHAPE = ["--hidden", "1024", "--heads", "8", "--kv-heads", "2", "--vocab", "1024", "--dtype", "float32"]
# Two calibration sequences: fewer tokens than readout features, so the refit still validates its ridge (over two
# folds, half the solves of four, which were most of this module's time).
CONVERT = ["--variant", "mfa", "--kv-ratio", "0.5", "--calib-tokens", "512", "--calib-seq-len", "256"]
CONVERT += ["--max-shard-mb", "64", "--quiet"]
# glibc's heap by default serves the converter's few-megabyte temporaries and, as its layout fragments over the
# layers, lets each layer's peak drift up by 0-130 MB at random (per-layer peaks 650-780 MB over 16 layers, and
# 663-783 MB between three runs of the same 3 layers). Every allocation from 1 MiB up mapped on its own keeps the
# peak at what the converter holds (619-622 MB for every layer of every run), so that depth shows and noise does not.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def synthetic(folder: Path, layers: int) -> Path:
    script = ROOT / "scripts" / "synthetic_checkpoint.py"
    command = [sys.executable, str(script), str(folder), "--layers", str(layers), "--shards", "8", *SHAPE]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return folder


def peak_bytes(*argv: str) -> int:
    """Peak resident memory of a fresh process running `mfakit ARGV` (nothing: just the imports)."""
    run = run_measured(list(argv), timeout=900, env=ALLOCATOR)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.peak_rss_bytes


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {"small": synthetic(root / "small", 3), "large": synthetic(root / "large", 10)}


@pytest.fixture(scope="module")
def measured(checkpoints, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("converted")
    return {
        "imports": peak_bytes(),
        "small": peak_bytes("convert", str(checkpoints["small"]), str(out / "small"), *CONVERT),
        "small_out": out / "small",
        "large": peak_bytes("convert", str(checkpoints["large"]), str(out / "large"), *CONVERT),
    }


def test_peak_memory_is_bounded_and_independent_of_depth(checkpoints, measured):
    """10 layers of 58 MB (0.62 GB in 8 shards): the conversion's memory beyond the imports is about a third of the
    checkpoint (measured 0.36-0.39x on 2 cores), where loading the model alone would take all of it; and 7 more
    layers than the small checkpoint cost almost nothing (measured: 0-4 MB of their 0.43 GB)."""
    size_large, size_small = weight_bytes(checkpoints["large"]), weight_bytes(checkpoints["small"])
    assert len(list(checkpoints["large"].glob("*.safetensors"))) == 8
    assert measured["large"] - measured["imports"] < 0.65 * size_large, measured
    assert measured["large"] - measured["small"] < 0.15 * (size_large - size_small), measured


def test_killed_conversion_resumes_to_the_same_bytes(checkpoints, measured, tmp_path):
    """SIGKILL after the first of three layers: no output folder, a hidden partial one without config.json;
    `--resume` continues from layer 1 and writes exactly the uninterrupted run's files."""
    out = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    command = [sys.executable, "-m", "mfakit.cli", "convert", str(checkpoints["small"]), str(out), *CONVERT]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = partial / "resume" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_layer"] >= 1:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and partial.is_dir() and not (partial / "config.json").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert not partial.exists()
    reference = measured["small_out"]
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert all((out / f).read_bytes() == (reference / f).read_bytes() for f in files)
