"""The conversion methods below the exact budget: the readout refit and its ridge, low RoPE frequencies as NoPE,
and that the default method (sequential calibration, refit, key share, NoPE) beats the plain factorization."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mfakit.cli import main
from mfakit.convert import calibration
from mfakit.convert import factorize as fz
from mfakit.convert import plan as plan_module
from mfakit.convert import readout as ro
from mfakit.convert import recipe as recipe_module
from mfakit.convert.plan import ConversionMethod
from mfakit.errors import OptionsError
from tests.conftest import CALIB, convert_cli, load, logits, sample_ids


def random_stats(
    tokens: int, n: int, d: int, noise: float, gen: torch.Generator
) -> tuple[ro.ReadoutStats, torch.Tensor]:
    u = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    truth = torch.randn(d, n, generator=gen, dtype=torch.float64)
    y = u @ truth.T + noise * torch.randn(tokens, d, generator=gen, dtype=torch.float64)
    return ro.ReadoutStats(u.T @ u, u.T @ y, float(y.pow(2).sum()), tokens), truth


def layer_with_readout(wo: torch.Tensor, heads: int) -> fz.MFALayer:
    d, n = wo.shape
    v = n // heads
    return fz.MFALayer(
        wq=torch.zeros(heads, v, 3),
        wk=torch.zeros(v, 3),
        wv=None,
        wo=wo.reshape(d, heads, v),
        bo=None,
        rope_freqs=torch.zeros(v // 2),
        scale=1.0,
    )


@pytest.mark.parametrize("tokens", [40, 400, 4000])
def test_readout_refit_never_raises_the_calibration_error(tokens):
    gen = torch.Generator().manual_seed(tokens)
    folds = [random_stats(tokens // 4, 16, 8, 0.5, gen)[0] for _ in range(4)]
    prior = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    refit, ridge = ro.refit_from_statistics(layer_with_readout(prior, heads=2), folds)
    total = sum(folds[1:], start=folds[0])
    assert ridge in ro.RIDGES
    assert ro._readout_error(total, refit.wo.reshape(8, 16)) <= ro._readout_error(total, prior)


def test_ridge_is_chosen_only_when_tokens_are_scarce():
    gen = torch.Generator().manual_seed(0)
    n = 32
    plenty = [random_stats(ro.TOKENS_PER_FEATURE_UNREGULARISED * n, n, 8, 1.0, gen)[0] for _ in range(2)]
    prior = torch.zeros(8, n, dtype=torch.float64)
    assert ro.choose_ridge(plenty, prior) == ro.STABLE_RIDGE
    # Scarce, noisy data around a prior that is the truth: validation must ask for shrinkage.
    scarce, truth = [], None
    noise = torch.Generator().manual_seed(2)
    for _ in range(4):
        gen = torch.Generator().manual_seed(1)
        u = torch.randn(12, n, generator=noise, dtype=torch.float64)
        truth = torch.randn(8, n, generator=gen, dtype=torch.float64)
        y = u @ truth.T + 3.0 * torch.randn(12, 8, generator=noise, dtype=torch.float64)
        scarce.append(ro.ReadoutStats(u.T @ u, u.T @ y, float(y.pow(2).sum()), 12))
    assert ro.choose_ridge(scarce, truth) > 1e-3
    assert ro.choose_ridge(scarce[:1], truth) == ro.RIDGES[-1]


def samples_and_stats(tokens: int, n: int, folds: int, prior: torch.Tensor, gen: torch.Generator):
    """The same random readout data as samples (tokens dealt to folds round-robin; residuals against `prior`) and as
    per-fold statistics."""
    u = torch.randn(tokens, n, generator=gen).double()  # float32 values, as the converted attention computes them
    y = u @ torch.randn(n, 8, generator=gen, dtype=torch.float64) + 3.0 * torch.randn(tokens, 8, generator=gen)
    fold = torch.arange(tokens) % folds
    stats = [
        ro.ReadoutStats(
            u[fold == k].T @ u[fold == k], u[fold == k].T @ y[fold == k], float(y[fold == k].pow(2).sum()), 0
        )
        for k in range(folds)
    ]
    for k, st in enumerate(stats):
        st.tokens = int((fold == k).sum())
    return ro.ReadoutSamples(u.float(), y - u @ prior.T, fold), stats


@pytest.mark.parametrize(("tokens", "n"), [(24, 40), (60, 12), (400, 12)])
def test_refit_from_samples_equals_refit_from_statistics(tokens, n):
    """The sample (kernel) form gives the statistics form's ridge and readout: with fewer tokens than features
    (where it is used), with more, and with plenty (no validation); the samples' form updates the layer in place."""
    gen = torch.Generator().manual_seed(tokens)
    prior = torch.randn(8, n, generator=gen, dtype=torch.float64).float().double()
    samples, stats = samples_and_stats(tokens, n, 4, prior, gen)
    layer = layer_with_readout(prior.float(), heads=2)
    from_stats, expected = ro.refit_from_statistics(layer, stats)
    before = layer.wo.clone()
    ridge = ro.refit_from_samples_(layer, samples)
    assert ridge == expected
    assert torch.allclose(layer.wo, from_stats.wo, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer.wo, before)


