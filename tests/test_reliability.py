"""Careless or hostile input through the command line: every case ends in exactly one `mfakit: error: ...` line
and exit 2 (Ctrl-C: 130), before any expensive work where it can be known then; no input file changes (sha256 of
every file before and after); nothing runs code from a checkpoint or a state file; no output folder looks finished
unless it is; and no hidden partial folder outlives a run that cannot be resumed."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mfakit import checkpoint
from mfakit.cli import main
from mfakit.outputs import locked, partial_folder
from tests.conftest import build_tiny, one_error_line

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "128", "--quiet"]
CONVERT = ["--variant", "mfa-kr", "--kv-ratio", "0.5", *CALIB]


def manifest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (hidden ones included), and every path's existence."""
    out = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]) if root.is_dir() else [root]:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer) -> Path:
    return build_tiny("llama-gqa", tmp_path_factory.mktemp("pristine") / "src", tokenizer, seed=7)


@pytest.fixture
def src(pristine, tmp_path) -> Path:
    """A fresh copy of the tiny source for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def refused(capsys, argv: list[str], *inputs: Path, message: str) -> str:
    """The command fails with one error line containing `message`, and no input changes."""
    before = manifest(*inputs)
    line = one_error_line(capsys, argv)
    assert message in line, line
    assert manifest(*inputs) == before
    return line


def no_partial_left(out: Path) -> None:
    assert not out.exists() and not partial_folder(out).exists()


# 1. No data loss with --overwrite.


def test_overwrite_never_deletes_the_input_or_foreign_files(capsys, src, tmp_path):
    parent = src.parent
    (parent / "notes.txt").write_text("precious")
    refused(capsys, ["convert", str(src), str(parent), *CONVERT, "--overwrite"], parent, message="holds the source")
    refused(capsys, ["convert", str(src), str(src / "out"), *CONVERT], parent, message="lies inside the source")
    downloads = tmp_path / "dl"
    downloads.mkdir()
    (downloads / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    (downloads / "other.iso").write_bytes(b"keep")
    refused(
        capsys,
        ["import-gguf", str(downloads / "model.gguf"), str(downloads), "--overwrite"],
        downloads,
        message="holds the GGUF",
    )
    cwd = os.getcwd()
    os.chdir(src)
    try:
        refused(capsys, ["convert", str(src), ".", *CONVERT, "--overwrite"], parent, message="is the source")
    finally:
        os.chdir(cwd)


def test_finetune_output_follows_the_same_rules(capsys, src, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    argv = ["finetune", str(src), "--trainable", "all", "--loss", "lm", "--steps", "1", "--seq-len", "32", "--quiet"]
    refused(
        capsys, [*argv[:2], str(foreign), *argv[2:], "--overwrite"], foreign, src, message="did not write (thesis.tex)"
    )
    refused(capsys, [*argv[:2], str(src / "tuned"), *argv[2:]], src, message="lies inside the model being trained")


# 2. Resumption: tests/test_resume.py kills at every write boundary. 3. One run per output.


def test_a_second_run_into_the_same_output_is_refused(capsys, src, tmp_path):
    out = tmp_path / "out"
    with locked(partial_folder(out)):
        refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="another mfakit run is writing")
    no_partial_left(out)


# 4. No code execution.


class Marker:
    """Unpickling this writes a marker file: code from a state file ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_crafted_trainer_state_is_not_executed(capsys, src, tmp_path):
    out = tmp_path / "tuned"
    (out / "trainer").mkdir(parents=True)
    marker = tmp_path / "marker"
    (out / "trainer" / "state.pt").write_bytes(pickle.dumps({"step": Marker(str(marker))}))
    argv = ["finetune", str(src), str(out), "--trainable", "all", "--loss", "lm", "--steps", "2", "--seq-len", "32"]
    refused(capsys, [*argv, "--eval-text", "none", "--quiet", "--resume"], src, message="state")
    assert not marker.exists()


