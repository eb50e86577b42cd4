"""Conversion of tiny Llama-family checkpoints through the command line: exactness, generation, cache size,
compression error, pass-through, sharding, and the math kept on the calibration's device (CUDA where there is one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from mfakit.checkpoint import LazyCheckpoint
from mfakit.cli import main
from mfakit.convert import factorize as fz
from mfakit.convert import recipe as recipe_module
from mfakit.convert.plan import DEFAULT_CALIBRATION_TOKENS, calibration_token_count
from tests.conftest import CALIB, QUICK_CALIB, TINY, build_tiny, convert_cli, logits, sample_ids

KINDS = list(TINY)
VARIANTS = ["mfa", "mfa-kr"]


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """converted(kind, variant, *budget) -> path, converted once per module."""
    cache = {}

    def get(kind: str, variant: str, *budget: str) -> Path:
        key = (kind, variant, budget)
        if key not in cache:
            out = tmp_path_factory.mktemp("out") / f"{kind}-{variant}"
            cache[key] = convert_cli(tiny(kind), out, variant, *budget)
        return cache[key]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_is_exact(converted, tiny, tokenizer, kind, variant):
    ids = sample_ids(tokenizer, n=48)
    diff = (logits(converted(kind, variant, "--kv-ratio", "1.0"), ids) - logits(tiny(kind), ids)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_greedy_generation_matches(converted, tiny, tokenizer, kind, variant):
    ids = sample_ids(tokenizer, n=12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=1)
    source = AutoModelForCausalLM.from_pretrained(tiny(kind)).eval()
    model = AutoModelForCausalLM.from_pretrained(converted(kind, variant, "--kv-ratio", "1.0")).eval()
    assert torch.equal(model.generate(ids, **kwargs), source.generate(ids, **kwargs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_bytes_equal_formula(converted, tokenizer, variant):
    path = converted("llama-gqa", variant, "--kv-ratio", "0.5")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = sample_ids(tokenizer, n=20, batch=3)
    cache = model(ids, cache=DynamicCache(config=model.config), use_cache=True).cache
    for layer, spec in zip(cache.layers, model.config.mfa_layers, strict=True):
        numbers = spec["kv_dim"] if variant == "mfa-kr" else spec["kv_dim"] + spec["v_dim"]
        held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        assert held == 3 * 20 * numbers * 4
    # Source GQA: 2 heads x 16 x (key + value) = 64 numbers; half budget: 32.
    assert sum(s["kv_dim"] + (0 if variant == "mfa-kr" else s["v_dim"]) for s in model.config.mfa_layers) == 2 * 32


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_error_falls_as_budget_grows(converted, tiny, tokenizer, kind, variant):
    ids = sample_ids(tokenizer, n=64)
    ref = logits(tiny(kind), ids)
    errors = []
    for ratio in ["0.125", "0.25", "0.5", "0.75"]:
        out = logits(converted(kind, variant, "--kv-ratio", ratio), ids)
        errors.append((out - ref).pow(2).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] > 0


def test_non_attention_tensors_pass_through_bit_identical(converted, tiny):
    src = LazyCheckpoint(tiny("qwen2"))
    out = LazyCheckpoint(converted("qwen2", "mfa-kr", "--kv-ratio", "0.5"))
    passed = [n for n in src.names() if ".self_attn." not in n]
    assert passed and set(passed) <= set(out.names())
    for name in passed:
        a, b = src.get(name), out.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_sharded_input_and_config_record(tmp_path, tokenizer):
    src = build_tiny("llama-gqa", tmp_path / "src", tokenizer, seed=3, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    out = convert_cli(src, tmp_path / "out", "mfa-kr", "--kv-ratio", "1.0")
    ids = sample_ids(tokenizer, n=32)
    assert (logits(out, ids) - logits(src, ids)).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mfa" and config["variant"] == "mfa-kr"
    assert config["text_config"]["model_type"] == "llama"
    assert config["conversion"]["calibration_tokens"] == 2048
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mfa.MFAForCausalLM"
    for spec in config["mfa_layers"]:
        assert spec["kv_dim"] == 64 and len(spec["rope_freqs"]) == 32
        # 16 RoPE pairs (2 heads x 8 frequencies) keep their frequencies, the 16 value pairs are NoPE.
        assert sorted(spec["rope_freqs"])[:16] == [0.0] * 16
        assert sorted(set(spec["rope_freqs"]) - {0.0}) == sorted(set(config_rope(src)))
    for name in ("tokenizer.json", "tokenizer_config.json", "modeling_mfa.py", "generation_config.json"):
        assert (out / name).exists(), name


def config_rope(src: Path) -> list[float]:
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(AutoConfig.from_pretrained(src)).inv_freq.tolist()


def test_output_is_sharded_when_large(tiny, tmp_path):
    from mfakit.convert import ConvertOptions, convert

    out = tmp_path / "out"
    options = ConvertOptions(
        variant="mfa",
        kv_ratio=0.5,
        calibration_tokens=512,
        calibration_seq_len=128,
        max_shard_mb=200_000 / 1024**2,
        progress=False,
    )
    convert(tiny("llama-gqa"), out, options)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())


@pytest.mark.parametrize("variant", VARIANTS)
def test_shared_query_factorization(tiny, tokenizer, tmp_path, variant):
    src = tiny("llama-gqa")
    ids = sample_ids(tokenizer, n=48)
    ref = logits(src, ids)
    full = convert_cli(src, tmp_path / "full", variant, "--kv-ratio", "1.0", extra=("--share-q-dim", "65"))
    assert (logits(full, ids) - ref).abs().max().item() <= 1e-4
    errors = []
    for rank in ("8", "24", "48"):
        out = convert_cli(src, tmp_path / rank, variant, "--kv-ratio", "1.0", extra=("--share-q-dim", rank))
        errors.append((logits(out, ids) - ref).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] > 0
    names = LazyCheckpoint(tmp_path / "8").names()
    assert any(n.endswith("q_a_proj.weight") for n in names) and not any(n.endswith(".q_proj.weight") for n in names)


def test_loads_with_remote_code_alone(converted, tiny, tokenizer, tmp_path):
    """The checkpoint's own modeling file serves `trust_remote_code=True` in a process that never imports mfakit."""
    path = converted("mistral", "mfa-kr", "--kv-ratio", "0.5")
    ids = sample_ids(tokenizer, n=24)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["mfakit"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "remote.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    remote = torch.load(tmp_path / "remote.pt")
    assert torch.allclose(remote, logits(path, ids), atol=1e-5)


def test_console_script(tiny, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "mfakit.cli",
        "convert",
        str(tiny("llama-mha")),
        str(out),
        "--variant",
        "mfa",
        "--kv-dim",
        "32",
        *CALIB,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "KV cache per token: 1,024 -> 512 bytes" in result.stdout
    assert (out / "config.json").exists()


def test_calibration_texts_are_mixed_in_equal_shares(tiny, tokenizer, tmp_path):
    """Two calibration texts give half of the windows each (the second half comes from the second text), and the
    converted checkpoint records both with their checksums."""
    from mfakit.convert.calibration import calibration_batches

    code = tmp_path / "code.txt"
    code.write_text(Path(json.__file__).read_text() * 4)
    batches, described = calibration_batches(tokenizer, ("builtin:pydoc", f"file:{code}"), 1024, 128)
    windows = torch.cat(batches)
    assert windows.shape == (8, 128) and described.startswith("builtin:pydoc [") and f"file:{code} [" in described
    code_ids = tokenizer(code.read_text(), add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(code_ids) - 127) if code_ids[i : i + 128] == windows[4].tolist()]
    assert starts, "the second half of the windows comes from the second text"
    out = convert_cli(
        tiny("llama-gqa"),
        tmp_path / "mixed",
        "mfa-kr",
        "--kv-ratio",
        "0.5",
        extra=("--calib", "builtin:pydoc", str(code)),
    )
    record = json.loads((out / "config.json").read_text())["conversion"]
    assert record["calibration"] == described and record["calibration_tokens"] == 2048


# The conversion's math, by the module whose name the recipe calls it through.
MATH = {
    recipe_module: (
        "second_moment",
        "read_attention",
        "normalised_inputs",
        "convert_layer",
        "readout_statistics",
        "readout_samples",
        "refit_from_statistics",
        "refit_from_samples_",
        "mfa_tensors",
    ),
    fz: ("balance_", "round_inputs_", "factor_query"),
}
DEVICE_CASES = {
    "mfa-kr, refit, shared query": ("llama-gqa", ["--variant", "mfa-kr", "--kv-ratio", "0.5", "--share-q-dim", "32"]),
    "mfa, refit from samples": ("qwen2", ["--variant", "mfa", "--kv-ratio", "0.5"]),
    "exact": ("llama-gqa", ["--variant", "mfa", "--kv-ratio", "1.0"]),
    "qk-norm exact layout": ("qwen3", ["--variant", "mfa-kr", "--kv-ratio", "0.5"]),
    "qk-norm folded": ("olmo2", ["--variant", "mfa", "--kv-ratio", "0.5", "--approximate-qk-norm"]),
}


IN_MATH = [0]  # depth of math calls under way


def on_meta_by_default(fn):
    def call(*args, **kwargs):
        IN_MATH[0] += 1
        try:
            with torch.device("meta"):
                return fn(*args, **kwargs)
        finally:
            IN_MATH[0] -= 1

    return call


def no_copy_to_host(cpu):
    def call(tensor, *args, **kwargs):
        assert not IN_MATH[0], "the math copied a tensor to the host"
        return cpu(tensor, *args, **kwargs)

    return call


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_the_math_creates_nothing_on_the_default_device(tiny, family, tmp_path, monkeypatch, case):
    """The statistics, eigenproblems and solves stay on their inputs' device (the one the calibration ran on, so
    --device cuda keeps them on the GPU): run with the default device set to meta inside every call of the math,
    where a tensor made without naming a device would be an empty meta tensor and mixing it with the real ones an
    error, and with .cpu() refused there, every conversion writes the same tensors as without."""
    kind, args = DEVICE_CASES[case]
    src = tiny(kind) if kind in TINY else family(kind)
    common = ["convert", str(src)]
    if "samples" in case:
        monkeypatch.setattr(recipe_module, "refit_memory", lambda *a: {"statistics": 10**15, "samples": 0})
    assert main([*common, str(tmp_path / "reference"), *args, *QUICK_CALIB]) == 0
    for module, names in MATH.items():
        for name in names:
            monkeypatch.setattr(module, name, on_meta_by_default(getattr(module, name)))
    monkeypatch.setattr(torch.Tensor, "cpu", no_copy_to_host(torch.Tensor.cpu))
    assert main([*common, str(tmp_path / "meta"), *args, *QUICK_CALIB]) == 0
    reference, meta = LazyCheckpoint(tmp_path / "reference"), LazyCheckpoint(tmp_path / "meta")
    assert reference.names() == meta.names()
    assert all(torch.equal(reference.get(n), meta.get(n)) for n in reference.names())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_on_cuda(tiny, tokenizer, tmp_path, monkeypatch, variant):
    """--device cuda: the forward passes and the math (statistics, eigenproblems, solves) on the GPU; exact at full
    budget, and below it the same conversion as on the CPU up to rounding."""
    src, ids, devices = tiny("llama-gqa"), sample_ids(tokenizer, n=48), set()
    real = recipe_module.convert_layer

    def recording(src_attention, sigma, *args):
        devices.update({src_attention.wq.device.type, sigma.device.type})
        return real(src_attention, sigma, *args)

    monkeypatch.setattr(recipe_module, "convert_layer", recording)
    exact = convert_cli(src, tmp_path / "exact", variant, "--kv-ratio", "1.0", extra=("--device", "cuda"))
    assert (logits(exact, ids) - logits(src, ids)).abs().max() <= 1e-4
    gpu = convert_cli(src, tmp_path / "gpu", variant, "--kv-ratio", "0.5", extra=("--device", "cuda"))
    assert devices == {"cuda"}
    cpu = convert_cli(src, tmp_path / "cpu", variant, "--kv-ratio", "0.5")
    assert (logits(gpu, ids) - logits(cpu, ids)).abs().max() <= 1e-3


def test_default_calibration_tokens_fit_the_model_width(tiny, tmp_path):
    """Without --calib-tokens a conversion reads DEFAULT_CALIBRATION_TOKENS, in whole windows, fewer only where one
    stream of float32 hidden states would pass CALIBRATION_STREAM_BYTES; what it read is recorded; a request wins."""
    assert calibration_token_count(None, 576, 512) == DEFAULT_CALIBRATION_TOKENS == 65536
    assert calibration_token_count(None, 2048, 512) == 65536
    assert calibration_token_count(None, 4096, 512) == 32768
    assert calibration_token_count(None, 8192, 512) == 16384
    assert calibration_token_count(None, 8192, 1000) == 16000
    assert calibration_token_count(None, 2**20, 512) == 512
    assert calibration_token_count(2048, 8192, 512) == 2048
    out = tmp_path / "out"
    assert (
        main(["convert", str(tiny("llama-gqa")), str(out), "--variant", "mfa-kr", "--kv-ratio", "1.0", "--quiet"]) == 0
    )
    assert json.loads((out / "config.json").read_text())["conversion"]["calibration_tokens"] == 65536
