"""Budget allocation across layers by measured sensitivity (docs/method.md, "Budget allocation across layers").

The swap probe: convert uniformly at the budget's latent width C and at C/2 and 2C, then measure the language-model
loss on probe text when one layer of the C conversion is taken from the narrower or from the wider one, layer by
layer. The allocation: each layer's width among the three, so that the summed loss changes are least at no more
cache than C in every layer (an exact knapsack). Layer 0 keeps C: moving width into or out of it lost in every
screen. The result is a `kv_dim` per layer for `convert`.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mfakit.convert.plan import BudgetError, ConvertOptions, plan_conversion, plan_widths
from mfakit.convert.recipe import convert
from mfakit.errors import OptionsError
from mfakit.loading import load_model, load_tokenizer
from mfakit.model.modeling_mfa import MFAConfig
from mfakit.scoring import stream_nll
from mfakit.texts import DEFAULT_CALIBRATION, mixed_windows, parse_text_spec

logger = logging.getLogger(__name__)
# Probe text unless told otherwise: 12 windows of 512 tokens of the built-in corpora's training part, which shares no
# document with their calibration part (the probe of the measurements in docs/method.md).
PROBE_WINDOWS = 12
PROBE_SEQ_LEN = 512
PROBE_BATCH = 4
# Calibration tokens of the probe's three conversions at most (fewer if the options ask for fewer): chosen on the
# development domains, where SmolLM2's allocation at an eighth of the cache from conversions calibrated on 16,384
# tokens scored 6.209x against 6.199x from the default 65,536 (four of 30 layers chosen otherwise), at a quarter
# of the conversions' time.
PROBE_CALIBRATION_TOKENS = 16384
# Layers that keep the uniform width.
HELD_LAYERS = (0,)
# The largest share of the source's cache at which allocation gained on every development domain (SmolLM2: an
# eighth 12%; a quarter 1.1% with two domains worse; half 4.4% worse on every domain); above it `allocate` warns.
GAINS_UP_TO_SHARE = 0.125


@dataclass
class SwapProbe:
    """What the probe measured: the latent widths (narrow, uniform, wide), the uniform conversion's mean loss in nats
    per token on the probe text, and per layer the loss change when that layer alone is the narrow or the wide
    conversion's."""

    widths: tuple[int, int, int]
    loss: float
    narrow: list[float]
    wide: list[float]


@dataclass
class Allocation:
    """A per-layer `kv_dim` (`kv_dim`), the probe it was chosen from, and the loss change the probe predicts for it
    (the sum of its layers' changes; what carried over to unseen text was 3-5 times smaller at a quarter of the
    cache, docs/method.md)."""

    kv_dim: list[int]
    probe: SwapProbe
    predicted: float

    def lines(self) -> list[str]:
        narrow, uniform, wide = self.probe.widths
        moved = sum(w != uniform for w in self.kv_dim)
        return [
            f"swap probe: uniform kv_dim {uniform}, loss {self.probe.loss:.4f} nats per token; {moved} of "
            f"{len(self.kv_dim)} layers moved to {narrow} or {wide}, predicted change {self.predicted:+.4f}",
            f"kv_dim {','.join(map(str, self.kv_dim))}",
        ]