@pytest.mark.parametrize("written", [torch.bfloat16, torch.float16])
def test_readout_update_in_float32_for_a_half_precision_readout(written):
    """A readout written in bf16 or fp16 is updated in float32 where the measured error allows, within a small
    fraction of the written dtype's rounding of the float64 update; a float32 readout keeps float64, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    prior = torch.randn(8, 40, generator=gen, dtype=torch.float64).float().double()
    samples, _ = samples_and_stats(24, 40, 4, prior, gen)
    chosen = []
    real = ro.update_dtype
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ro, "update_dtype", lambda *args: chosen.append(real(*args)) or chosen[-1])
        exact, fast, kept = (layer_with_readout(prior.float(), heads=2) for _ in range(3))
        ro.refit_from_samples_(exact, samples)
        ro.refit_from_samples_(fast, samples, written)
        ro.refit_from_samples_(kept, samples, torch.float32)
    assert chosen == [torch.float64, torch.float32, torch.float64]
    assert torch.equal(kept.wo, exact.wo)
    scale = exact.wo.abs().max()
    assert (fast.wo - exact.wo).abs().max() <= torch.finfo(written).eps / ro.FLOAT32_UPDATE_MARGIN * scale


def test_readout_update_keeps_float64_where_float32_cancels():
    """Coefficients large along a direction that U hardly has (a kernel's weak direction under a small ridge): their
    product cancels, float32's error exceeds the bound, and the update is computed in float64."""
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    u = (basis * torch.logspace(0, -6, 32, dtype=torch.float64)) @ torch.randn(
        32, 64, generator=gen, dtype=torch.float64
    )
    coefficients = basis[:, -1:] * 1e6 @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
    wo = torch.randn(8, 64, generator=gen)
    assert ro.update_dtype(coefficients, u.float(), wo, torch.bfloat16) == torch.float64
    assert ro.update_dtype(coefficients * 1e-6, u.float(), wo, torch.bfloat16) == torch.float32


@pytest.mark.parametrize("seed", range(6))
def test_ridge_from_the_kernel_validates_like_refits_per_fold(seed):
    """The kernel form's leave-one-fold-out errors (one eigendecomposition, block inverses) choose the ridge that
    refitting without each fold chooses, on ill-conditioned readouts of low rank with fewer tokens than features."""
    gen = torch.Generator().manual_seed(seed)
    tokens, n, rank = 96, 160, 40 + 10 * seed
    spectrum = torch.logspace(0, -2 - seed / 2, rank, dtype=torch.float64)
    u = (
        (
            (torch.randn(tokens, rank, generator=gen, dtype=torch.float64) * spectrum)
            @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
        )
        .float()
        .double()
    )
    y = u @ torch.randn(n, 8, generator=gen, dtype=torch.float64) * 0.3 + torch.randn(
        tokens, 8, generator=gen, dtype=torch.float64
    )
    fold = torch.arange(tokens) // 4 % 8
    prior = torch.zeros(8, n, dtype=torch.float64)
    stats = [
        ro.ReadoutStats(
            u[fold == k].T @ u[fold == k],
            u[fold == k].T @ y[fold == k],
            float(y[fold == k].pow(2).sum()),
            int((fold == k).sum()),
        )
        for k in range(8)
    ]
    kernel = ro.sample_kernel(u.float())
    assert ro.choose_ridge_dual(kernel, y, fold, n) == ro.choose_ridge(stats, prior)


def test_sample_kernel_sums_blocks_in_float64(monkeypatch):
    """The kernel summed over feature blocks equals U U^T computed whole in float64."""
    monkeypatch.setattr(ro, "KERNEL_BLOCK", 7)
    u = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    expected = u.double() @ u.double().T
    assert torch.allclose(ro.sample_kernel(u), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 4, 9, 130])