def test_code_in_a_source_folder_never_runs_and_is_never_copied(capsys, src, tmp_path):
    marker = tmp_path / "marker"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (src / "modeling_x.py").write_text(code)
    (src / "tokenization_x.py").write_text(code)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.Evil"}
    (src / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_x.Evil", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), *CONVERT]) == 0
    assert not marker.exists()
    assert sorted(p.name for p in out.glob("*.py")) == ["modeling_mfa.py"]
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in json.loads((out / "config.json").read_text())["text_config"]
    config["model_type"] = "evilnet"
    (src / "config.json").write_text(json.dumps(config))
    refused(capsys, ["convert", str(src), str(tmp_path / "out2"), *CONVERT], src, message="config.json")
    refused(capsys, ["eval", "ppl", str(src), "--seq-len", "32", "--max-tokens", "64"], src, message="cannot load")
    assert not marker.exists()


# 5. Non-finite values never pass silently.


@pytest.mark.parametrize("method", [[], ["--plain"], ["--kv-ratio", "1.0"]])
def test_non_finite_weights_are_named(capsys, src, tmp_path, method):
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    line = refused(
        capsys, ["convert", str(src), str(out), *CONVERT, *method], src, message="layers.1.self_attn.k_proj.weight"
    )
    assert "NaN" in line
    assert "--resume" in line and "MB" in line  # layer 0 is finished: the partial folder says so, with its size
    assert partial_folder(out).exists() and not out.exists()


def test_diverging_fine_tune_stops_and_writes_no_checkpoint(capsys, src, tmp_path):
    out = tmp_path / "tuned"
    argv = ["finetune", str(src), str(out), "--trainable", "all", "--loss", "lm", "--steps", "4", "--seq-len", "32"]
    refused(capsys, [*argv, "--lr", "1e30", "--eval-text", "none", "--quiet"], src, message="training diverged")
    assert not (out / "config.json").exists()


# 6. User mistakes are one line, early.


def test_damaged_checkpoints_are_one_line(capsys, src, tmp_path):
    out = tmp_path / "out"
    weights = src / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="not a complete safetensors file")
    weights.write_bytes(struct.pack("<Q", 1 << 62) + original[8:])
    refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="not a complete safetensors file")
    weights.write_bytes(original)
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="not a safetensors index")
    (src / "model.safetensors.index.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).rename(tmp_path / name)
    refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="no tokenizer files")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).rename(src / name)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text("{not json")
    refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="config.json")
    for field, value in (("num_key_value_heads", 0), ("num_hidden_layers", 0), ("hidden_size", 65)):
        (src / "config.json").write_text(json.dumps({**config, field: value}))
        refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="config")
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_key_value_heads"}))
    refused(
        capsys,
        ["convert", str(src), str(out), *CONVERT],
        src,
        message="has shape [32, 64], but the config implies [64, 64]",
    )
    no_partial_left(out)


