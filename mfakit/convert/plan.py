"""What a conversion will do, settled before any tensor is read: the options (validated as they are made), the
method below the exact budget, the latent widths of the budget, and the plan read from the source's config and a
weightless skeleton (family layout, head shape, RoPE table)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig

from mfakit.checkpoint import CheckpointError, LazyCheckpoint, resolve_checkpoint
from mfakit.convert import factorize as fz
from mfakit.errors import OptionsError, first_line
from mfakit.families import (
    AttentionLayout,
    HeadShape,
    check_attention,
    check_shapes,
    describe,
    find_layout,
    head_shape,
    logit_softcap,
    meta_skeleton,
    rope_tables,
    with_present_norms,
)
from mfakit.loading import check_device
from mfakit.model.modeling_mfa import VARIANTS
from mfakit.texts import DEFAULT_CALIBRATION, parse_text_spec

COMPUTE_DTYPES = ("float32", "bfloat16")
# RoPE pairs turning by at most this many radians over the context become NoPE channels, unless told otherwise:
# one radian from half the cache up, one full turn below (chosen on the quality benchmark's development domains:
# with twice as many NoPE pairs in SmolLM2, 12 of 32, the ratios fell 11% at a quarter and an eighth of the cache
# and rose 3% at half).
NOPE_ANGLE = 1.0
NOPE_ANGLE_BELOW_HALF = 2 * math.pi
# Every query head's logits are multiplied by this after the output refit, below half the cache in MFA-KR, unless
# told otherwise: the least-squares keys make the converted logits vary less than the source's and every softmax
# row flatter. Chosen on the development domains at MFA-KR 0.25: 2.539x -> 2.407x, every domain better (the same
# factor before the refit, or fitted per head to the source's attention distributions, gained under 0.5%).
LOGIT_SCALE_BELOW_HALF = 1.15
# Adam steps of per-layer output reconstruction after the closed form in MFA-KR layers that cache at most
# TUNE_UP_TO_SHARE of the source's, unless told otherwise. Chosen on the development domains (docs/method.md,
# "Per-layer output reconstruction"): at an eighth of the cache 200 steps of one calibration sequence each gained 16%
# on every domain (100 steps of two: 15%; of one: 11%); at a quarter 200 steps of two lost 1% (the built-in split,
# the calibration corpora's own domain, gained 6%).
TUNE_STEPS = 200
TUNE_UP_TO_SHARE = 0.125
# Share of the cache given to RoPE'd key channels unless told otherwise. MFA-KR: 0.7 of C (the rest value-only
# NoPE channels), chosen on the development domains, where it beat 0.8 at half, a quarter and an eighth of the
# cache (1.315x -> 1.258x, 2.401x -> 2.341x, 7.241x -> 7.048x; ten of the twelve domain-budget pairs better) and
# beat 0.6 and 0.9 at a quarter. MFA: half of C + v_dim, as many key as value numbers.
KEY_FRACTION = {"mfa": 0.5, "mfa-kr": 0.7}
# Share of each token's weight in the key and value second moments that follows the attention it receives in the
# source (`attention_weights`; the rest counts every token alike). Chosen on the development domains: at MFA-KR 0.25
# 0.5 and 1 both beat uniform weights on every domain (2.341x -> 2.261x and 2.268x), 0.5 gained 0.5% at half the
# cache and lost 0.3% at an eighth; MFA gained 1.4% and 3.3% at half and a quarter. The first token of a window
# receives 30-65% of the attention in SmolLM2's later layers and is 1 of 512 calibration tokens.
ATTENTION_WEIGHT = 0.5
# Share of the residual stream's drift added to the attention's targets in MFA-KR layers that cache more than
# STREAM_CORRECTION_ABOVE_SHARE of the source's, unless told otherwise: the refit fits the converted attention to
# y + s (x - x'), the source attention's output y plus s times the difference between the hidden states entering the
# layer in the source (x) and in the converted model (x'), so that the stream after the attention moves back towards
# the source's instead of the layer only adding the source's increment. Chosen on the development domains
# (docs/method.md, "Putting the stream back"): 1.252x -> 1.220x at half the cache and 2.261x -> 2.099x at a quarter
# with 0.5 (2.128x with 1). At an eighth it was unstable, tuned or not (0.5: 10.248x and 10.388x against 5.923x and
# 7.071x without), so none there; MFA was not measured.
STREAM_CORRECTION = 0.5
STREAM_CORRECTION_ABOVE_SHARE = 0.125
# The eager attention probabilities of one calibration batch that reading the attention weights may hold (batch x
# heads x tokens^2 x 4 bytes); a layer whose batches would need more is weighted uniformly, and says so.
ATTENTION_MASS_BYTES = 2**32
# Calibration tokens unless told otherwise: 65,536 (chosen on the quality benchmark's development domains, where
# 4x the tokens of the earlier 16,384 gave 14% lower perplexity ratios at a quarter of the cache; SmolLM2 then
# converts in 4.5-6.5 minutes on 2 cores, 9 at MFA-KR 0.5), fewer for models so wide that one stream of float32
# calibration hidden states would exceed CALIBRATION_STREAM_BYTES.
DEFAULT_CALIBRATION_TOKENS = 65536
CALIBRATION_STREAM_BYTES = 2**29


class BudgetError(OptionsError):
    """A KV budget that the source cannot be converted to."""


@dataclass(frozen=True)
class ConversionMethod:
    """How a layer is factorized below the exact budget (the exact embedding needs none of this).

    sequential: gather layer l's statistics on the inputs that the already converted layers 0..l-1 produce, so
        their errors are seen and compensated rather than compounded.
    refit: least-squares refit of the output projection against the source layer's attention output.
    key_fraction: share of the cache given to key channels (MFA-KR: of C; MFA: of C + v_dim); None: KEY_FRACTION
        of the variant (0.7 for MFA-KR, 0.5 for MFA).
    nope_angle: RoPE pairs that turn by at most this many radians over `nope_context` tokens (default: the model's
        max_position_embeddings) become NoPE channels; 0 keeps every frequency; None: `nope_angle_at`'s default
        (1 radian from half the cache up, one full turn below).
    logit_scale: every query head's logits times this factor once the layer is fitted (the later layers are
        calibrated on its output); None: `logit_scale_at`'s default (MFA-KR below half the cache 1.15, else 1).
    tune_steps, tune_lr: Adam steps (and peak learning rate) of per-layer output reconstruction after the closed
        form and the logit factor (`mfakit.convert.tune`); 0: none; None: `tune_steps_at`'s default (MFA-KR at
        most an eighth of the cache TUNE_STEPS, else none).
    attention_weight: share of each token's weight in the key and value statistics that follows the attention it
        receives in the source layer (the rest counts every token alike; the query statistics stay uniform); 0:
        uniform, as before.
    stream_correction: share s of the residual stream's drift in the attention's targets (`correct_targets_`):
        the refit and the steps fit y + s (x - x') rather than the source attention's output y; 0: y, as before;
        None: `stream_correction_at`'s default (MFA-KR above an eighth of the cache STREAM_CORRECTION, else none).
        Only where calibration is sequential (x' is the converted stream) and the family adds the
        attention's output to the stream as it is (`adds_attention_output`).
    """

    sequential: bool = True
    refit: bool = True
    key_fraction: float | None = None
    nope_angle: float | None = None
    nope_context: int | None = None
    logit_scale: float | None = None
    tune_steps: int | None = None
    tune_lr: float = 1e-3
    attention_weight: float = ATTENTION_WEIGHT
    stream_correction: float | None = None

    def __post_init__(self) -> None:
        if self.key_fraction is not None and not 0 < self.key_fraction <= 1:
            raise OptionsError(f"key_fraction must be in (0, 1], got {self.key_fraction}")
        if self.nope_angle is not None and not (math.isfinite(self.nope_angle) and self.nope_angle >= 0):
            raise OptionsError(f"nope_angle must be a finite number >= 0, got {self.nope_angle}")
        if self.nope_context is not None and self.nope_context < 1:
            raise OptionsError(f"nope_context must be a positive number of tokens, got {self.nope_context}")
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise OptionsError(f"logit_scale must be a positive number, got {self.logit_scale}")
        if not 0 <= self.attention_weight <= 1:
            raise OptionsError(f"attention_weight must be in [0, 1], got {self.attention_weight}")
        if self.stream_correction is not None and not 0 <= self.stream_correction <= 1:
            raise OptionsError(f"stream_correction must be in [0, 1], got {self.stream_correction}")
        if (self.tune_steps is not None and self.tune_steps < 0) or not self.tune_lr > 0:
            raise OptionsError(f"tune_steps must be >= 0 and tune_lr positive, got {self.tune_steps}, {self.tune_lr}")

    def nope_angle_at(self, cache_share: float) -> float:
        """The NoPE angle of a layer whose converted cache is `cache_share` of the source's: as set, else
        NOPE_ANGLE from half the cache up and NOPE_ANGLE_BELOW_HALF below."""
        if self.nope_angle is not None:
            return self.nope_angle
        return NOPE_ANGLE if cache_share >= 0.5 else NOPE_ANGLE_BELOW_HALF

    def logit_scale_at(self, cache_share: float, variant: str) -> float:
        """The logit factor of a layer whose converted cache is `cache_share` of the source's: as set, else
        LOGIT_SCALE_BELOW_HALF for MFA-KR below half the cache and 1 otherwise (not measured for MFA)."""
        if self.logit_scale is not None:
            return self.logit_scale
        return LOGIT_SCALE_BELOW_HALF if variant == "mfa-kr" and cache_share < 0.5 else 1.0

    def tune_steps_at(self, cache_share: float, variant: str) -> int:
        """The reconstruction steps of a layer whose converted cache is `cache_share` of the source's: as set, else
        TUNE_STEPS for MFA-KR up to TUNE_UP_TO_SHARE and none otherwise (not measured for MFA)."""
        if self.tune_steps is not None:
            return self.tune_steps
        return TUNE_STEPS if variant == "mfa-kr" and cache_share <= TUNE_UP_TO_SHARE else 0

    def stream_correction_at(self, cache_share: float, variant: str) -> float:
        """The stream correction of a layer whose converted cache is `cache_share` of the source's: as set, else
        STREAM_CORRECTION for MFA-KR above STREAM_CORRECTION_ABOVE_SHARE and none otherwise (not measured for
        MFA)."""
        if self.stream_correction is not None:
            return self.stream_correction
        above = variant == "mfa-kr" and cache_share > STREAM_CORRECTION_ABOVE_SHARE
        return STREAM_CORRECTION if above else 0.0

    def key_share(self, variant: str) -> float:
        return self.key_fraction if self.key_fraction is not None else KEY_FRACTION[variant]


PLAIN_METHOD = ConversionMethod(
    sequential=False,
    refit=False,
    key_fraction=0.5,
    nope_angle=0.0,
    logit_scale=1.0,
    tune_steps=0,
    attention_weight=0.0,
    stream_correction=0.0,
)  # the first method


def calibration_token_count(requested: int | None, hidden: int, seq_len: int) -> int:
    """The calibration tokens a conversion reads: `requested`, else DEFAULT_CALIBRATION_TOKENS in whole windows of
    seq_len, capped so that one stream of float32 hidden states (tokens x hidden x 4 bytes) stays within
    CALIBRATION_STREAM_BYTES (65,536 tokens up to hidden 2048, 32,768 at 4096, 16,384 at 8192), and never below one
    window."""
    if requested is not None:
        return requested
    fits = min(DEFAULT_CALIBRATION_TOKENS, CALIBRATION_STREAM_BYTES // (4 * hidden))
    return max(seq_len, fits // seq_len * seq_len)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert` takes besides the source and output folders; checked when made, before any download.

    variant: "mfa" or "mfa-kr". kv_ratio (KV cache relative to the source's, 1.0: exact) or kv_dim (the latent
    width C: one for every layer, or a sequence of one per layer, e.g. from `mfakit.convert.allocate`): exactly
    one. share_q_dim: rank of a shared query down-projection (None: unfactored). calibration:
    one or more text specs (see `mfakit.texts`; several are mixed in equal shares), read for calibration_tokens
    tokens (None: `calibration_token_count`'s default) in windows of calibration_seq_len.
    device, dtype: where the calibration forward passes and the factorization math run, and the forward passes'
    precision (the math is float64; converted tensors keep the source's dtype). approximate_qk_norm: for QK-norm
    families, fold the norms into the projections (the plain MFA layout, never exact) instead of the exact layer that
    reads the normalised keys. max_shard_mb: output shard size. refit_memory_gb: memory (on `device`) for the output
    refit (statistics, else samples, else skipped). overwrite: replace an existing output folder. resume: continue a
    killed run into the same output. progress: a progress bar.
    """

    variant: str = "mfa-kr"
    kv_ratio: float | None = None
    kv_dim: int | tuple[int, ...] | None = None
    share_q_dim: int | None = None
    method: ConversionMethod = field(default_factory=ConversionMethod)
    calibration: tuple[str, ...] = DEFAULT_CALIBRATION
    calibration_tokens: int | None = None
    calibration_seq_len: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    approximate_qk_norm: bool = False
    max_shard_mb: float = 2048
    refit_memory_gb: float = 4.0
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.kv_dim is not None and not isinstance(self.kv_dim, int):
            if isinstance(self.kv_dim, str | bytes):
                raise BudgetError(f"kv_dim must be an integer or a sequence of integers, got {self.kv_dim!r}")
            object.__setattr__(self, "kv_dim", tuple(self.kv_dim))
            if not self.kv_dim:
                raise BudgetError("kv_dim: give at least one width")
        if isinstance(self.calibration, str):
            object.__setattr__(self, "calibration", (self.calibration,))
        object.__setattr__(self, "calibration", tuple(self.calibration))
        if not self.calibration:
            raise OptionsError("give at least one calibration text")
        if self.variant not in VARIANTS:
            raise OptionsError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if (self.kv_ratio is None) == (self.kv_dim is None):
            raise BudgetError("give exactly one of kv_ratio and kv_dim")
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise BudgetError(f"kv_ratio must be in (0, 1], got {self.kv_ratio} (1.0 is the exact conversion)")
        for width in self.layer_kv_dims or ():
            check_kv_dim(width)
        if self.share_q_dim is not None and self.share_q_dim < 1:
            raise OptionsError(f"share_q_dim must be positive, got {self.share_q_dim}")
        if self.calibration_seq_len < 1 or (
            self.calibration_tokens is not None and self.calibration_tokens < self.calibration_seq_len
        ):
            raise OptionsError(
                f"calibration_tokens ({self.calibration_tokens}) must be at least one window of "
                f"calibration_seq_len ({self.calibration_seq_len}), which must be positive"
            )
        check_device(self.device)
        if self.dtype not in COMPUTE_DTYPES:
            raise OptionsError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if not self.max_shard_mb > 0:
            raise OptionsError(f"the shard size must be positive, got {self.max_shard_mb} MiB")
        if not self.refit_memory_gb > 0:
            raise OptionsError(f"refit_memory_gb must be positive, got {self.refit_memory_gb}")
        for spec in self.calibration:
            parse_text_spec(spec)

    @property
    def max_shard_bytes(self) -> int:
        return int(self.max_shard_mb * 1024**2)

    @property
    def layer_kv_dims(self) -> tuple[int, ...] | None:
        """The kv_dim widths as given, one or one per layer (None: the budget is a kv_ratio)."""
        if self.kv_dim is None:
            return None
        return (self.kv_dim,) if isinstance(self.kv_dim, int) else self.kv_dim


def check_kv_dim(kv_dim: object) -> None:
    """Refuse a latent width that is not an even integer >= 2 (one RoPE channel pair)."""
    if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim < 2 or kv_dim % 2:
        raise BudgetError(f"kv_dim must be an even number >= 2 (one RoPE channel pair), got {kv_dim!r}")


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def plan_widths(
    variant: str,
    key_width: int,
    value_width: int,
    kv_ratio: float | None,
    kv_dim: int | None,
    key_fraction: float = 0.5,
) -> tuple[int, int]:
    """(kv_dim, v_dim) of every layer for a budget.

    The source caches key_width + value_width (g*d_h + g*d_v) numbers per token per layer. MFA caches kv_dim + v_dim
    and is exact at kv_dim = g*d_h, v_dim = g*d_v; MFA-KR caches kv_dim and is exact at kv_dim = g*(d_h + d_v).
    `kv_ratio` is the cache relative to the source's (MFA splits it key_fraction : 1 - key_fraction between keys
    and values); `kv_dim` is C itself (MFA: both widths).
    """
    if (kv_ratio is None) == (kv_dim is None):
        raise BudgetError("give exactly one of kv_ratio and kv_dim")
    source = key_width + value_width
    exact = key_width if variant == "mfa" else source
    if kv_ratio is not None:
        if not 0 < kv_ratio <= 1:
            raise BudgetError(f"kv_ratio must be in (0, 1], got {kv_ratio} (1.0 is the exact conversion)")
        if kv_ratio == 1:
            return (key_width, value_width) if variant == "mfa" else (exact, 0)
        total = kv_ratio * source
        keys = total if variant == "mfa-kr" else key_fraction * total
        if round(keys / 2) < 1 or (variant == "mfa" and round(total) - min(_even(keys), key_width) < 1):
            raise BudgetError(
                f"kv_ratio {kv_ratio} leaves {total:.2f} cached numbers per token and layer: below one RoPE channel "
                "pair of keys (and, for MFA, one value channel)"
            )
        if variant == "mfa-kr":
            return _even(total), 0
        C = min(_even(keys), key_width)
        return C, min(value_width, round(total) - C)
    check_kv_dim(kv_dim)
    if kv_dim > exact:
        raise BudgetError(f"kv_dim {kv_dim} is above the exact budget of this model ({variant}: C = {exact})")
    if variant == "mfa":
        return kv_dim, (value_width if kv_dim == key_width else min(kv_dim, value_width))
    return kv_dim, 0


def layer_widths(options: ConvertOptions, kv_width: int, n_layers: int) -> list[tuple[int, int]]:
    """(kv_dim, v_dim) of each of n_layers layers whose keys and values are each kv_width (g*d_h) wide: the
    budget's `plan_widths` for every layer, or each layer's own when kv_dim gives one per layer."""
    key_share = options.method.key_share(options.variant)
    given = options.layer_kv_dims
    if given is None or len(given) == 1:
        kv_dim = None if given is None else given[0]
        return [plan_widths(options.variant, kv_width, kv_width, options.kv_ratio, kv_dim, key_share)] * n_layers
    if len(given) != n_layers:
        raise BudgetError(f"kv_dim gives {len(given)} widths for a model of {n_layers} layers: give one per layer")
    return [plan_widths(options.variant, kv_width, kv_width, None, w, key_share) for w in given]


def is_exact(src: fz.SourceAttention, variant: str, kv_dim: int, v_dim: int) -> bool:
    g, dh, dv = src.num_kv_heads, src.wk.shape[1], src.wv.shape[1]
    return (kv_dim, v_dim) == (g * dh, g * dv) if variant == "mfa" else kv_dim == g * (dh + dv)


def layer_cache_share(src: fz.SourceAttention, variant: str, kv_dim: int, v_dim: int) -> float:
    """A converted layer's cached numbers per token (C, plus v_dim for MFA) over its source's (g (d_k + d_v))."""
    return (kv_dim + (v_dim if variant == "mfa" else 0)) / (src.num_kv_heads * (src.wk.shape[1] + src.wv.shape[1]))


def convert_layer(
    src: fz.SourceAttention,
    sigma: torch.Tensor,
    variant: str,
    kv_dim: int,
    v_dim: int,
    method: ConversionMethod,
    context: int,
    kv_sigma: torch.Tensor | None = None,
) -> fz.MFALayer:
    """One layer at a budget: the exact embedding at full width, the calibrated factorization below it."""
    if is_exact(src, variant, kv_dim, v_dim):
        return fz.exact_mfa(src) if variant == "mfa" else fz.exact_mfa_kr(src)
    angle = method.nope_angle_at(layer_cache_share(src, variant, kv_dim, v_dim))
    if angle > 0:
        src = fz.nope_low_frequencies(src, angle, context)
    if variant == "mfa":
        return fz.compress_mfa(src, sigma, kv_dim, v_dim, kv_sigma)
    key_channels = min(src.wk.shape[0] * src.wk.shape[1], _even(method.key_share(variant) * kv_dim), kv_dim)
    return fz.compress_mfa_kr(src, sigma, kv_dim, key_channels, kv_sigma)


@dataclass
class ConversionPlan:
    """The source as the conversion sees it before reading any tensor: its folder, config and family layout, a
    weightless skeleton of the model, the lazily read checkpoint, and the widths every layer converts to."""

    folder: Path
    config: AutoConfig
    layout: AttentionLayout
    skeleton: nn.Module
    ckpt: LazyCheckpoint
    shape: HeadShape
    rope: list[tuple[torch.Tensor, float]]  # per layer: RoPE frequencies (P,) and cos/sin scaling
    widths: list[tuple[int, int]]  # per layer: (kv_dim, v_dim)
    softcap: float | None
    nope_context: int
    approximate_qk_norm: bool

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def qk_norm(self) -> str | None:
        """How QK-norm layers are read: "exact" (through the normalised projections), "fold" (approximated), None."""
        if not self.layout.qk_norm:
            return None
        return "fold" if self.approximate_qk_norm else "exact"

    def describe(self, variant: str) -> list[str]:
        """What was detected and what will be done, one line each."""
        kv_dims = [w[0] for w in self.widths]
        if len(set(self.widths)) == 1:
            kv_dim, v_dim = self.widths[0]
            widths = f"kv_dim {kv_dim}" + (f", v_dim {v_dim}" if variant == "mfa" else "")
        else:
            widths = f"kv_dim {min(kv_dims)}..{max(kv_dims)} per layer ({sum(kv_dims)} in all)"
            if variant == "mfa":
                widths += f", v_dim {sum(w[1] for w in self.widths)} in all"
        return [
            describe(self.layout, self.config, self.shape, self.rope, self.approximate_qk_norm),
            f"plan: {self.n_layers} layers to {variant}, {widths}",
        ]


def read_config(folder: Path):
    """The source's config (a one-line error for a config.json that transformers cannot read); never runs code
    from the folder."""
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: {first_line(err)}") from err


def plan_conversion(source: str | Path, options: ConvertOptions) -> ConversionPlan:
    """Resolve the source, recognise its family, check that every attention tensor is there and settle the widths;
    reads configs and tensor names only."""
    folder = resolve_checkpoint(source)
    config = read_config(folder)
    layout = find_layout(config)
    ckpt = LazyCheckpoint(folder)
    skeleton = meta_skeleton(config)
    base = skeleton.base_model_prefix
    ckpt.add_base_prefix(base, tuple(f"{name}." for name, _ in skeleton.named_children() if name != base))
    layout = with_present_norms(layout, skeleton.get_submodule(layout.attention_prefix(0)))
    check_shapes(skeleton, ckpt)
    check_attention(layout, skeleton, ckpt, config.num_hidden_layers)
    shape = head_shape(layout, skeleton.get_submodule(layout.attention_prefix(0)), config)
    kv_width = shape.num_kv_heads * shape.head_dim
    widths = layer_widths(options, kv_width, config.num_hidden_layers)
    d1 = config.hidden_size + 1
    if options.share_q_dim is not None and layout.qk_norm and not options.approximate_qk_norm:
        raise OptionsError(
            f"{config.model_type} normalises its queries (QK-norm): the exact conversion has no shared query "
            "projection; drop --share-q-dim, or add --approximate-qk-norm"
        )
    if options.share_q_dim is not None and options.share_q_dim > d1:
        raise BudgetError(
            f"share_q_dim {options.share_q_dim} is above the query's rank (hidden size + 1 = {d1}): nothing to share"
        )
    return ConversionPlan(
        folder=folder,
        config=config,
        layout=layout,
        skeleton=skeleton,
        ckpt=ckpt,
        shape=shape,
        rope=rope_tables(layout, config, skeleton),
        widths=widths,
        softcap=logit_softcap(layout, config),
        nope_context=options.method.nope_context or config.max_position_embeddings,
        approximate_qk_norm=options.approximate_qk_norm,
    )