def test_gram_from_the_upper_blocks_equals_the_whole_product(n):
    """Sums of u^T u over several updates, accumulated on and above the diagonal blocks and mirrored once, equal the
    whole products summed; the lower blocks before mirroring are left untouched (zero here)."""
    gen = torch.Generator().manual_seed(n)
    updates = [torch.randn(17, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for u in updates:
        ro.add_gram_(gram, u)
    below = torch.cat([gram[stop:, start:stop].flatten() for start, stop in ro.gram_blocks(n)])
    assert not below.any()
    expected = sum(u.T @ u for u in updates)
    assert torch.allclose(ro.mirror_gram_(gram), expected, rtol=1e-13, atol=1e-13)


def synthetic_source(pairs: int = 4, nope: int = 2, heads: int = 4, kv_heads: int = 2) -> fz.SourceAttention:
    gen = torch.Generator().manual_seed(0)
    dh, d1 = 2 * pairs + nope, 9
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return fz.SourceAttention(
        wq=rnd(heads, dh, d1),
        wk=rnd(kv_heads, dh, d1),
        wv=rnd(kv_heads, dh, d1),
        wo=rnd(d1 - 1, heads, dh),
        bo=None,
        rope_freqs=torch.tensor([10000 ** (-i / pairs) for i in range(pairs)], dtype=torch.float64),
        scale=1.0,
    )


def test_low_frequencies_become_nope_channels():
    src = synthetic_source()  # frequencies 1, 0.1, 0.01, 0.001
    moved = fz.nope_low_frequencies(src, max_angle=1.0, context=256)  # 0.001 * 256 <= 1 < 0.01 * 256
    assert moved.rope_freqs.tolist() == src.rope_freqs[:3].tolist()
    # The kept pairs are untouched, the slow pair's two channels join the NoPE channels.
    for kept in (0, 1, 2):
        assert torch.equal(moved.wk[:, kept], src.wk[:, kept])
        assert torch.equal(moved.wk[:, 3 + kept], src.wk[:, 4 + kept])
    assert torch.equal(moved.wk[:, 6:8], src.wk[:, [3, 7]])
    assert torch.equal(moved.wk[:, 8:], src.wk[:, 8:])
    # Queries and keys are permuted alike, so unrotated scores are unchanged.
    assert torch.allclose(
        torch.einsum("hcx,gcy->hgxy", moved.wq, moved.wk), torch.einsum("hcx,gcy->hgxy", src.wq, src.wk)
    )
    assert fz.nope_low_frequencies(src, max_angle=1e-6, context=256) is src
    assert fz.nope_low_frequencies(src, max_angle=1e9, context=256).num_pairs == 0


@pytest.mark.parametrize(
    ("variant", "kv_dim", "v_dim", "angle"),
    [
        ("mfa-kr", 20, 20, 1.0),  # half of the source's 2 x (10 + 10) cached numbers
        ("mfa-kr", 18, 18, 2 * math.pi),
        ("mfa", 10, 10, 1.0),  # MFA caches a key and a value: 20 of 40
        ("mfa", 10, 8, 2 * math.pi),
    ],
)
def test_default_nope_angle_follows_the_budget(monkeypatch, variant, kv_dim, v_dim, angle):
    """Unless set, the NoPE angle is one radian from half the cache up and one full turn below; a set angle wins
    at every budget."""
    src, sigma = synthetic_source(), torch.eye(9, dtype=torch.float64)
    seen = []
    real = fz.nope_low_frequencies
    monkeypatch.setattr(fz, "nope_low_frequencies", lambda s, a, c: seen.append(a) or real(s, a, c))
    plan_module.convert_layer(src, sigma, variant, kv_dim, v_dim, ConversionMethod(), 256)
    plan_module.convert_layer(src, sigma, variant, kv_dim, v_dim, ConversionMethod(nope_angle=3.0), 256)
    assert seen == [angle, 3.0]


def test_logit_scale_follows_the_variant_and_budget():
    """Unless set: 1.15 for MFA-KR below half the cache, 1 otherwise; a set factor wins everywhere."""
    default, set_ = ConversionMethod(), ConversionMethod(logit_scale=1.3)
    assert [default.logit_scale_at(share, "mfa-kr") for share in (0.125, 0.25, 0.5, 1.0)] == [1.15, 1.15, 1.0, 1.0]
    assert default.logit_scale_at(0.25, "mfa") == 1.0
    assert set_.logit_scale_at(0.5, "mfa") == set_.logit_scale_at(0.25, "mfa-kr") == 1.3
    with pytest.raises(OptionsError, match="logit_scale"):
        ConversionMethod(logit_scale=0.0)


def test_tune_steps_follow_the_variant_and_budget():
    """Unless set: TUNE_STEPS for MFA-KR layers caching at most an eighth of the source's, none otherwise; set steps
    (0 included) win everywhere; negative steps are refused."""
    default, set_ = ConversionMethod(), ConversionMethod(tune_steps=7)
    steps = plan_module.TUNE_STEPS
    assert [default.tune_steps_at(share, "mfa-kr") for share in (0.0625, 0.125, 0.25, 0.5)] == [steps, steps, 0, 0]
    assert default.tune_steps_at(0.125, "mfa") == 0
    assert set_.tune_steps_at(0.5, "mfa") == 7 and ConversionMethod(tune_steps=0).tune_steps_at(0.125, "mfa-kr") == 0
    with pytest.raises(OptionsError, match="tune_steps"):
        ConversionMethod(tune_steps=-1)


def test_logit_scale_multiplies_the_fitted_queries(tiny, tmp_path):
    """The first layer of a default MFA-KR conversion below half the cache is the one with --logit-scale 1 with its
    query rows times 1.15 (keys and outputs identical); the later layers see its output, so they differ."""
    src = tiny("llama-gqa")
    converted = {}
    for name, flags in {"default": [], "one": ["--logit-scale", "1"]}.items():
        out = tmp_path / name
        assert main(["convert", str(src), str(out), "--variant", "mfa-kr", "--kv-ratio", "0.25", *CALIB, *flags]) == 0
        converted[name] = load_file(out / "model.safetensors")
    default, one = converted["default"], converted["one"]
    first = "model.layers.0.self_attn."
    assert torch.allclose(default[first + "q_proj.weight"], 1.15 * one[first + "q_proj.weight"], rtol=1e-6, atol=0)
    assert torch.equal(default[first + "k_proj.weight"], one[first + "k_proj.weight"])
    assert torch.equal(default[first + "o_proj.weight"], one[first + "o_proj.weight"])
    second = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(default[second], one[second])


def kl_to_source(path, source, ids) -> float:
    out, ref = logits(path, ids), logits(source, ids)
    return float((ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize(("variant", "ratio"), [("mfa", "0.25"), ("mfa-kr", "0.25"), ("mfa-kr", "0.125")])
def test_default_method_beats_the_plain_factorization(trained_tiny, tokenizer, tmp_path, variant, ratio):
    src = trained_tiny
    ids = sample_ids(tokenizer, n=128, batch=4)
    errors = {}
    for name, flags in {"plain": ["--plain"], "default": []}.items():
        out = tmp_path / name
        assert main(["convert", str(src), str(out), "--variant", variant, "--kv-ratio", ratio, *CALIB, *flags]) == 0
        errors[name] = kl_to_source(out, src, ids)
        method = json.loads((out / "config.json").read_text())["conversion"]["method"]
        assert method["refit"] == (name == "default")
    assert errors["default"] < 0.9 * errors["plain"], errors
    assert math.isfinite(errors["default"])


def test_method_flags_are_recorded_and_change_the_layout(tiny, tmp_path):
    src = tiny("llama-gqa")
    flags = ["--no-sequential", "--no-refit", "--key-fraction", "0.5", "--nope-angle", "0"]
    out = tmp_path / "flags"
    assert main(["convert", str(src), str(out), "--variant", "mfa", "--kv-ratio", "0.5", *CALIB, *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    method = config["conversion"]["method"]
    assert method == {
        "sequential": False,
        "refit": False,
        "key_fraction": 0.5,
        "nope_angle": 0.0,
        "nope_context": None,
        "logit_scale": None,
        "tune_steps": None,
        "tune_lr": 0.001,
        "attention_weight": plan_module.ATTENTION_WEIGHT,
        "stream_correction": None,
    }
    assert all(0 not in layer["rope_freqs"] for layer in config["mfa_layers"])
    nope = tmp_path / "nope"
    assert main(["convert", str(src), str(nope), "--variant", "mfa", "--kv-ratio", "0.5", *CALIB]) == 0
    config = json.loads((nope / "config.json").read_text())
    assert all(0 in layer["rope_freqs"] for layer in config["mfa_layers"])


def test_bad_key_fraction_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(
        [
            "convert",
            str(tiny("llama-gqa")),
            str(out),
            "--variant",
            "mfa-kr",
            "--kv-ratio",
            "0.5",
            "--key-fraction",
            "1.5",
            *CALIB,
        ]
    )
    assert code == 2 and "key_fraction" in capsys.readouterr().err and not out.exists()


def values(layer: fz.MFALayer) -> torch.Tensor:
    """The rows producing what the output projection reads: the value rows, or the latent in MFA-KR."""
    return layer.wk if layer.wv is None else layer.wv


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_balance_keeps_the_function_and_gives_unit_latent_scale(variant):
    src = synthetic_source()
    layer = fz.exact_mfa(src) if variant == "mfa" else fz.exact_mfa_kr(src)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(9, 9, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, 9, dtype=torch.float64)
    sigma = a @ a.T
    out = copy.deepcopy(layer)
    fz.balance_(out, sigma)

    # Scores (query rows against key rows, summed over the latent) and what each output reads are unchanged.
    def scores(m: fz.MFALayer) -> torch.Tensor:
        return torch.einsum("hcx,cy->hxy", m.wq.double(), m.wk)

    def reads(m: fz.MFALayer) -> torch.Tensor:
        return torch.einsum("dhc,cy->dhy", m.wo.double(), values(m))

    assert torch.allclose(scores(out), scores(layer), atol=1e-5) and torch.allclose(reads(out), reads(layer), atol=1e-5)
    ms = ((out.wk @ sigma) * out.wk).sum(1)
    half = out.kv_dim // 2
    assert torch.allclose((ms[:half] + ms[half:]) / 2, torch.ones(half, dtype=torch.float64))
    if out.wv is not None:
        assert torch.allclose(((out.wv @ sigma) * out.wv).sum(1), torch.ones(out.v_dim, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_readout_factors_stay_the_output_projection_through_balancing(variant):
    """A compressed layer's readout factors multiply to its output projection, before and after `balance_`, and the
    refit's `FactoredReadout` computes what the dense projection (with its bias) computes, in the input's dtype;
    for a bf16 input, the exact product rounded once (nothing rounded to bf16 between the factors)."""
    src = synthetic_source()
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    sigma = a @ a.T
    layer = fz.compress_mfa(src, sigma, 4, 4) if variant == "mfa" else fz.compress_mfa_kr(src, sigma, 8, 6)

    def product(m: fz.MFALayer) -> torch.Tensor:
        return torch.einsum("dhv,hvn->dhn", *m.readout_factors)

    assert torch.allclose(product(layer), layer.wo, rtol=1e-5, atol=1e-6)
    fz.balance_(layer, sigma)
    assert torch.allclose(product(layer), layer.wo, rtol=1e-5, atol=1e-6)
    d, h, n = layer.wo.shape
    dense = torch.nn.Linear(h * n, d)
    dense.weight.data = layer.wo.reshape(d, h * n)
    u = torch.randn(2, 3, h * n, generator=gen, dtype=torch.float64)
    factored = recipe_module.FactoredReadout(dense, layer.readout_factors)(u)
    assert factored.dtype == torch.float64
    dense.double()  # in place: the bf16 check below compares with it in float64 too
    expected = dense(u)
    assert (factored - expected).norm() <= 1e-6 * expected.norm()
    half = recipe_module.FactoredReadout(dense, layer.readout_factors)(u.bfloat16())
    assert half.dtype == torch.bfloat16
    exact = dense(u.bfloat16().double())
    rounding = torch.finfo(torch.bfloat16).eps / 2 * exact.abs() + 1e-6 * exact.abs().max()
    assert ((half.double() - exact).abs() <= rounding).all()


def test_refit_over_its_memory_limit_is_skipped(tiny, tmp_path, capsys):
    """A refit whose statistics exceed --refit-memory-gb is skipped, with a note: the output is then the same bytes
    as --no-refit."""
    src = str(tiny("llama-gqa"))
    common = ["--variant", "mfa-kr", "--kv-ratio", "0.5", *CALIB]
    assert main(["convert", src, str(tmp_path / "limited"), *common, "--refit-memory-gb", "1e-6"]) == 0
    assert "output refit skipped" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "none"), *common, "--no-refit"]) == 0
    shard = "model.safetensors"
    assert (tmp_path / "limited" / shard).read_bytes() == (tmp_path / "none" / shard).read_bytes()


def test_refit_falls_back_to_samples_when_statistics_do_not_fit(tiny, tokenizer, tmp_path, capsys, monkeypatch):
    """Where the statistics exceed the refit's memory and the samples fit, the refit runs from the samples: the
    converted model matches the statistics-based refit, unlike the unrefit one."""
    src = tiny("llama-gqa")
    common = ["--variant", "mfa-kr", "--kv-ratio", "0.5", *CALIB]
    assert main(["convert", str(src), str(tmp_path / "stats"), *common]) == 0
    assert main(["convert", str(src), str(tmp_path / "none"), *common, "--no-refit"]) == 0
    monkeypatch.setattr(recipe_module, "refit_memory", lambda *args: {"statistics": 10**15, "samples": 0})
    assert main(["convert", str(src), str(tmp_path / "samples"), *common]) == 0
    err = capsys.readouterr().err
    assert "output refit from the" in err and "output refit skipped" not in err
    ids = sample_ids(tokenizer, n=32)
    reference = logits(tmp_path / "stats", ids)
    assert (logits(tmp_path / "samples", ids) - reference).abs().max() < 1e-4
    assert (logits(tmp_path / "none", ids) - reference).abs().max() > 1e-2


def test_refit_plan_keeps_as_many_sequences_as_fit():
    """Statistics where they fit; else the samples of every sequence, or of as many as fit and no more (at least
    two, for the ridge's validation), with the validation folds the kept tokens need; else skipped."""
    features, d, seq_len, sequences = 32768, 4096, 512, 32  # a 7B-shaped layer at MFA-KR 0.5

    def samples_gb(kept: int) -> float:
        return recipe_module.refit_memory(features, d, kept * seq_len, 8)["samples"] / 1e9

    assert recipe_module.refit_plan(features, d, sequences, seq_len, 1e4).way == "statistics"
    assert recipe_module.refit_plan(features, d, sequences, seq_len, samples_gb(sequences)).sequences == sequences
    for kept in (2, 5, 31):
        limit = (samples_gb(kept) + samples_gb(kept + 1)) / 2
        plan = recipe_module.refit_plan(features, d, sequences, seq_len, limit)
        assert (plan.way, plan.sequences, plan.folds) == ("samples", kept, recipe_module.READOUT_FOLDS)
    assert recipe_module.refit_plan(features, d, sequences, seq_len, samples_gb(2) * 0.99).way == "skip"
    plenty = recipe_module.refit_plan(16, d, 32, 512, recipe_module.refit_memory(16, d, 512, 1)["samples"] / 1e9)
    assert plenty.folds == 1  # 8 tokens per feature or more: no validation needed


def test_refit_plan_replays_what_fits_beside_the_refit():
    """The sequential pass replays the refit's output-projection inputs when every sequence's fit beside the
    statistics (or the refit reads all of them as samples), never from a subset of the sequences."""
    features, d, seq_len, sequences = 32768, 4096, 512, 32
    need = recipe_module.refit_memory(features, d, sequences * seq_len, 8)
    inputs = sequences * seq_len * features * 4
    beside = (need["statistics"] + inputs) / 1e9
    assert recipe_module.refit_plan(features, d, sequences, seq_len, beside).replay
    short = recipe_module.refit_plan(features, d, sequences, seq_len, beside * 0.999)
    assert short.way == "statistics" and not short.replay
    assert recipe_module.refit_plan(features, d, sequences, seq_len, need["samples"] / 1e9).replay
    subset = recipe_module.refit_plan(features, d, sequences, seq_len, need["samples"] / 1e9 * 0.99)
    assert subset.way == "samples" and subset.sequences < sequences and not subset.replay


def test_spread_rows_keeps_sequences_spread_over_all_with_their_arguments():
    """The kept sequences are spread evenly over every batch (so every text of a mixture keeps its share), each with
    its own target, mask and positions; keeping all of them keeps everything."""
    from mfakit.convert.calibration import spread_rows

    x = [torch.arange(b * 3 * 2, dtype=torch.float32).reshape(b, 3, 2) + 100 * k for k, b in enumerate((8, 8, 4))]
    y = [-t for t in x]
    args = [
        ((), {"attention_mask": None, "position_ids": torch.arange(b)[:, None].expand(b, 3) + 10 * k})
        for k, b in enumerate((8, 8, 4))
    ]
    sx, sy, sargs = spread_rows(x, y, args, 5)
    rows = torch.cat(x)[[0, 4, 8, 12, 16]]
    assert torch.equal(torch.cat(sx), rows) and torch.equal(torch.cat(sy), -rows)
    positions = torch.cat([a[1]["position_ids"] for a in sargs])[:, 0]
    assert positions.tolist() == [0, 4, 10, 14, 20]
    assert all(a[1]["attention_mask"] is None for a in sargs)
    same = spread_rows(x, y, args, 20)
    assert all(torch.equal(a, b) for a, b in zip(same[0], x, strict=True))


def test_refit_from_a_subset_of_sequences_where_the_samples_do_not_fit(tiny, tmp_path, capsys, monkeypatch):
    """Where the samples of every calibration sequence exceed the refit's memory, the refit reads as many sequences
    as fit instead of being skipped: noted, and its output projections are neither the unrefit ones nor those of the
    refit on every sequence, while every other tensor of the first layer (calibrated on the source's own hidden
    states in all three) is the same bytes."""
    src = tiny("llama-gqa")
    common = ["--variant", "mfa-kr", "--kv-ratio", "0.5", *CALIB]
    real = recipe_module.refit_memory
    monkeypatch.setattr(recipe_module, "refit_memory", lambda *a: {**real(*a), "statistics": 10**15})
    limit = real(4 * 32, 64, 6 * 128, 8)["samples"] / 1e9  # 4 heads x C = 32 features; 6 of 16 sequences of 128
    for name, extra in (("subset", ["--refit-memory-gb", str(limit)]), ("full", []), ("none", ["--no-refit"])):
        assert main(["convert", str(src), str(tmp_path / name), *common, *extra]) == 0
    err = capsys.readouterr().err
    assert "output refit from 6 of the 16 calibration sequences" in err and "skipped" not in err
    tensors = {name: load_file(tmp_path / name / "model.safetensors") for name in ("subset", "full", "none")}
    layer0 = [k for k in tensors["subset"] if k.startswith("model.layers.0.")]
    for key in layer0:
        same = [torch.equal(tensors["subset"][key], tensors[other][key]) for other in ("full", "none")]
        assert same == ([False, False] if key.endswith("o_proj.weight") else [True, True]), key


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_query_factorization_reaches_the_eckart_young_bound(variant):
    """factor_query works from the (d1, d1) matrix W^T K W; its weighted error E||K^{1/2} (W - Q_b S_Q) x~||^2 must
    be the optimum of any rank-r factorization: the sum of the eigenvalues of B B^T = K^{1/2} W Sigma W^T K^{1/2}
    past the r-th. MFA-KR's value channels meet no key energy and stay zero rows of Q_b."""
    src = synthetic_source()
    layer = fz.exact_mfa(src) if variant == "mfa" else fz.exact_mfa_kr(src)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    sigma = a @ a.T / 40
    h, C, d1 = layer.wq.shape
    w = layer.wq.reshape(h * C, d1).double()
    k = fz.key_energy(layer, sigma).repeat(h)
    bound = torch.linalg.eigvalsh(k.sqrt()[:, None] * w @ sigma @ w.T * k.sqrt()[None, :]).flip(0)
    for rank in (2, 5, 8):
        s_q, q_b = fz.factor_query(layer, sigma, rank)
        assert s_q.shape == (rank, d1) and q_b.shape == (h * C, rank)
        error = k.sqrt()[:, None] * (w - q_b.double() @ s_q)
        assert float(torch.trace(error @ sigma @ error.T)) == pytest.approx(float(bound[rank:].sum()), rel=1e-4)
        assert torch.equal(q_b[k == 0], torch.zeros_like(q_b[k == 0]))


def key_groups(gains: list[tuple[bool, list[float]]]) -> list[fz.KeyGroup]:
    """Key groups with the given (complex?, gains); only their gains and costs matter for the choice."""
    empty = torch.zeros(0, 0)
    return [
        fz.KeyGroup(0.0, is_complex, torch.tensor(sorted(g, reverse=True)), empty, empty) for is_complex, g in gains
    ]


def best_by_enumeration(groups: list[fz.KeyGroup], budget: int) -> float:
    best = 0.0
    for counts in itertools.product(*[range(len(g.gains) + 1) for g in groups]):
        if sum(c * g.cost for c, g in zip(counts, groups, strict=True)) <= budget:
            best = max(best, sum(float(g.gains[:c].sum()) for c, g in zip(counts, groups, strict=True)))
    return best


def test_component_choice_beats_greedy_on_mixed_costs():
    """Budget 2: a real group with gains [6, 1] against one pair of gain 10. By gain per channel the real channels
    come first (6 > 10/2) and fill the budget with 7; the pair alone keeps 10."""
    groups = key_groups([(False, [6.0, 1.0]), (True, [10.0])])
    assert fz.choose_components(groups, 2) == [0, 1]


@pytest.mark.parametrize("seed", range(12))
def test_component_choice_is_optimal(seed):
    """Against enumeration of every choice: within the budget, prefixes of each group, and the largest kept sum."""
    gen = torch.Generator().manual_seed(seed)
    shape = [(True, int(n)) for n in torch.randint(0, 4, (3,), generator=gen)] + [
        (False, int(torch.randint(0, 6, (1,), generator=gen)))
    ]
    groups = key_groups([(c, torch.rand(n, generator=gen).mul(10).tolist()) for c, n in shape])
    for budget in range(12):
        counts = fz.choose_components(groups, budget)
        assert all(0 <= c <= len(g.gains) for c, g in zip(counts, groups, strict=True))
        assert sum(c * g.cost for c, g in zip(counts, groups, strict=True)) <= budget
        kept = sum(float(g.gains[:c].sum()) for c, g in zip(counts, groups, strict=True))
        assert kept == pytest.approx(best_by_enumeration(groups, budget), abs=1e-9)


@pytest.mark.parametrize(
    ("kind", "variant", "dtype"),
    [
        ("phi3", "mfa-kr", "float32"),
        ("qwen3", "mfa-kr", "float32"),
        ("gemma3_text", "mfa", "float32"),
        ("gpt2", "mfa", "float32"),
        ("gpt-neox", "mfa-kr", "float32"),
        ("qwen3", "mfa-kr", "bfloat16"),
        ("phi3", "mfa", "bfloat16"),
    ],
)
@pytest.mark.parametrize("way", ["statistics", "samples"])
def test_the_sequential_pass_replays_the_refit_attention_to_the_same_bytes(
    family, tmp_path, monkeypatch, kind, variant, dtype, way
):
    """Refit from the statistics or the samples of every calibration sequence, the sequential pass replays what the
    refit's converted attention computed (its query, key and value rows rounded as written) instead of running the
    written attention again: the checkpoint is the same bytes as when the pass runs it, so every later layer was
    calibrated on what the written model computes. In bfloat16 this needs the rows rounded before the refit."""
    src = str(family(kind))
    if dtype != "float32":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
        src = str(tmp_path / dtype)
        model.save_pretrained(src)
        AutoTokenizer.from_pretrained(family(kind)).save_pretrained(src)
    common = ["--variant", variant, "--kv-ratio", "0.5", *CALIB]
    real_memory, real_refit, real_replay = (
        recipe_module.refit_memory,
        recipe_module.refit_output,
        recipe_module.ReplayedAttention,
    )
    if way == "samples":
        monkeypatch.setattr(recipe_module, "refit_memory", lambda *a: {**real_memory(*a), "statistics": 10**15})
    replays = []
    monkeypatch.setattr(recipe_module, "ReplayedAttention", lambda *a: replays.append(a) or real_replay(*a))
    assert main(["convert", src, str(tmp_path / "replayed"), *common]) == 0
    assert len(replays) == 2  # both layers
    monkeypatch.setattr(recipe_module, "refit_output", lambda *a: (real_refit(*a)[0], None))
    assert main(["convert", src, str(tmp_path / "run"), *common]) == 0
    assert len(replays) == 2
    replayed, run = (load_file(tmp_path / name / "model.safetensors") for name in ("replayed", "run"))
    assert replayed.keys() == run.keys()
    assert all(torch.equal(replayed[k], run[k]) for k in run)


@pytest.mark.parametrize(
    "flags",
    [
        ["--kv-ratio", "0.25"],
        ["--kv-ratio", "0.5", "--logit-scale", "1.1"],
        ["--kv-ratio", "0.5", "--share-q-dim", "8"],
    ],
)
def test_nothing_is_replayed_where_the_written_attention_is_not_the_refits(tiny, tmp_path, monkeypatch, flags):
    """A logit factor (MFA-KR's default below half the cache, or set) or queries written as a product of two factors
    make the written attention differ from the one the refit ran: no refit keeps its inputs for a replay, from
    statistics or from samples."""
    kept = []
    real_refit = recipe_module.refit_output

    def recording(*args):
        result = real_refit(*args)
        kept.append(result[1])
        return result

    monkeypatch.setattr(recipe_module, "refit_output", recording)
    src = str(tiny("llama-gqa"))
    assert main(["convert", src, str(tmp_path / "stats"), "--variant", "mfa-kr", *flags, *CALIB]) == 0
    real_memory = recipe_module.refit_memory
    monkeypatch.setattr(recipe_module, "refit_memory", lambda *a: {**real_memory(*a), "statistics": 10**15})
    assert main(["convert", src, str(tmp_path / "samples"), "--variant", "mfa-kr", *flags, *CALIB]) == 0
    assert len(kept) == 4 and all(inputs is None for inputs in kept)


def test_a_token_weighs_in_the_second_moment_as_often_as_it_is_repeated():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen)
    counts = torch.tensor([[1, 3, 0, 2, 1], [4, 1, 1, 0, 2]])
    repeated = torch.cat([x[b, t].expand(int(counts[b, t]), 3) for b in range(2) for t in range(5)])
    weighted = calibration.second_moment([x], [counts.to(torch.float64)])
    assert torch.allclose(weighted, calibration.second_moment([repeated[None]]), atol=1e-12)


def test_attention_weights_mix_uniform_and_received_attention():
    mass = [torch.tensor([[3.0, 1.0, 0.0, 0.0]]), torch.tensor([[2.0, 1.0, 1.0, 0.0]])]  # mean 1
    uniform, received = calibration.attention_weights(mass, 0.0), calibration.attention_weights(mass, 1.0)
    assert all(torch.equal(w, torch.ones_like(m)) for w, m in zip(uniform, mass, strict=True))
    assert all(torch.equal(w, m) for w, m in zip(received, mass, strict=True))
    half = calibration.attention_weights(mass, 0.5)
    assert torch.equal(half[0], torch.tensor([[2.0, 1.0, 0.5, 0.5]]))
    assert sum(float(w.sum()) for w in half) == 8.0


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["attention_weight", "stream_correction"])
def test_shares_outside_zero_one_are_refused(name, weight):
    with pytest.raises(OptionsError, match=name):
        ConversionMethod(**{name: weight})


def stream_after_attention(path, layer: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """The residual stream after decoder layer `layer`'s attention (its input plus its attention's output) of the
    model at `path` on token batches, stacked."""
    model = load(path)
    block = model.model.layers[layer]
    inputs, outputs = [], []
    hooks = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append(kwargs.get("hidden_states", args and args[0])), with_kwargs=True
        ),
        block.self_attn.register_forward_hook(lambda _m, _args, out: outputs.append(out[0])),
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return torch.cat([x + y for x, y in zip(inputs, outputs, strict=True)])


def test_the_stream_correction_puts_the_stream_back_towards_the_source(tiny, tmp_path, monkeypatch):
    """With the stream correction, the second layer is refit to put the stream after its attention back on the
    source's: on the calibration text the stream there is closer to the source's than without it (the refit is
    least squares over the same features, and the correction makes the stream's error its objective). The first
    layer, which no converted layer precedes, is the same bytes either way."""
    seen = []
    real_batches = recipe_module.calibration_batches
    monkeypatch.setattr(recipe_module, "calibration_batches", lambda *a: seen.append(real_batches(*a)) or seen[-1])
    src = tiny("llama-gqa")
    outs = {
        share: convert_cli(src, tmp_path / share, "mfa-kr", "--kv-ratio", "0.5", extra=("--stream-correction", share))
        for share in ("0", "1")
    }
    batches = seen[0][0]
    assert all(torch.equal(a, b) for a, b in zip(batches, seen[1][0], strict=True))
    source = stream_after_attention(src, 1, batches)
    errors = {share: (stream_after_attention(out, 1, batches) - source).pow(2).sum() for share, out in outs.items()}
    assert errors["1"] < errors["0"], errors
    first = [
        {k: v for k, v in load_file(out / "model.safetensors").items() if ".layers.0." in k} for out in outs.values()
    ]
    assert first[0].keys() == first[1].keys() and all(torch.equal(first[0][k], first[1][k]) for k in first[0])


def shard_bytes(src, tmp_path, ratio: str, runs: dict[str, tuple[str, ...]]) -> dict[str, bytes]:
    """The single shard of an MFA-KR conversion of `src` at `ratio`, one for each named set of extra flags."""
    files = {}
    for name, extra in runs.items():
        out = convert_cli(src, tmp_path / name, "mfa-kr", "--kv-ratio", ratio, extra=extra)
        files[name] = (out / "model.safetensors").read_bytes()
    return files


def test_stream_correction_follows_the_variant_and_budget():
    default = ConversionMethod()
    assert default.stream_correction_at(0.25, "mfa-kr") == plan_module.STREAM_CORRECTION
    assert default.stream_correction_at(0.125, "mfa-kr") == 0.0
    assert default.stream_correction_at(0.5, "mfa") == 0.0
    assert ConversionMethod(stream_correction=0.3).stream_correction_at(0.125, "mfa") == 0.3


def test_no_stream_correction_at_an_eighth_by_default(tiny, tmp_path):
    """At an eighth of the cache the default fits MFA-KR layers (tuned there) to the source attention's outputs:
    the same bytes as --stream-correction 0, and not those of --stream-correction 0.5, which applies to tuned layers
    too (the refit and the steps then share one target)."""
    runs = {"default": (), "0": ("--stream-correction", "0"), "0.5": ("--stream-correction", "0.5")}
    runs = {name: ("--tune-steps", "5", *extra) for name, extra in runs.items()}
    files = shard_bytes(tiny("llama-gqa"), tmp_path, "0.125", runs)
    assert files["default"] == files["0"] != files["0.5"]


def test_families_that_norm_the_attention_output_are_fitted_to_the_source_outputs(family, tmp_path, capsys):
    """Gemma-3 norms its attention's output before adding it to the stream: the stream correction is not applied
    (the same bytes as --stream-correction 0), and a note says so once."""
    runs = {share: ("--stream-correction", share) for share in ("0", "1")}
    files = shard_bytes(family("gemma3_text"), tmp_path, "0.25", runs)
    assert files["0"] == files["1"]
    assert capsys.readouterr().err.count("--stream-correction is not applied") == 1


def test_attention_weights_over_their_memory_are_uniform(tiny, tmp_path, capsys, monkeypatch):
    """Where one batch's attention probabilities would exceed ATTENTION_MASS_BYTES, every token weighs alike, with a
    note: the output is then the same bytes as --attention-weight 0, and unlike the weighted one."""
    src = str(tiny("llama-gqa"))
    common = ["--variant", "mfa-kr", "--kv-ratio", "0.25", *CALIB]
    assert main(["convert", src, str(tmp_path / "weighted"), *common]) == 0
    assert main(["convert", src, str(tmp_path / "uniform"), *common, "--attention-weight", "0"]) == 0
    monkeypatch.setattr(recipe_module, "ATTENTION_MASS_BYTES", 1)
    assert main(["convert", src, str(tmp_path / "limited"), *common]) == 0
    assert "weigh every token alike" in capsys.readouterr().err
    shard = "model.safetensors"
    uniform = (tmp_path / "uniform" / shard).read_bytes()
    assert (tmp_path / "limited" / shard).read_bytes() == uniform
    assert (tmp_path / "weighted" / shard).read_bytes() != uniform


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_tuning_brings_the_conversion_closer_to_its_source(trained_tiny, tokenizer, tmp_path, variant):
    """Per-layer output reconstruction (--tune-steps) after the closed form: a smaller KL to the source on text
    outside the calibration (measured with steps of one sequence: 15% smaller for MFA, 16% for MFA-KR), and the
    steps are recorded."""
    ids = sample_ids(tokenizer, n=128, batch=4)
    errors = {}
    for steps in ("0", "60"):
        out = convert_cli(trained_tiny, tmp_path / steps, variant, "--kv-ratio", "0.25", extra=("--tune-steps", steps))
        errors[steps] = kl_to_source(out, trained_tiny, ids)
        assert json.loads((out / "config.json").read_text())["conversion"]["method"]["tune_steps"] == int(steps)
    assert errors["60"] < 0.9 * errors["0"], errors


def test_the_attention_tuned_is_the_one_written(tiny, tmp_path, monkeypatch):
    """Tuning starts after the logit factor: the query rows the steps see are the written ones (no factor applied
    after them), in the streams' dtype whatever the conversion computes in."""
    seen = {}

    def no_steps(module, x, target, layer_args, steps, lr):
        seen.setdefault("q", module.q_proj.weight.detach().clone())
        seen.setdefault("dtypes", {t.dtype for t in x + target})
        return []

    monkeypatch.setattr(recipe_module, "reconstruct", no_steps)
    flags = ("--logit-scale", "1.5", "--tune-steps", "5", "--dtype", "bfloat16")
    out = convert_cli(tiny("llama-gqa"), tmp_path / "out", "mfa-kr", "--kv-ratio", "0.25", extra=flags)
    written = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(written, seen["q"].to(written.dtype))
    assert seen["dtypes"] == {torch.bfloat16}


def test_tuning_leaves_an_exact_conversion_as_it_is(tiny, tmp_path):
    files = shard_bytes(tiny("llama-gqa"), tmp_path, "1", {steps: ("--tune-steps", steps) for steps in ("0", "5")})
    assert files["0"] == files["5"]


def test_exact_qk_norm_layers_say_they_are_not_tuned(family, tmp_path, capsys):
    """Qwen3's exact layer keeps the source's projections and norms before its latent maps, which the steps do not
    train: an eighth of the cache (tuned by default elsewhere) converts with the closed form and says so once."""
    convert_cli(family("qwen3"), tmp_path / "out", "mfa-kr", "--kv-ratio", "0.125")
    assert (
        capsys.readouterr().err.count("the exact QK-norm layers are not tuned (--tune-steps): only the closed form")
        == 1
    )