def knapsack_widths(
    narrow: list[float], wide: list[float], widths: tuple[int, int, int], held: tuple[int, ...] = HELD_LAYERS
) -> tuple[list[int], float]:
    """Each layer's width among widths = (n, c, w), n < c < w, minimising the summed loss change (narrow[l] if
    layer l is n, wide[l] if w, 0 if c) subject to sum of widths <= L * c, the layers in `held` at c; returns the
    widths and their summed change. Exact: dynamic programming over the total width in units of gcd(n, c, w),
    O(L^2 w / gcd) work; ties are broken deterministically."""
    n_width, c_width, w_width = widths
    if not 0 < n_width < c_width < w_width or len(narrow) != len(wide):
        raise ValueError("widths must be increasing and positive, and narrow and wide one change per layer each")
    unit = math.gcd(n_width, c_width, w_width)
    units = {n_width: n_width // unit, c_width: c_width // unit, w_width: w_width // unit}
    budget = len(narrow) * units[c_width]
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for layer, changes in enumerate(zip(narrow, wide, strict=True)):
        options = [(c_width, 0.0)]
        if layer not in held:
            options += [(n_width, changes[0]), (w_width, changes[1])]
        step: dict[int, tuple[float, list[int]]] = {}
        for total, (cost, chosen) in best.items():
            for width, change in options:
                key = total + units[width]
                if key <= budget and (key not in step or cost + change < step[key][0]):
                    step[key] = (cost + change, chosen + [width])
        best = step
    cost, chosen = min(best.values(), key=lambda entry: entry[0])
    return chosen, cost


def swap_probe(
    paths: tuple[Path, Path, Path], windows: torch.Tensor, device: str, dtype: str = "float32", progress: bool = False
) -> SwapProbe:
    """The loss changes of swapping each layer's attention of the uniform conversion (paths[1]) for the narrow
    (paths[0]) and the wide (paths[2]) conversion's, on `windows` (n, tokens), the models loaded on `device` in
    `dtype`. Holds two models and every layer's output on the windows; the layers before a swapped one replay
    their recorded outputs (`PrefixReplay`) instead of running again."""
    base = load_model(paths[1], device, dtype)
    layers = base.get_submodule(base.config.layers_path)
    name = base.config.attention_name
    replay = PrefixReplay(layers)
    with replay.recording():
        loss = mean_loss(base, windows)
    changes: dict[int, list[float]] = {}
    bar = tqdm(total=2 * len(layers), desc="swap probe", disable=not progress, unit="swap")
    for side in (0, 2):
        other = load_model(paths[side], device, dtype).get_submodule(base.config.layers_path)
        changes[side] = []
        for i, (layer, donor) in enumerate(zip(layers, other, strict=True)):
            own = getattr(layer, name)
            setattr(layer, name, getattr(donor, name))
            with replay.before(i):
                changes[side].append(mean_loss(base, windows) - loss)
            setattr(layer, name, own)
            bar.update()
        del other
    bar.close()
    widths = tuple(model_width(p) for p in paths)
    return SwapProbe(widths=widths, loss=loss, narrow=changes[0], wide=changes[2])


class ReplayedLayer(torch.nn.Module):
    """A decoder layer that returns its recorded output for each batch in turn (`outputs`, in batch order),
    carrying the plain attributes of the layer it stands for (some models' forwards read them, e.g. the
    attention type that chooses a sliding-window mask)."""

    def __init__(self, layer: torch.nn.Module, outputs: list):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and key not in vars(self):
                setattr(self, key, value)
        self.outputs = iter(outputs)

    def forward(self, *args, **kwargs):
        return next(self.outputs)


class PrefixReplay:
    """What every decoder layer of a model returns on some batches, recorded in one pass (`recording`); `before(i)`
    then puts layers 0..i-1 in replay for a pass over the same batches, so that a change in layer i costs only the
    layers from i on."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.outputs: list[list] = [[] for _ in layers]

    @contextmanager
    def recording(self) -> Iterator[None]:
        hooks = [
            layer.register_forward_hook(lambda _module, _args, out, k=k: self.outputs[k].append(out))
            for k, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def before(self, i: int) -> Iterator[None]:
        own = [self.layers[k] for k in range(i)]
        for k in range(i):
            self.layers[k] = ReplayedLayer(own[k], self.outputs[k])
        try:
            yield
        finally:
            for k in range(i):
                self.layers[k] = own[k]


def mean_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token loss in nats over every predicted token of `windows` (n, tokens): `stream_nll` over them as
    one stream in windows that do not overlap, PROBE_BATCH at a time (the same batches on every pass, which the
    replay relies on)."""
    total, count = stream_nll(model, windows.flatten(), windows.shape[1], windows.shape[1], PROBE_BATCH)
    return total / count


def model_width(path: Path) -> int:
    """The latent width of a uniform conversion."""
    return MFAConfig.from_pretrained(path).mfa_layers[-1]["kv_dim"]


def probe_widths(source: str | Path, options: ConvertOptions) -> tuple[tuple[int, int, int], int]:
    """(C/2, C, 2C) for a uniform MFA-KR budget (C/2 even, 2C at most the exact width), and the exact width; a
    one-line error for what the probe cannot allocate."""
    if options.variant != "mfa-kr":
        raise OptionsError("budget allocation is measured for mfa-kr only (the per-layer widths of MFA: --kv-dim)")
    if options.layer_kv_dims is not None and len(options.layer_kv_dims) > 1:
        raise BudgetError("budget allocation starts from one width for every layer, not a kv_dim per layer")
    plan = plan_conversion(source, options)
    c_width = plan.widths[0][0]
    kv_width = plan.shape.num_kv_heads * plan.shape.head_dim
    exact = plan_widths("mfa-kr", kv_width, kv_width, 1.0, None)[0]
    narrow, wide = 2 * (c_width // 4), min(2 * c_width, exact)
    if narrow < 2 or wide == c_width:
        raise BudgetError(f"kv_dim {c_width}: no narrower and wider even width to allocate between (exact: {exact})")
    return (narrow, c_width, wide), exact


@contextmanager
def work_folder(work: str | Path | None) -> Iterator[Path]:
    """`work` (made if missing and kept), or a temporary folder removed afterwards."""
    if work is not None:
        Path(work).mkdir(parents=True, exist_ok=True)
        yield Path(work)
        return
    folder = Path(tempfile.mkdtemp(prefix="mfakit-allocate-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def allocate(
    source: str | Path,
    options: ConvertOptions,
    work: str | Path | None = None,
    probe: tuple[str, ...] = DEFAULT_CALIBRATION,
    probe_windows: int = PROBE_WINDOWS,
    probe_seq_len: int = PROBE_SEQ_LEN,
    probe_calibration_tokens: int = PROBE_CALIBRATION_TOKENS,
) -> Allocation:
    """A per-layer kv_dim at `options`' budget (MFA-KR, one width for every layer), by the swap probe on
    `probe_windows` windows of `probe_seq_len` tokens of the `probe` texts (a built-in corpus: its training part,
    disjoint from calibration; a file is read as it is). Runs three conversions with `options`, on at most
    `probe_calibration_tokens` calibration tokens (into `work`, kept; default a temporary folder), and 2 L + 1
    passes over the probe text; convert with `kv_dim=allocation.kv_dim` afterwards."""
    sources = [parse_text_spec(spec) for spec in probe]
    seq_len = options.calibration_seq_len
    if probe_calibration_tokens < seq_len:
        raise OptionsError(
            f"probe_calibration_tokens ({probe_calibration_tokens}) must be at least one calibration window ({seq_len})"
        )
    tokens = min(options.calibration_tokens or probe_calibration_tokens, probe_calibration_tokens)
    if probe_windows < len(sources) or probe_seq_len < 2:
        raise OptionsError(
            f"the probe needs a window of at least 2 tokens from each of its {len(sources)} texts, got "
            f"{probe_windows} of {probe_seq_len}"
        )
    widths, exact = probe_widths(source, options)
    share = widths[1] / exact
    if share > GAINS_UP_TO_SHARE:
        logger.warning(
            f"allocate: kv_dim {widths[1]} caches {share:.3g} of the source's cache; allocation gained on unseen text "
            f"only up to {GAINS_UP_TO_SHARE} (at a quarter about 1%, not on every domain; at half it lost 4%)"
        )
    # The closed form only: per-layer tuning would take longer than each probe conversion itself.
    closed_form = replace(options, method=replace(options.method, tune_steps=0), overwrite=True, resume=False)
    with work_folder(work) as folder:
        paths = tuple(folder / f"kv_dim-{width}" for width in widths)
        for width, path in zip(widths, paths, strict=True):
            logger.info(f"allocate: uniform conversion at kv_dim {width} into {path}")
            convert(source, path, replace(closed_form, kv_ratio=None, kv_dim=width, calibration_tokens=tokens))
        ids, described = mixed_windows(load_tokenizer(paths[1]), sources, probe_windows, probe_seq_len, "training")
        logger.info(f"allocate: probe text {described}, {ids.numel():,} tokens")
        measured = swap_probe(paths, ids, options.device, options.dtype, options.progress)
    kv_dim, predicted = knapsack_widths(measured.narrow, measured.wide, measured.widths)
    return Allocation(kv_dim=kv_dim, probe=measured, predicted=predicted)
