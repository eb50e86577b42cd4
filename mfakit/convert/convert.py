"""`mfakit convert`: a Llama-family (or other supported) checkpoint in, an MFA / MFA-KR checkpoint out.

The work goes one decoder layer at a time: read the layer's tensors lazily, run the calibration hidden states
through it (gathering the second moment of its attention input), factorize its attention, write the converted
tensors and every other tensor of the layer unchanged, and free it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

import mfakit
from mfakit.convert import factorize as fz
from mfakit.convert.adapters import (
    AttentionLayout,
    check_attention,
    describe,
    find_layout,
    head_shape,
    logit_softcap,
    mfa_layer_spec,
    mfa_tensors,
    read_attention,
    rope_parameters,
)
from mfakit.convert.calibration import (
    embed,
    free_outside_layers,
    load_module,
    meta_skeleton,
    run_layer,
    second_moment,
)
from mfakit.convert.io import (
    LazyCheckpoint,
    ShardedWriter,
    atomic_folder,
    copy_side_files,
    partial_folder,
    resolve_checkpoint,
)
from mfakit.data import fingerprint, load_texts, parse_spec, spread_windows, tokenize
from mfakit.model import modeling_mfa
from mfakit.model.modeling_mfa import VARIANTS, MFAAttention, MFAConfig

DEFAULT_CALIB = "builtin:pydoc"
DEFAULT_CALIB_TOKENS = 16384
DEFAULT_CALIB_SEQ_LEN = 512
CALIB_BATCH = 8
READOUT_FOLDS = 8
RECORDED_SETTINGS = (
    "kv_ratio",
    "kv_dim",
    "share_q_dim",
    "method",
    "calibration",
    "calibration_tokens",
    "calibration_seq_len",
    "mfakit_version",
)


class BudgetError(ValueError):
    """A KV budget that the source cannot be converted to."""


@dataclass
class ConvertSummary:
    out: str
    variant: str
    kv_dim: list[int]
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    params_before: int
    params_after: int
    calib: str
    calib_tokens: int
    seconds: float

    def lines(self) -> list[str]:
        ratio = self.kv_bytes_per_token_after / self.kv_bytes_per_token_before
        return [
            f"wrote {self.out} ({self.variant}, kv_dim {_describe_widths(self.kv_dim)})",
            f"KV cache per token: {self.kv_bytes_per_token_before:,} -> {self.kv_bytes_per_token_after:,} bytes ({ratio:.3f}x)",
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
            f"calibration: {self.calib_tokens:,} tokens of {self.calib}",
            f"time: {self.seconds:.1f} s",
        ]


def _describe_widths(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} per layer"


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


@dataclass(frozen=True)
class Method:
    """How a layer is factorized below the exact budget (the exact embedding needs none of this).

    sequential: gather layer l's statistics on the inputs that the already converted layers 0..l-1 produce, so
        their errors are seen and compensated rather than compounded.
    refit: least-squares refit of the output projection against the source layer's attention output.
    key_fraction: share of the cache given to key channels (MFA-KR: of C; MFA: of C + v_dim); None: 0.8 for
        MFA-KR, 0.5 for MFA.
    nope_angle: RoPE pairs that turn by at most this many radians over `nope_context` tokens (default: the model's
        max_position_embeddings) become NoPE channels; 0 keeps every frequency.
    """

    sequential: bool = True
    refit: bool = True
    key_fraction: float | None = None
    nope_angle: float = 1.0
    nope_context: int | None = None

    def key_share(self, variant: str) -> float:
        return self.key_fraction if self.key_fraction is not None else (0.8 if variant == "mfa-kr" else 0.5)


PLAIN = Method(sequential=False, refit=False, key_fraction=0.5, nope_angle=0.0)  # the first, uniform method


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
        if variant == "mfa-kr":
            return _even(total), 0
        C = min(_even(key_fraction * total), key_width)
        return C, max(1, min(value_width, round(total) - C))
    if kv_dim > exact:
        raise BudgetError(f"kv_dim {kv_dim} is above the exact budget of this model ({variant}: C = {exact})")
    if kv_dim < 2 or kv_dim % 2:
        raise BudgetError(f"kv_dim must be an even number >= 2 (one RoPE channel pair), got {kv_dim}")
    if variant == "mfa":
        return kv_dim, (value_width if kv_dim == key_width else min(kv_dim, value_width))
    return kv_dim, 0


def is_exact(src: fz.SourceAttention, variant: str, kv_dim: int, v_dim: int) -> bool:
    g, dh, dv = src.num_kv_heads, src.wk.shape[1], src.wv.shape[1]
    return (kv_dim, v_dim) == (g * dh, g * dv) if variant == "mfa" else kv_dim == g * (dh + dv)


def convert_layer(
    src: fz.SourceAttention, sigma: torch.Tensor, variant: str, kv_dim: int, v_dim: int, method: Method, context: int
) -> fz.MFALayer:
    """One layer at a budget: the exact embedding at full width, the calibrated factorization below it."""
    if is_exact(src, variant, kv_dim, v_dim):
        return fz.exact_mfa(src) if variant == "mfa" else fz.exact_mfa_kr(src)
    if method.nope_angle > 0:
        src = fz.nope_low_frequencies(src, method.nope_angle, context)
    if variant == "mfa":
        return fz.compress_mfa(src, sigma, kv_dim, v_dim)
    key_channels = min(src.wk.shape[0] * src.wk.shape[1], _even(method.key_share(variant) * kv_dim), kv_dim)
    return fz.compress_mfa_kr(src, sigma, kv_dim, key_channels)


def mfa_module(
    config, variant: str, layout: AttentionLayout, spec: dict, tensors: dict[str, torch.Tensor], layer: int
) -> MFAAttention:
    """The converted attention of one layer as a module (for the refit and the sequential pass)."""
    layer_config = MFAConfig(
        text_config=config.to_dict(), variant=variant, mfa_layers=[spec] * config.num_hidden_layers
    )
    layer_config._attn_implementation = "sdpa"  # on a fresh text config: the source skeleton keeps its own
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        module = MFAAttention(layer_config, layer)
    prefix = layout.attention_prefix(layer) + "."
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True, assign=True)
    return module.eval()


def readout_statistics(
    module: MFAAttention,
    x: list[torch.Tensor],
    y: list[torch.Tensor],
    layer_args: list,
    bias: torch.Tensor | None,
    folds: int = READOUT_FOLDS,
    samples: bool = False,
) -> list[fz.ReadoutStats] | fz.ReadoutSamples:
    """Readout statistics in `folds` folds (calibration sequences dealt round-robin): the converted layer's
    output-projection input on its calibration inputs against the source attention output (bias removed); with
    `samples`, those inputs and outputs themselves."""
    n = module.o_proj.in_features
    d = y[0].shape[-1]
    stats = [
        fz.ReadoutStats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, d, dtype=torch.float64), 0.0, 0)
        for _ in range(0 if samples else folds)
    ]
    features: list[torch.Tensor] = []
    kept: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    handle = module.o_proj.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
    row = 0
    try:
        with torch.no_grad():
            for xb, yb, (_, kwargs) in zip(x, y, layer_args, strict=True):
                features.clear()
                module(xb, attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"))
                for u, target in zip(features[0], yb, strict=True):
                    u = u.reshape(-1, n).to(torch.float64).cpu()
                    target = target.reshape(-1, d).to(torch.float64).cpu()
                    if bias is not None:
                        target = target - bias
                    k = row % folds
                    row += 1
                    if samples:
                        kept.append((u, target, k))
                        continue
                    fold = stats[k]
                    fold.gram.addmm_(u.T, u)
                    fold.cross.addmm_(u.T, target)
                    fold.energy += float(target.pow(2).sum())
                    fold.tokens += u.shape[0]
    finally:
        handle.remove()
    if samples:
        labels = torch.cat([torch.full((u.shape[0],), k) for u, _, k in kept])
        return fz.ReadoutSamples(torch.cat([u for u, _, _ in kept]), torch.cat([t for _, t, _ in kept]), labels)
    return [s for s in stats if s.energy > 0]


def refit_memory(features: int, d: int, tokens: int, folds: int) -> dict[str, int]:
    """Bytes the output refit needs from statistics ((folds + 1) (n, n + d) sums in float64) and from samples (the
    (N, n + d) samples in float64 twice over, the (N, N) kernel and the buffers of its solves, and the prior and
    refit (d, n) readouts)."""
    return {
        "statistics": (folds + 1) * features * (features + d) * 8,
        "samples": 2 * tokens * (features + d) * 8 + 4 * tokens * tokens * 8 + 2 * d * features * 8,
    }


def write_state(writer: ShardedWriter, module: torch.nn.Module, prefix: str, skip: tuple[str, ...]) -> None:
    """Every materialised tensor of a module under its model name (tied tensors once), except those under `skip`."""
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        full = prefix + name
        if tensor.is_meta or full.startswith(skip) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        writer.add(full, tensor)


def _source_params(ckpt: LazyCheckpoint) -> int:
    from safetensors import safe_open

    total = 0
    for file in set(ckpt.files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                total += int(torch.tensor(shape).prod().item()) if shape else 1
    return total


RESUME_DIR = "resume"


def has_resume_state(partial: Path) -> bool:
    return (partial / RESUME_DIR / "state.json").is_file()


def read_resume_state(partial: Path, settings: dict) -> dict | None:
    """The state a killed conversion left in `partial`, or None when there is none; refuses changed settings."""
    if not has_resume_state(partial):
        return None
    state = json.loads((partial / RESUME_DIR / "state.json").read_text())
    changed = sorted(
        k for k in settings.keys() | state["settings"].keys() if settings.get(k) != state["settings"].get(k)
    )
    if changed:
        raise BudgetError(
            f"{partial} holds a conversion with other settings ({', '.join(changed)}); "
            "run without --resume to start over"
        )
    return state


def save_resume_state(
    partial: Path,
    settings: dict,
    next_layer: int,
    specs: list[dict],
    out_dtype: torch.dtype,
    writer: ShardedWriter,
    streams: tuple[list[torch.Tensor], list[torch.Tensor]],
) -> None:
    """Everything the next layer needs, after layer next_layer - 1 is written: the writer's state and the
    calibration hidden states of both streams. The state file is replaced last, so a kill at any point leaves the
    previous complete state."""
    folder = partial / RESUME_DIR
    folder.mkdir(exist_ok=True)
    source, converted = streams
    name = f"streams-{next_layer:05d}.pt"
    torch.save({"source": source, "converted": None if converted is source else converted}, folder / name)
    state = {
        "settings": settings,
        "next_layer": next_layer,
        "specs": specs,
        "out_dtype": str(out_dtype).removeprefix("torch."),
        "writer": writer.state(),
        "streams": name,
    }
    (folder / "state.json.tmp").write_text(json.dumps(state))
    os.replace(folder / "state.json.tmp", folder / "state.json")
    for old in folder.glob("streams-*.pt"):
        if old.name != name:
            old.unlink()


def load_streams(partial: Path, state: dict, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    saved = torch.load(partial / RESUME_DIR / state["streams"], map_location=device, weights_only=True)
    source = saved["source"]
    return source, source if saved["converted"] is None else saved["converted"]


def release_freed_memory() -> None:
    """Hand the allocator's free pages back to the system between layers (glibc keeps them otherwise, and each
    layer's float64 temporaries then fragment the heap into a slowly rising peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to hand back this way


