"""Architecture breadth: a tiny random checkpoint of every supported family, built from its transformers config
class, converted through the command line. Full budget: logits within 1e-4 and identical greedy generations, for
both variants. Half budget: it loads and generates, and its logit error is finite and below mean-pooling the
key/value heads to the same cache (where the family has heads to pool). QK-norm families: refused without the flag,
approximated with it."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FalconConfig,
)

from mfakit.convert.calibration import computing_in, load_module, record_layer_inputs, run_layer
from mfakit.convert.factorize import fold_qk_norm
from mfakit.convert.plan import ConvertOptions, plan_conversion
from mfakit.families import find_layout, head_shape, meta_skeleton
from tests.conftest import (
    CALIB,
    COMMON,
    FAMILIES,
    QK_NORM,
    assert_generates_its_own_argmax,
    convert_cli,
    greedy,
    load,
    logits,
    one_error_line,
    sample_ids,
)


def convert(src: Path, out: Path, variant: str, ratio: str, *extra: str) -> Path:
    return convert_cli(src, out, variant, "--kv-ratio", ratio, calib=CALIB, extra=extra)


def mean_pool_kv_heads(source_path: Path) -> torch.nn.Module | None:
    """The classic GQA conversion (Ainslie et al. 2023) at half the cache: average pairs of key/value heads, written
    back in both heads' places (the cache then holds half as many distinct heads). None without heads to pair."""
    config = AutoConfig.from_pretrained(source_path)
    layout = find_layout(config)
    model = load(source_path)
    for i in range(config.num_hidden_layers):
        attention = model.get_submodule(layout.attention_prefix(i))
        shape = head_shape(layout, attention, config)
        if shape.num_kv_heads % 2:
            return None
        names = (layout.k, layout.v) if layout.qkv is None else (layout.qkv,)
        for module in (attention.get_submodule(n) for n in names):
            for t in (module.weight, getattr(module, "bias", None)):
                if t is not None:
                    rows = t.data.T if layout.conv1d and t.dim() == 2 else t.data
                    for heads in _kv_head_views(rows, layout, shape):
                        for j in range(0, shape.num_kv_heads, 2):
                            mean = (heads[j] + heads[j + 1]) / 2
                            heads[j].copy_(mean)
                            heads[j + 1].copy_(mean)
    return model


def _kv_head_views(rows: torch.Tensor, layout, shape) -> list[torch.Tensor]:
    """Views (g, d_h, ...) of the key and/or value heads inside projection rows (output dimension first)."""
    h, g, dh = shape.num_heads, shape.num_kv_heads, shape.head_dim
    rest = rows.shape[1:]
    if layout.qkv is None:
        return [rows.view(g, dh, *rest)]
    if layout.fused == "concat":
        return [rows[h * dh : (h + g) * dh].view(g, dh, *rest), rows[(h + g) * dh :].view(g, dh, *rest)]
    per_group = rows.view(g, h // g + 2, dh, *rest)
    return [per_group[:, -2], per_group[:, -1]]


@pytest.mark.parametrize("kind", [*FAMILIES, *QK_NORM])
def test_full_budget_exact_and_greedy_equal(family, tokenizer, tmp_path, kind, capsys):
    src = family(kind)
    ids = sample_ids(tokenizer, n=40)
    source = load(src)
    ref, ref_greedy = logits(source, ids), greedy(source, ids[:, :8])
    for variant in ("mfa", "mfa-kr"):
        model = load(convert(src, tmp_path / variant, variant, "1.0"))
        assert (logits(model, ids) - ref).abs().max().item() <= 1e-4, variant
        assert torch.equal(greedy(model, ids[:, :8]), ref_greedy), variant
    assert f"mfakit: {AutoConfig.from_pretrained(src).model_type} (" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [*FAMILIES, *QK_NORM])
def test_half_budget_below_mean_pooling(family, tokenizer, tmp_path, kind):
    src = family(kind)
    ids = sample_ids(tokenizer, n=64)
    ref = logits(load(src), ids)
    pooled = mean_pool_kv_heads(src)
    baseline = (logits(pooled, ids) - ref).pow(2).mean().item() if pooled is not None else None
    for variant in ("mfa", "mfa-kr"):
        model = load(convert(src, tmp_path / variant, variant, "0.5"))
        error = (logits(model, ids) - ref).pow(2).mean().item()
        assert 0 < error < float("inf"), variant
        if baseline is not None:
            assert error < baseline, (variant, error, baseline)
        assert_generates_its_own_argmax(model, ids[:, :8])


