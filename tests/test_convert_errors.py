"""Bad input to `mfakit convert` ends in one clear line, exit code 2, and leaves nothing behind."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig

from mfakit.cli import main
from mfakit.convert import ConvertOptions
from tests.conftest import QUICK_CALIB as CALIB
from tests.conftest import one_error_line


def convert_error(capsys, src: Path, out: Path, *args: str) -> str:
    err = one_error_line(capsys, ["convert", str(src), str(out), *args, *CALIB])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


def save_random(config, folder: Path, tokenizer) -> Path:
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unsupported_family_names_the_supported(capsys, tmp_path, tokenizer):
    src = save_random(BloomConfig(vocab_size=384, hidden_size=32, n_layer=1, n_head=2), tmp_path / "bloom", tokenizer)
    err = convert_error(capsys, src, tmp_path / "out", "--variant", "mfa", "--kv-ratio", "0.5")
    assert "unsupported model type 'bloom'" in err and "gemma2, gemma3_text, glm4, glm4_moe, gpt2" in err


def test_alibi_falcon_is_refused(capsys, tmp_path, tokenizer):
    config = FalconConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True)
    src = save_random(config, tmp_path / "falcon", tokenizer)
    err = convert_error(capsys, src, tmp_path / "out", "--variant", "mfa", "--kv-ratio", "0.5")
    assert "ALiBi" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--variant", "mfa", "--kv-dim", "34"), "above the exact budget"),
        (("--variant", "mfa-kr", "--kv-dim", "66"), "above the exact budget"),
        (("--variant", "mfa", "--kv-dim", "1"), "even number >= 2"),
        (("--variant", "mfa", "--kv-dim", "7"), "even number >= 2"),
        (("--variant", "mfa", "--kv-ratio", "1.5"), "kv_ratio must be in (0, 1]"),
        (("--variant", "mfa-kr", "--kv-ratio", "0"), "kv_ratio must be in (0, 1]"),
        (("--variant", "mfa", "--kv-ratio", "0.5", "--share-q-dim", "0"), "share_q_dim must be positive"),
        (("--variant", "mfa", "--kv-ratio", "0.5", "--calib", "nosuchfile.txt"), "neither an existing file"),
    ],
)
def test_bad_budget_or_option(capsys, tmp_path, tiny, args, message):
    assert message in convert_error(capsys, tiny("llama-gqa"), tmp_path / "out", *args)


def test_missing_tensor_is_named(capsys, tmp_path, tiny):
    src = tmp_path / "src"
    shutil.copytree(tiny("llama-gqa"), src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = convert_error(capsys, src, tmp_path / "out", "--variant", "mfa", "--kv-ratio", "0.5")
    assert "model.layers.1.self_attn.k_proj.weight is missing" in err


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = convert_error(capsys, tmp_path / "empty", tmp_path / "out", "--variant", "mfa", "--kv-ratio", "0.5")
    assert "not a checkpoint folder (no config.json)" in err
    err = convert_error(capsys, tmp_path / "nope", tmp_path / "out", "--variant", "mfa", "--kv-ratio", "0.5")
    assert "no such folder" in err


def test_output_cannot_be_the_source(capsys, tiny):
    src = tiny("llama-gqa")
    err = one_error_line(
        capsys, ["convert", str(src), str(src), "--variant", "mfa", "--kv-ratio", "0.5", "--overwrite", *CALIB]
    )
    assert "is the source checkpoint" in err
    assert (src / "model.safetensors").exists()


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny):
    """An existing OUT needs --overwrite, and --overwrite replaces only what mfakit wrote: a folder of someone
    else's files is refused and kept (this test once expected it replaced; the reliability issue forbids that)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["convert", str(tiny("llama-gqa")), str(out), "--variant", "mfa", "--kv-ratio", "0.5", *CALIB]
    assert "exists (pass --overwrite" in one_error_line(capsys, argv)
    assert "did not write (keep.txt)" in one_error_line(capsys, [*argv, "--overwrite"])
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    converted = tmp_path / "converted"
    assert (
        main(["convert", str(tiny("llama-gqa")), str(converted), "--variant", "mfa", "--kv-ratio", "1.0", *CALIB]) == 0
    )
    before = (converted / "model.safetensors").read_bytes()
    assert (
        main(
            [
                "convert",
                str(tiny("llama-gqa")),
                str(converted),
                "--variant",
                "mfa",
                "--kv-ratio",
                "0.5",
                "--overwrite",
                *CALIB,
            ]
        )
        == 0
    )
    assert (converted / "config.json").exists() and (converted / "model.safetensors").read_bytes() != before


def test_interrupted_conversion_resumes_to_the_same_bytes(tmp_path, tiny, monkeypatch, capsys):
    """Interrupted during layer 1: no output folder, only the hidden partial one (no config.json). Resuming gives
    the files of an uninterrupted run byte for byte; other settings refuse to resume."""
    from mfakit.convert import convert
    from mfakit.convert import recipe as recipe_module
    from mfakit.outputs import partial_folder

    real = recipe_module.convert_layer
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    options = ConvertOptions(
        variant="mfa", kv_ratio=0.5, calibration_tokens=256, calibration_seq_len=128, progress=False
    )
    out, reference = tmp_path / "out", tmp_path / "reference"
    convert(tiny("llama-gqa"), reference, options)
    monkeypatch.setattr(recipe_module, "convert_layer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny("llama-gqa"), out, options)
    monkeypatch.setattr(recipe_module, "convert_layer", real)
    partial = partial_folder(out)
    assert not out.exists() and partial.is_dir() and not (partial / "config.json").exists()
    calib = ["--calib-tokens", "256", "--calib-seq-len", "128"]
    argv = ["convert", str(tiny("llama-gqa")), str(out), "--variant", "mfa", "--kv-ratio", "0.25", *calib, "--resume"]
    assert "other settings (kv_ratio)" in one_error_line(capsys, argv)
    convert(tiny("llama-gqa"), out, replace(options, resume=True))
    assert not partial.exists()
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert all((out / f).read_bytes() == (reference / f).read_bytes() for f in files)


def test_source_dtype_kept(tmp_path, tiny):
    from mfakit.convert import convert

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny("qwen2"), dtype=torch.bfloat16).save_pretrained(src)
    shutil.copy(tiny("qwen2") / "tokenizer.json", src)
    shutil.copy(tiny("qwen2") / "tokenizer_config.json", src)
    options = ConvertOptions(
        variant="mfa-kr", kv_ratio=0.5, calibration_tokens=256, calibration_seq_len=128, progress=False
    )
    convert(src, tmp_path / "out", options)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