def calibration_batches(tokenizer, calib: str, calib_tokens: int, calib_seq_len: int) -> tuple[list[torch.Tensor], str]:
    source = parse_spec(calib)
    texts = load_texts(source, part="calibration")
    windows = spread_windows(tokenize(tokenizer, texts), calib_seq_len, max(1, calib_tokens // calib_seq_len))
    description = f"{source} [{fingerprint(texts)}]"
    return list(windows.split(CALIB_BATCH)), description


def convert(
    source: str | Path,
    out: str | Path,
    *,
    variant: str = "mfa-kr",
    kv_ratio: float | None = None,
    kv_dim: int | None = None,
    share_q_dim: int | None = None,
    method: Method = Method(),
    calib: str = DEFAULT_CALIB,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    approximate_qk_norm: bool = False,
    resume: bool = False,
    refit_memory_gb: float = 4.0,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> ConvertSummary:
    """Convert a causal-LM checkpoint to MFA or MFA-KR at a KV-cache budget (see the README for the format).

    `dtype` is the precision of the calibration forward passes; converted tensors keep the source's dtype, and
    every non-attention tensor is copied unchanged. `approximate_qk_norm` allows QK-norm families (folded norms:
    never exact). `announce` receives one line naming the detected family and the plan before the work starts.

    The work is built in a hidden partial folder beside `out` and renamed when finished. After every layer the
    partial folder records a resume state (the writer's position and the calibration hidden states); if the run is
    killed, `resume=True` with the same settings continues after the last finished layer and writes the same bytes
    as an uninterrupted run. The output refit's statistics take (folds + 1) * n * (n + d) * 8 bytes for n =
    heads * v_dim readout features; where that exceeds `refit_memory_gb` the refit works from the N calibration
    samples instead (about 16 N (n + d) + 32 N^2 bytes; same result), and where both do the layer keeps the
    factorization's readout.
    """
    start = time.time()
    if variant not in VARIANTS:
        raise BudgetError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if calib_tokens < calib_seq_len:
        raise BudgetError(
            f"calib_tokens ({calib_tokens}) must be at least one window of calib_seq_len ({calib_seq_len})"
        )
    if not 0 < method.key_share(variant) <= 1:
        raise BudgetError(f"key_fraction must be in (0, 1], got {method.key_fraction}")
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if compute_dtype is None:
        raise BudgetError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    folder = resolve_checkpoint(source)
    config = AutoConfig.from_pretrained(folder)
    layout = find_layout(config, approximate_qk_norm)
    ckpt = LazyCheckpoint(folder)
    n_layers = config.num_hidden_layers
    skeleton = meta_skeleton(config)
    base = skeleton.base_model_prefix
    ckpt.add_base_prefix(base, tuple(f"{name}." for name, _ in skeleton.named_children() if name != base))
    check_attention(layout, skeleton, ckpt, n_layers)
    rope_freqs, rope_scaling = rope_parameters(layout, config, skeleton)
    shape = head_shape(layout, skeleton.get_submodule(layout.attention_prefix(0)), config)
    kv_width = shape.num_kv_heads * shape.head_dim
    widths = plan_widths(variant, kv_width, kv_width, kv_ratio, kv_dim, method.key_share(variant))
    softcap = logit_softcap(layout, config)
    context = method.nope_context or config.max_position_embeddings
    if max_shard_bytes < 1:
        raise BudgetError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    if share_q_dim is not None and not 0 < share_q_dim:
        raise BudgetError(f"share_q_dim must be positive, got {share_q_dim}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if Path(out).resolve() == folder.resolve():
        raise FileExistsError(f"{out} is the source checkpoint; write the conversion elsewhere")

    if announce is not None:
        announce(describe(layout, config, shape, rope_freqs.shape[0]))
        announce(
            f"plan: {n_layers} layers to {variant}, kv_dim {widths[0]}"
            + (f", v_dim {widths[1]}" if variant == "mfa" else "")
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches, calib_description = calibration_batches(tokenizer, calib, calib_tokens, calib_seq_len)
    n_calib = sum(b.numel() for b in batches)

    settings = {
        "source": str(folder.resolve()),
        "variant": variant,
        "kv_ratio": kv_ratio,
        "kv_dim": kv_dim,
        "share_q_dim": share_q_dim,
        "method": asdict(method),
        "calibration": calib_description,
        "calibration_tokens": n_calib,
        "calibration_seq_len": calib_seq_len,
        "dtype": dtype,
        "max_shard_bytes": max_shard_bytes,
        "approximate_qk_norm": approximate_qk_norm,
        "refit_memory_gb": refit_memory_gb,
        "mfakit_version": mfakit.__version__,
    }
    partial = partial_folder(Path(out))
    state = read_resume_state(partial, settings) if resume else None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
    elif announce is not None:
        announce(f"resuming {partial} after layer {state['next_layer'] - 1}")

    with atomic_folder(Path(out), overwrite, tmp=partial, keep=has_resume_state) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes, state["writer"] if state else None)
        inputs = embed(skeleton, layout.layers_path, ckpt, batches, device, compute_dtype, layout.layer_returns_tuple)
        if state is None:
            layers_prefix = f"{layout.layers_path}."
            write_state(writer, load_module(skeleton, "", ckpt, exclude=(layers_prefix,)), "", skip=(layers_prefix,))
            source_stream = converted_stream = inputs.hidden
            specs, out_dtype, first = [], None, 0
        else:
            source_stream, converted_stream = load_streams(tmp, state, device)
            specs, out_dtype, first = state["specs"], getattr(torch, state["out_dtype"]), state["next_layer"]
        free_outside_layers(skeleton, layout.layers_path)
        skipped_refit = refit_from_samples = False
        bar = tqdm(total=n_layers, initial=first, desc="converting layers", disable=not progress, unit="layer")
        for i in range(first, n_layers):
            args = inputs.layer_args[i]
            layer_path = f"{layout.layers_path}.{i}"
            layer = load_module(skeleton, layer_path, ckpt)
            attention_prefix = layout.attention_prefix(i) + "."
            write_state(writer, layer, f"{layer_path}.", skip=(attention_prefix,))
            out_dtype = next(layer.get_submodule(layout.attention_name).parameters()).dtype
            layer.to(device=device, dtype=compute_dtype)
            attention = layer.get_submodule(layout.attention_name)
            src_run = run_layer(layer, attention, source_stream, args, attn_in=True, attn_out=method.refit)
            x = src_run.attn_in
            if converted_stream is not source_stream:
                x = run_layer(layer, attention, converted_stream, args, outputs=False).attn_in
            src = read_attention(
                layout,
                attention,
                config,
                rope_freqs=rope_freqs,
                rope_scaling=rope_scaling,
                calib_inputs=x if layout.qk_norm else None,
            )
            exact = is_exact(src, variant, *widths)
            sigma = second_moment(x)
            mfa = convert_layer(src, sigma, variant, *widths, method, context)
            features = mfa.wo.shape[1] * mfa.wo.shape[2]
            # Folds only serve the ridge's cross-validation, which plentiful tokens skip (see choose_ridge).
            n_folds = 1 if n_calib >= fz.PLENTY * features else READOUT_FOLDS
            refit_bytes = refit_memory(features, mfa.wo.shape[0], n_calib, n_folds)
            if method.refit and not exact and min(refit_bytes.values()) > refit_memory_gb * 1e9:
                if announce is not None and not skipped_refit:
                    announce(
                        f"layer {i}: output refit skipped ({features} readout features need "
                        f"{min(refit_bytes.values()) / 1e9:.1f} GB > refit_memory_gb {refit_memory_gb}); "
                        "same for wider layers"
                    )
                skipped_refit = True
            elif method.refit and not exact:
                spec = mfa_layer_spec(mfa, src, None, softcap)
                module = mfa_module(config, variant, layout, spec, mfa_tensors(layout, i, mfa, src, torch.float32), i)
                module.to(device=device, dtype=compute_dtype)
                samples = refit_bytes["statistics"] > refit_memory_gb * 1e9
                if samples and announce is not None and not refit_from_samples:
                    announce(
                        f"layer {i}: output refit from the {n_calib} calibration samples (its statistics would need "
                        f"{refit_bytes['statistics'] / 1e9:.1f} GB > refit_memory_gb {refit_memory_gb}); same for "
                        "wider layers"
                    )
                refit_from_samples = refit_from_samples or samples
                folds = readout_statistics(module, x, src_run.attn_out, args, src.bo, n_folds, samples)
                mfa, _ = fz.readout_refit(mfa, folds)
            fz.balance_(mfa, sigma)
            q_factors = fz.factor_query(mfa, sigma, share_q_dim) if share_q_dim else None
            tensors = mfa_tensors(layout, i, mfa, src, out_dtype, q_factors)
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            spec = mfa_layer_spec(mfa, src, q_factors[0].shape[0] if q_factors else None, softcap)
            specs.append(spec)
            next_source = src_run.hidden
            if method.sequential and not exact:
                converted = mfa_module(config, variant, layout, spec, tensors, i).to(device=device, dtype=compute_dtype)
                layer.set_submodule(layout.attention_name, converted)
                converted_stream = run_layer(layer, converted, converted_stream, args).hidden
            elif converted_stream is source_stream:
                converted_stream = next_source
            else:
                converted_stream = run_layer(layer, attention, converted_stream, args).hidden
            source_stream = next_source
            layer.to("meta")
            save_resume_state(tmp, settings, i + 1, specs, out_dtype, writer, (source_stream, converted_stream))
            release_freed_memory()
            bar.update()
        bar.close()
        writer.finish()
        shutil.rmtree(tmp / RESUME_DIR)
        cached = _finish_checkpoint(
            tmp,
            folder,
            config,
            layout,
            variant,
            specs,
            out_dtype,
            conversion={
                "source": str(folder.resolve()) if Path(source).is_dir() else str(source),
                "family": layout.family,
                "approximate_qk_norm": bool(layout.qk_norm),
                **{k: settings[k] for k in RECORDED_SETTINGS},
            },
        )
    element = torch.tensor([], dtype=out_dtype).element_size()
    return ConvertSummary(
        out=str(out),
        variant=variant,
        kv_dim=[s["kv_dim"] for s in specs],
        kv_bytes_per_token_before=2 * kv_width * n_layers * element,
        kv_bytes_per_token_after=cached * element,
        params_before=_source_params(ckpt),
        params_after=_source_params(LazyCheckpoint(Path(out))),
        calib=calib_description,
        calib_tokens=n_calib,
        seconds=time.time() - start,
    )


def _finish_checkpoint(
    tmp: Path, folder: Path, config, layout: AttentionLayout, variant: str, specs: list[dict], dtype, conversion: dict
) -> int:
    """config.json, the modeling file and the tokenizer/generation files; returns cached numbers per token."""
    text_config = config.to_dict()
    mfa_config = MFAConfig(
        text_config=text_config,
        variant=variant,
        layers_path=layout.layers_path,
        attention_name=layout.attention_name,
        mfa_layers=specs,
        conversion=conversion,
        architectures=["MFAForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )
    mfa_config.auto_map = {
        "AutoConfig": "modeling_mfa.MFAConfig",
        "AutoModelForCausalLM": "modeling_mfa.MFAForCausalLM",
    }
    mfa_config.save_pretrained(tmp)
    shutil.copy2(modeling_mfa.__file__, tmp / "modeling_mfa.py")
    copy_side_files(folder, tmp)
    return sum(s["kv_dim"] + (0 if variant == "mfa-kr" else s["v_dim"]) for s in specs)


def summary_json(summary: ConvertSummary) -> str:
    return json.dumps(asdict(summary), indent=2)
