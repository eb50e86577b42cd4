"""A latent width per layer: converting to given per-layer widths (the cache they promise, the same bytes as the
uniform width when they are all one, a killed run resumed), and choosing them by the swap probe (the exact
knapsack, a probe that measures nothing when nothing changes, the allocation end to end)."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mfakit.cli import main
from mfakit.convert import ConvertOptions, convert
from mfakit.convert import recipe as recipe_module
from mfakit.convert.allocate import allocate, knapsack_widths, mean_loss, swap_probe
from mfakit.errors import MfakitError
from mfakit.eval.kv import measure_kv
from mfakit.loading import load_model
from mfakit.model.modeling_mfa import MFAConfig
from mfakit.outputs import partial_folder
from tests.conftest import QUICK_CALIB, build_tiny, one_error_line

OPTIONS = ConvertOptions(variant="mfa-kr", kv_dim=16, calibration_tokens=512, calibration_seq_len=128, progress=False)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama GQA model of 4 layers (2 KV heads of 16: MFA-KR is exact at kv_dim 64)."""
    return build_tiny("llama-gqa", tmp_path_factory.mktemp("src") / "src", tokenizer, seed=3, num_hidden_layers=4)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize(
    "variant, widths, cached",
    [
        ("mfa-kr", (64, 8, 32, 16), (64, 8, 32, 16)),  # C; 64 is exact
        ("mfa", (32, 8, 16, 8), (64, 16, 32, 16)),  # C + v_dim, v_dim = min(C, g d_v); 32 is exact
    ],
)
def test_each_layer_converts_to_its_own_width(four_layers, tmp_path, variant, widths, cached):
    out = tmp_path / "out"
    summary = convert(four_layers, out, replace(OPTIONS, variant=variant, kv_dim=widths))
    assert summary.kv_dim == list(widths)
    config = MFAConfig.from_pretrained(out)
    assert [layer["kv_dim"] for layer in config.mfa_layers] == list(widths)
    assert config.conversion["kv_dim"] == list(widths)
    model = load_model(out)
    assert measure_kv(model, context=32, batch=1) == [32 * n * 4 for n in cached]  # float32: 4 bytes a number
    assert summary.kv_bytes_per_token_after == sum(cached) * 4


def test_one_width_per_layer_is_the_uniform_width(four_layers, tmp_path):
    """The same width given once or once per layer writes the same tensors."""
    convert(four_layers, tmp_path / "once", OPTIONS)
    convert(four_layers, tmp_path / "each", replace(OPTIONS, kv_dim=(16,) * 4))
    assert shard_bytes(tmp_path / "once") == shard_bytes(tmp_path / "each")


def test_per_layer_widths_resume_to_the_same_bytes(four_layers, tmp_path, monkeypatch):
    """A run killed after two layers continues with --resume (its widths read back from the resume state as the
    same settings) to the bytes of an uninterrupted run."""
    options = replace(OPTIONS, kv_dim=(32, 16, 8, 16))
    convert(four_layers, tmp_path / "whole", options)
    real = recipe_module.convert_one_layer

    def dies_at_layer_two(plan, opts, run, i, *args):
        if i == 2:
            raise OSError(28, "No space left on device")
        return real(plan, opts, run, i, *args)

    out = tmp_path / "killed"
    monkeypatch.setattr(recipe_module, "convert_one_layer", dies_at_layer_two)
    with pytest.raises(MfakitError, match="No space left.*rerun with --resume"):
        convert(four_layers, out, options)
    monkeypatch.undo()
    assert partial_folder(out).is_dir() and not out.exists()
    with pytest.raises(MfakitError, match=r"other settings \(kv_dim\)"):
        convert(four_layers, out, replace(options, kv_dim=(32, 16, 16, 8), resume=True))
    convert(four_layers, out, replace(options, resume=True))
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_cli_takes_widths_separated_by_commas(four_layers, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(["convert", str(four_layers), str(out), "--variant", "mfa-kr", "--kv-dim", "8,16,24,64", *QUICK_CALIB])
        == 0
    )
    assert "kv_dim 8..64 per layer" in capsys.readouterr().out
    assert [layer["kv_dim"] for layer in MFAConfig.from_pretrained(out).mfa_layers] == [8, 16, 24, 64]