def test_a_truncated_gguf_is_one_line(capsys, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3))
    refused(capsys, ["import-gguf", str(gguf), str(tmp_path / "out")], gguf, message="not a complete GGUF file")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-ratio", "1e-6"], "below one RoPE channel pair"),
        (["--kv-ratio", "0.5", "--share-q-dim", "100000"], "above the query's rank"),
        (["--kv-ratio", "0.5", "--nope-context", "-5"], "nope_context must be a positive"),
        (["--kv-ratio", "0.5", "--calib-seq-len", "0"], "calibration_seq_len"),
        (["--kv-ratio", "0.5", "--calib-seq-len", "-10"], "calibration_seq_len"),
        (["--kv-ratio", "0.5", "--device", "banana"], "--device banana"),
        (["--kv-ratio", "0.5", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_options_are_refused_before_any_work(capsys, src, tmp_path, args, message):
    argv = ["convert", str(src), str(tmp_path / "out"), "--variant", "mfa-kr", *args, "--quiet"]
    refused(capsys, argv, src, message=message)
    no_partial_left(tmp_path / "out")


def test_bad_evaluation_and_teacher_are_one_line(capsys, src, tmp_path, tokenizer):
    refused(capsys, ["eval", "ppl", str(src), "--max-tokens", "-1"], src, message="max_tokens")
    refused(capsys, ["eval", "ppl", str(src), "--seq-len", "1024"], src, message="above the model's context of 256")
    teacher = build_tiny("llama-gqa", tmp_path / "teacher", tokenizer, vocab_size=500)
    out = tmp_path / "tuned"
    argv = ["finetune", str(src), str(out), "--teacher", str(teacher), "--steps", "1", "--trainable", "all", "--quiet"]
    refused(capsys, argv, src, teacher, message="predicts 500 tokens, the model 384")
    assert not out.exists()


def test_a_full_disk_is_one_line_and_resumable(tmp_path, pristine):
    """A file-size limit stands in for a full disk (both refuse the write with an OSError): one line, exit 2."""
    out = tmp_path / "out"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\n"
        "from mfakit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", script, "convert", str(pristine), str(out), *CONVERT, "--max-shard-mb", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("mfakit: error: ") and "File too large" in lines[-1]
    assert not [line for line in lines if line.startswith("Traceback")]
    assert not out.exists()


def test_interrupt_is_exit_130_and_resumable(capsys, src, tmp_path, monkeypatch):
    from mfakit.convert import recipe

    real = recipe.convert_layer

    def interrupt_second_layer(*args, **kwargs):
        if recipe.convert_layer.calls == 1:
            raise KeyboardInterrupt
        recipe.convert_layer.calls += 1
        return real(*args, **kwargs)

    interrupt_second_layer.calls = 0
    monkeypatch.setattr(recipe, "convert_layer", interrupt_second_layer)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(src), str(out), *CONVERT]) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(recipe, "convert_layer", real)
    assert main(["convert", str(src), str(out), *CONVERT, "--resume"]) == 0


# 7. No hidden leftovers; 8. no fine-tune dead end.


def test_an_unresumable_failure_leaves_nothing(capsys, src, tmp_path):
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    line = refused(capsys, ["convert", str(src), str(out), *CONVERT], src, message="layers.0.mlp.up_proj.weight")
    assert "--resume" not in line
    no_partial_left(out)


def test_a_fine_tune_killed_before_its_first_save_starts_over(src, tmp_path):
    out = tmp_path / "tuned"
    (out / "trainer").mkdir(parents=True)
    (out / "finetune-log.jsonl").write_text('{"step": 0, "eval_ppl": 1.0}\n')
    argv = ["finetune", str(src), str(out), "--trainable", "all", "--loss", "lm", "--steps", "1", "--seq-len", "32"]
    assert main([*argv, "--eval-text", "none", "--quiet"]) == 0
    assert (out / "config.json").exists()
    log = [json.loads(line) for line in (out / "finetune-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2],
)
def test_the_finiteness_check_finds_every_nan_and_infinity(dtype, monkeypatch):
    """`all_finite`, which every tensor read or written passes, finds a NaN or an infinity wherever it is: the
    first, a middle and the last value, across blocks; finite and empty tensors pass."""
    monkeypatch.setattr(checkpoint, "COPY_CHUNK", 64)  # several blocks of rows
    clean = torch.randn(40, 10, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert checkpoint.all_finite(clean) and checkpoint.all_finite(clean[:0])
    has_infinity = dtype != torch.float8_e4m3fn  # "fn": finite, an infinity saturates to 448 there
    for bad in (float("nan"), float("inf"), float("-inf"))[: 3 if has_infinity else 1]:
        for where in ((0, 0), (17, 3), (39, 9)):
            dirty = clean.clone()
            dirty[where] = bad
            assert not checkpoint.all_finite(dirty), (bad, where)