@pytest.mark.parametrize("kind", list(QK_NORM))
def test_qk_norm_is_read_through_the_normalised_projections(family, tmp_path, kind):
    """With no flag a QK-norm layer keeps the source's own query/key projections and norms (bit for bit) before
    its latent; this once was refused without --approximate-qk-norm."""
    from safetensors.torch import load_file

    src = family(kind)
    out = convert(src, tmp_path / "kr", "mfa-kr", "0.5")
    config = load(out).config
    assert all(layer["pre_latent"]["latent_reads_hidden"] for layer in config.mfa_layers)
    assert config.conversion["approximate_qk_norm"] is False
    source, converted = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight"):
        key = f"model.layers.1.self_attn.{name}"
        assert torch.equal(converted[key], source[key]), key
    assert converted["model.layers.1.self_attn.q_mix"].shape == (4, 32, 16)


@pytest.mark.parametrize("kind", list(QK_NORM))
def test_qk_norm_approximation_is_close_and_generates(family, tokenizer, tmp_path, kind):
    """The folded norm is not exact; on these random models it keeps the logit error to a small fraction of the
    logit variance (measured: Qwen3 0.015, OLMo-2 0.12), and the converted model generates."""
    src = family(kind)
    ids = sample_ids(tokenizer, n=48)
    ref = logits(load(src), ids)
    model = load(convert(src, tmp_path / "kr", "mfa-kr", "1.0", "--approximate-qk-norm"))
    relative = ((logits(model, ids) - ref).pow(2).mean() / ref.var()).item()
    assert 0 < relative < 0.25, relative
    assert_generates_its_own_argmax(model, ids[:, :8])
    assert model.config.conversion["approximate_qk_norm"] is True


def test_meta_skeleton_head_shapes():
    """Falcon's MQA layout has one key/value head; the shapes come from the weights, not from config names."""
    config = FalconConfig(**COMMON, **FAMILIES["falcon-mqa"][1])
    layout = find_layout(config)
    shape = head_shape(layout, meta_skeleton(config).get_submodule(layout.attention_prefix(0)), config)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 1, 16)