@pytest.mark.parametrize(
    "widths, message",
    [
        ("16,16,16", "kv_dim gives 3 widths for a model of 4 layers: give one per layer"),
        ("16,16,16,66", "kv_dim 66 is above the exact budget of this model (mfa-kr: C = 64)"),
        ("16,15,16,16", "kv_dim must be an even number >= 2 (one RoPE channel pair), got 15"),
    ],
)
def test_bad_widths_are_one_line_and_write_nothing(four_layers, tmp_path, capsys, widths, message):
    out = tmp_path / "out"
    argv = ["convert", str(four_layers), str(out), "--variant", "mfa-kr", "--kv-dim", widths, *QUICK_CALIB]
    assert message in one_error_line(capsys, argv)
    assert list(tmp_path.iterdir()) == []


def test_widths_given_as_text_are_refused():
    with pytest.raises(MfakitError, match="kv_dim must be an integer or a sequence of integers, got '96'"):
        ConvertOptions(kv_dim="96")


def test_widths_that_are_not_numbers_are_a_usage_error(four_layers, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(four_layers), str(tmp_path / "out"), "--variant", "mfa-kr", "--kv-dim", "16,x"])
    assert exit_.value.code == 2
    assert "expected an integer or integers separated by commas, got '16,x'" in capsys.readouterr().err


def brute_force(narrow: list[float], wide: list[float], widths: tuple[int, int, int]) -> float:
    """The least summed change over every assignment that keeps layer 0 at the middle width and the budget."""
    n_width, c_width, w_width = widths
    change = {n_width: narrow, c_width: [0.0] * len(narrow), w_width: wide}
    best = float("inf")
    for rest in itertools.product(widths, repeat=len(narrow) - 1):
        chosen = (c_width, *rest)
        if sum(chosen) <= c_width * len(chosen):
            best = min(best, sum(change[w][i] for i, w in enumerate(chosen)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_is_exact(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 7)
    widths = rng.choice([(24, 48, 96), (48, 96, 192), (32, 48, 64), (2, 6, 8)])
    narrow = [rng.uniform(-0.01, 0.3) for _ in range(layers)]
    wide = [rng.uniform(-0.3, 0.01) for _ in range(layers)]
    chosen, cost = knapsack_widths(narrow, wide, widths)
    assert chosen[0] == widths[1] and set(chosen) <= set(widths)
    assert sum(chosen) <= widths[1] * layers
    assert cost == pytest.approx(brute_force(narrow, wide, widths), abs=1e-12)
    change = {widths[0]: narrow, widths[1]: [0.0] * layers, widths[2]: wide}
    assert cost == pytest.approx(sum(change[w][i] for i, w in enumerate(chosen)), abs=1e-12)


def test_knapsack_keeps_the_uniform_width_when_nothing_gains():
    chosen, cost = knapsack_widths([0.1, 0.2, 0.3], [0.0, 0.0, 0.0], (24, 48, 96))
    assert chosen == [48, 48, 48] and cost == 0.0


@pytest.fixture(scope="module")
def uniform(tmp_path_factory, tokenizer):
    """uniform(kind) -> {kv_dim: folder}: a tiny 4-layer model of that kind converted at kv_dim 8, 16 and 32."""
    cache: dict[str, dict[int, Path]] = {}

    def get(kind: str) -> dict[int, Path]:
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"uniform-{kind}")
            source = build_tiny(kind, folder / "src", tokenizer, seed=3, num_hidden_layers=4)
            for width in (8, 16, 32):
                convert(source, folder / str(width), replace(OPTIONS, kv_dim=width))
            cache[kind] = {width: folder / str(width) for width in (8, 16, 32)}
        return cache[kind]

    return get


def test_the_probe_measures_nothing_when_the_layers_are_the_same(uniform):
    ids = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(0))
    probe = swap_probe((uniform("llama-gqa")[16],) * 3, ids, "cpu")
    assert probe.narrow == [0.0] * 4 and probe.wide == [0.0] * 4 and probe.widths == (16, 16, 16)


def spliced(base: Path, donor: Path, layer: int, out: Path) -> Path:
    """A copy of checkpoint `base` with layer `layer`'s attention tensors and config entry taken from `donor`."""
    shutil.copytree(base, out)
    prefix = f"model.layers.{layer}.self_attn."
    tensors = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith(prefix)}
    tensors.update((k, v) for k, v in load_file(donor / "model.safetensors").items() if k.startswith(prefix))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["mfa_layers"][layer] = json.loads((donor / "config.json").read_text())["mfa_layers"][layer]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral"])
