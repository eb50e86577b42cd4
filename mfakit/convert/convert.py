"""`mfakit convert`: a Llama-family (or other supported) checkpoint in, an MFA / MFA-KR checkpoint out.

The work goes one decoder layer at a time: read the layer's tensors lazily, run the calibration hidden states
through it (gathering the second moment of its attention input), factorize its attention, write the converted
tensors and every other tensor of the layer unchanged, and free it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

import mfakit
from mfakit.convert import factorize as fz
from mfakit.convert.adapters import (
    AttentionLayout,
    attention_tensor_names,
    check_tensors,
    find_layout,
    mfa_layer_spec,
    mfa_tensors,
    read_attention,
    rope_parameters,
)
from mfakit.convert.calibration import SecondMoment, embed, load_module, meta_skeleton, run_layer
from mfakit.convert.io import LazyCheckpoint, ShardedWriter, atomic_folder, copy_side_files, resolve_checkpoint
from mfakit.data import fingerprint, load_texts, parse_spec, spread_windows, tokenize
from mfakit.model import modeling_mfa
from mfakit.model.modeling_mfa import VARIANTS, MFAConfig

DEFAULT_CALIB = "builtin:pydoc"
DEFAULT_CALIB_TOKENS = 16384
DEFAULT_CALIB_SEQ_LEN = 512
CALIB_BATCH = 8


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


def plan_widths(
    variant: str, key_width: int, value_width: int, kv_ratio: float | None, kv_dim: int | None
) -> tuple[int, int]:
    """(kv_dim, v_dim) of every layer for a budget.

    The source caches key_width + value_width (g*d_h + g*d_v) numbers per token per layer. MFA caches kv_dim + v_dim
    and is exact at kv_dim = g*d_h, v_dim = g*d_v; MFA-KR caches kv_dim and is exact at kv_dim = g*(d_h + d_v).
    `kv_ratio` is the cache relative to the source's; `kv_dim` is C itself (MFA: both widths).
    """
    if (kv_ratio is None) == (kv_dim is None):
        raise BudgetError("give exactly one of kv_ratio and kv_dim")
    source = key_width + value_width
    exact = key_width if variant == "mfa" else source
    if kv_ratio is not None:
        if not 0 < kv_ratio <= 1:
            raise BudgetError(f"kv_ratio must be in (0, 1], got {kv_ratio} (1.0 is the exact conversion)")
        if variant == "mfa":
            C = key_width if kv_ratio == 1 else _even(kv_ratio * key_width)
            v = value_width if kv_ratio == 1 else max(1, round(kv_ratio * value_width))
            return C, v
        return (exact if kv_ratio == 1 else _even(kv_ratio * source)), 0
    if kv_dim > exact:
        raise BudgetError(f"kv_dim {kv_dim} is above the exact budget of this model ({variant}: C = {exact})")
    if kv_dim < 2 or kv_dim % 2:
        raise BudgetError(f"kv_dim must be an even number >= 2 (one RoPE channel pair), got {kv_dim}")
    if variant == "mfa":
        return kv_dim, (value_width if kv_dim == key_width else min(kv_dim, value_width))
    return kv_dim, 0


def convert_layer(src: fz.SourceAttention, sigma: torch.Tensor, variant: str, kv_dim: int, v_dim: int) -> fz.MFALayer:
    """One layer at a budget: the exact embedding at full width, the calibrated factorization below it."""
    g, dh, dv = src.num_kv_heads, src.wk.shape[1], src.wv.shape[1]
    if variant == "mfa":
        if kv_dim == g * dh and v_dim == g * dv:
            return fz.exact_mfa(src)
        return fz.compress_mfa(src, sigma, kv_dim, v_dim)
    if kv_dim == g * (dh + dv):
        return fz.exact_mfa_kr(src)
    key_channels = min(g * dh, 2 * (kv_dim // 4))
    return fz.compress_mfa_kr(src, sigma, kv_dim, key_channels)


def _source_params(ckpt: LazyCheckpoint) -> int:
    from safetensors import safe_open

    total = 0
    for file in set(ckpt.files.values()):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                total += int(torch.tensor(shape).prod().item()) if shape else 1
    return total


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
    calib: str = DEFAULT_CALIB,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> ConvertSummary:
    """Convert a causal-LM checkpoint to MFA or MFA-KR at a KV-cache budget (see the README for the format).

    `dtype` is the precision of the calibration forward passes; converted tensors keep the source's dtype, and
    every non-attention tensor is copied unchanged.
    """
    start = time.time()
    if variant not in VARIANTS:
        raise BudgetError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if calib_tokens < calib_seq_len:
        raise BudgetError(
            f"calib_tokens ({calib_tokens}) must be at least one window of calib_seq_len ({calib_seq_len})"
        )
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if compute_dtype is None:
        raise BudgetError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    folder = resolve_checkpoint(source)
    config = AutoConfig.from_pretrained(folder)
    layout = find_layout(config)
    ckpt = LazyCheckpoint(folder)
    n_layers = config.num_hidden_layers
    check_tensors(layout, ckpt, n_layers)
    skeleton = meta_skeleton(config)
    rope_freqs, rope_scaling = rope_parameters(layout, config, skeleton)
    attn0 = skeleton.get_submodule(layout.attention_prefix(0))
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn0.head_dim
    widths = plan_widths(variant, n_kv * head_dim, n_kv * head_dim, kv_ratio, kv_dim)
    if share_q_dim is not None and not 0 < share_q_dim:
        raise BudgetError(f"share_q_dim must be positive, got {share_q_dim}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if Path(out).resolve() == folder.resolve():
        raise FileExistsError(f"{out} is the source checkpoint; write the conversion elsewhere")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches, calib_description = calibration_batches(tokenizer, calib, calib_tokens, calib_seq_len)
    n_calib = sum(b.numel() for b in batches)

    with atomic_folder(Path(out), overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        inputs = embed(skeleton, layout.layers_path, ckpt, batches, device, compute_dtype)
        layer_prefixes = [f"{layout.layers_path}.{i}." for i in range(n_layers)]
        for name in ckpt.names():
            if not name.startswith(tuple(layer_prefixes)):
                writer.add(name, ckpt.get(name))
        specs = []
        out_dtype = None
        bar = tqdm(range(n_layers), desc="converting layers", disable=not progress, unit="layer")
        for i in bar:
            path = f"{layout.layers_path}.{i}"
            layer = load_module(skeleton, path, ckpt, device, compute_dtype)
            moment = SecondMoment(config.hidden_size)
            inputs.hidden = list(run_layer(layer, layer.get_submodule(layout.attention_name), inputs, i, moment))
            layer.to("meta")
            src = read_attention(
                layout,
                ckpt,
                i,
                num_heads=n_heads,
                num_kv_heads=n_kv,
                rope_freqs=rope_freqs,
                rope_scaling=rope_scaling,
                scale=float(attn0.scaling),
            )
            sigma = moment.value()
            mfa = fz.balance(convert_layer(src, sigma, variant, *widths))
            q_factors = fz.factor_query(mfa, sigma, share_q_dim) if share_q_dim else None
            consumed = attention_tensor_names(layout, ckpt, i)
            out_dtype = ckpt.get(consumed[0]).dtype
            for name, tensor in mfa_tensors(layout, i, mfa, src, out_dtype, q_factors).items():
                writer.add(name, tensor)
            for name in ckpt.names():
                if name.startswith(layer_prefixes[i]) and name not in consumed:
                    writer.add(name, ckpt.get(name))
            specs.append(mfa_layer_spec(mfa, src, q_factors[0].shape[0] if q_factors else None))
        writer.finish()
        summary = _finish_checkpoint(
            tmp,
            folder,
            config,
            layout,
            variant,
            specs,
            out_dtype,
            conversion={
                "source": str(source),
                "kv_ratio": kv_ratio,
                "kv_dim": kv_dim,
                "share_q_dim": share_q_dim,
                "calibration": calib_description,
                "calibration_tokens": n_calib,
                "calibration_seq_len": calib_seq_len,
                "mfakit_version": mfakit.__version__,
            },
        )
    element = torch.tensor([], dtype=out_dtype).element_size()
    params_after = _source_params(LazyCheckpoint(Path(out)))
    return ConvertSummary(
        out=str(out),
        variant=variant,
        kv_dim=[s["kv_dim"] for s in specs],
        kv_bytes_per_token_before=2 * n_kv * head_dim * n_layers * element,
        kv_bytes_per_token_after=summary * element,
        params_before=_source_params(ckpt),
        params_after=params_after,
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