@pytest.mark.parametrize("norm_width", [16, 64])
def test_fold_qk_norm_gain_is_least_squares_and_scale_free(norm_width):
    """Per-head (Qwen3) and whole-projection (OLMo-2) norms: the folded gain beats any other constant gain, and
    scaling the inputs leaves the folded projection's outputs unchanged (the norm's output does not change)."""
    torch.manual_seed(0)
    rows, x = torch.randn(4, 16, 9, dtype=torch.float64), torch.randn(500, 8, dtype=torch.float64)
    x = x * torch.rand(500, 1, dtype=torch.float64) * 3  # tokens of different norms
    gamma = torch.rand(norm_width, dtype=torch.float64) + 0.5
    x1 = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)

    def normed(w):
        y = (x1 @ w.reshape(64, 9).T).reshape(500, 4, 16)
        y = y if norm_width == 16 else y.reshape(500, 1, 64)
        return (gamma * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(500, 64)

    target = normed(rows)
    folded = fold_qk_norm(rows, gamma, 1e-6, x)
    error = (x1 @ folded.reshape(64, 9).T - target).pow(2).sum()
    for factor in (0.9, 1.1):
        assert error < (x1 @ (factor * folded).reshape(64, 9).T - target).pow(2).sum()
    bias_free = rows.clone()
    bias_free[..., -1] = 0
    assert torch.allclose(
        fold_qk_norm(bias_free, gamma, 0.0, 2 * x), fold_qk_norm(bias_free, gamma, 0.0, x) / 2, rtol=1e-10
    )


@pytest.mark.parametrize("kind", ["falcon-mqa", "gemma2", "gpt-neox", "opt"])
def test_kv_report_measured_equals_formula(family, tmp_path, kind):
    """Source and converted caches, measured on a real forward pass, equal the formula (Falcon's single key/value
    head, Gemma-2's sliding-window layers), and the half-budget conversion caches half of the source."""
    from mfakit.eval import kv_report

    src = family(kind)
    source = kv_report(load(src), context=40)
    converted = kv_report(load(convert(src, tmp_path / "kr", "mfa-kr", "0.5")), context=40)
    for report in (source, converted):
        assert report.measured_bytes_per_token == pytest.approx(report.formula_bytes_per_token)
    assert converted.measured_bytes_per_token == pytest.approx(source.measured_bytes_per_token / 2)


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_base_model_checkpoint_names(family, tokenizer, tmp_path, kind):
    """Hub checkpoints saved from the base model (GPT-2: `h.0.attn...` with its old causal-mask buffers; OPT:
    `decoder.layers...` beside `lm_head.weight`) convert as the prefixed ones do."""
    from safetensors.torch import load_file, save_file

    src = family(kind)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).base_model_prefix
    tensors = load_file(src / "model.safetensors")
    stripped = {k.removeprefix(f"{base}."): v for k, v in tensors.items()}
    if kind == "gpt2":
        mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
        stripped.update({f"h.{i}.attn.bias": mask.clone() for i in range(2)})
        stripped.pop("lm_head.weight", None)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file(stripped, legacy / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    ids = sample_ids(tokenizer, n=40)
    ref = logits(load(src), ids)
    model = load(convert(legacy, tmp_path / "kr", "mfa-kr", "1.0"))
    assert (logits(model, ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("model_type", "extra", "message"),
    [
        ("hunyuan_v1_dense", {}, "after RoPE"),
        ("llama4_text", {"num_local_experts": 2, "intermediate_size_mlp": 128}, "temperature"),
        ("olmoe", {"clip_qkv": 8.0, "num_experts": 2, "num_experts_per_tok": 1}, "clip_qkv"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_what_mfa_cannot_reproduce_is_refused_with_its_reason(tokenizer, tmp_path, capsys, model_type, extra, message):
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type,
        **COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **extra,
    )
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    line = one_error_line(
        capsys, ["convert", str(src), str(tmp_path / "out"), "--variant", "mfa", "--kv-ratio", "1.0", *CALIB]
    )
    assert message in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [*FAMILIES, *QK_NORM])
def test_computing_in_float32_equals_a_float32_copy(family, tokenizer, kind):
    """The converter runs a bfloat16 layer in float32 by casting each submodule's own tensors as its forward starts
    (`computing_in`), not the whole layer at once: every family's bfloat16 model computes, this way, bit for bit
    what its float32 copy computes, and keeps its stored tensors."""
    model = AutoModelForCausalLM.from_pretrained(family(kind), dtype=torch.bfloat16).eval()
    copy = deepcopy(model).to(torch.float32)
    stored = {name: t.clone() for name, t in model.state_dict().items()}
    ids = sample_ids(tokenizer, n=24)
    with torch.no_grad(), computing_in(model, torch.float32):
        cast = model(ids).logits
    assert cast.dtype == torch.float32
    assert torch.equal(cast, copy(ids).logits)
    after = model.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in stored.items())


@pytest.mark.parametrize("kind", [*FAMILIES, *QK_NORM])
def test_attention_mass_is_read_without_changing_the_layer(family, tokenizer, kind):
    """The attention each token receives (what the attention-weighted calibration weighs tokens by) is read through
    eager attention with the family's own mask made additive: every layer computes what it computes without it (a
    causal mask lost on the way would change the outputs), every query hands out one unit of attention, and the last
    token, which only it sees, receives at most one."""
    plan = plan_conversion(family(kind), ConvertOptions(variant="mfa", kv_ratio=0.5))
    ids = sample_ids(tokenizer, n=24)
    path = plan.layout.layers_path
    inputs = record_layer_inputs(plan.skeleton, path, plan.ckpt, [ids], "cpu", torch.float32)
    hidden, implementation = inputs.hidden, plan.config._attn_implementation
    for i, layer_args in enumerate(inputs.layer_args):
        layer = load_module(plan.skeleton, f"{path}.{i}", plan.ckpt)
        attention = layer.get_submodule(plan.layout.attention_name)
        plain = run_layer(layer, attention, hidden, layer_args, attn_out=True)
        weighed = run_layer(layer, attention, hidden, layer_args, attn_out=True, attn_mass=True)
        assert plan.config._attn_implementation == implementation
        assert torch.allclose(weighed.attn_out[0], plain.attn_out[0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(weighed.hidden[0], plain.hidden[0], atol=1e-5, rtol=1e-4)
        mass = weighed.attn_mass[0]
        assert mass.shape == ids.shape and bool((mass >= 0).all())
        assert torch.allclose(mass.sum(-1), torch.full((ids.shape[0],), float(ids.shape[1]), dtype=mass.dtype))
        assert bool((mass[:, -1] <= 1 + 1e-6).all())
        hidden = plain.hidden