def test_each_swap_is_the_checkpoint_with_that_layer_replaced(uniform, tmp_path, kind):
    """The probe's change for a layer is the loss of a checkpoint whose layer is the other conversion's, loaded as
    any user would, less the uniform one's (the probe replays the layers before it; Mistral's layers carry the
    sliding-window attention type that its forward reads)."""
    uniform = uniform(kind)
    ids = torch.randint(0, 384, (5, 48), generator=torch.Generator().manual_seed(1))
    probe = swap_probe((uniform[8], uniform[16], uniform[32]), ids, "cpu")
    for layer, donor, measured in ((2, 8, probe.narrow), (1, 32, probe.wide)):
        model = load_model(spliced(uniform[16], uniform[donor], layer, tmp_path / f"{layer}-{donor}"))
        assert mean_loss(model, ids) - probe.loss == pytest.approx(measured[layer], abs=1e-6)
    assert len(set(probe.narrow + probe.wide)) == 8  # every swap changes the loss, each differently


def test_allocation_end_to_end(trained_tiny, tmp_path, capsys):
    """Three uniform conversions kept in --work, widths chosen from the probe's changes by the knapsack (layer 0
    held), written as JSON and printed for --kv-dim; then a conversion to them."""
    result = tmp_path / "allocation.json"
    argv = ["allocate", str(trained_tiny), "--variant", "mfa-kr", "--kv-dim", "16", *QUICK_CALIB]
    argv += ["--work", str(tmp_path / "work"), "--probe-windows", "3", "--probe-seq-len", "64", "--out", str(result)]
    assert main([*argv, "--probe-calib-tokens", "256"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["kv_dim-16", "kv_dim-32", "kv_dim-8"]
    for uniform in (tmp_path / "work").iterdir():  # the probe's conversions calibrate on fewer tokens, untuned
        conversion = json.loads((uniform / "config.json").read_text())["conversion"]
        assert conversion["calibration_tokens"] == 256 and conversion["method"]["tune_steps"] == 0
    allocation = json.loads(result.read_text())
    probe = allocation["probe"]
    assert probe["widths"] == [8, 16, 32] and len(probe["narrow"]) == len(probe["wide"]) == 2
    widths, predicted = knapsack_widths(probe["narrow"], probe["wide"], (8, 16, 32))
    assert allocation["kv_dim"] == widths and allocation["predicted"] == predicted
    assert printed[-1] == f"kv_dim {','.join(map(str, widths))}"
    assert "caches 0.25 of the source's cache; allocation gained on unseen text only up to 0.125" in captured.err
    out = tmp_path / "allocated"
    argv = ["convert", str(trained_tiny), str(out), "--variant", "mfa-kr", "--kv-dim", ",".join(map(str, widths))]
    assert main([*argv, *QUICK_CALIB]) == 0


def test_allocation_refuses_what_it_cannot_allocate(four_layers, tmp_path):
    with pytest.raises(MfakitError, match="measured for mfa-kr only"):
        allocate(four_layers, replace(OPTIONS, variant="mfa"), tmp_path / "work")
    with pytest.raises(MfakitError, match="not a kv_dim per layer"):
        allocate(four_layers, replace(OPTIONS, kv_dim=(16, 16, 8, 8)), tmp_path / "work")
    with pytest.raises(MfakitError, match="a window of at least 2 tokens from each of its 3 texts, got 2 of 512"):
        allocate(four_layers, OPTIONS, tmp_path / "work", probe_windows=2)
    with pytest.raises(MfakitError, match=r"probe_calibration_tokens \(64\) must be at least one calibration window"):
        allocate(four_layers, OPTIONS, tmp_path / "work", probe_calibration_tokens=64)
    with pytest.raises(MfakitError, match="no narrower and wider even width"):
        allocate(four_layers, replace(OPTIONS, kv_dim=None, kv_ratio=1.0), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_allocate_checks_its_output_file_before_any_work(four_layers, tmp_path, capsys):
    argv = ["allocate", str(four_layers), "--variant", "mfa-kr", "--kv-dim", "16", "--work", str(tmp_path / "work")]
    assert "its folder does not exist" in one_error_line(capsys, [*argv, "--out", str(tmp_path / "no" / "a.json")])
    (tmp_path / "a.json").write_text("kept")
    assert "exists: pass --overwrite" in one_error_line(capsys, [*argv, "--out", str(tmp_path / "a.json")])
    assert (tmp_path / "a.json").read_text() == "kept" and not (tmp_path / "work").exists()
