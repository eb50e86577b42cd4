"""Architecture adapters: each family's attention layout described as data, and one generic reader/writer.

An adapter says where a family keeps its decoder layers and attention tensors. `read_attention` turns one layer's
tensors into the canonical `SourceAttention` of the factorization math; `mfa_tensors` names the converted tensors.
Adding a family is one more `AttentionLayout` entry when its layout fits these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mfakit.convert.factorize import MFALayer, SourceAttention
from mfakit.convert.io import CheckpointError, LazyCheckpoint


class UnsupportedModelError(ValueError):
    """A source model that mfakit cannot convert (or not without an explicit option)."""


@dataclass(frozen=True)
class AttentionLayout:
    """Where one family keeps its attention.

    model_types: transformers `model_type` values with this layout. layers_path: the decoder-layer list inside the
    causal LM; attention_name: the attention module inside one layer; q, k, v, o: the projection modules inside the
    attention (`<name>.weight`, optional `<name>.bias`, stored as nn.Linear (out, in)). rotary_path: the module that
    holds the RoPE frequencies (`inv_freq`, `attention_scaling`). qk_norm: per-head norm modules whose presence means
    the layer normalises queries/keys per head.
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    rotary_path: str = "model.rotary_emb"
    qk_norm: tuple[str, ...] = ("q_norm", "k_norm")

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}.{self.attention_name}"


LAYOUTS = (AttentionLayout(family="llama", model_types=("llama", "mistral", "qwen2")),)
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "olmo2", "olmo3", "gemma3_text", "cohere2")
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS for t in layout.model_types)


def find_layout(config) -> AttentionLayout:
    """The layout of a source config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "mfa":
        raise UnsupportedModelError("the source is already an MFA checkpoint")
    if model_type in QK_NORM_TYPES:
        raise UnsupportedModelError(
            f"{model_type} normalises queries and keys per head (QK-norm), which no MFA layer reproduces exactly; "
            f"not supported (supported: {', '.join(supported_model_types())})"
        )
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r} (supported: {', '.join(supported_model_types())})"
    )


def check_tensors(layout: AttentionLayout, ckpt: LazyCheckpoint, num_layers: int) -> None:
    """Refuse QK-norm layers and name the first missing attention tensor, before any work is done."""
    for layer in range(num_layers):
        prefix = layout.attention_prefix(layer)
        for norm in layout.qk_norm:
            if f"{prefix}.{norm}.weight" in ckpt:
                raise UnsupportedModelError(
                    f"{prefix}.{norm}: per-head QK-norm cannot be converted exactly; not supported"
                )
        for proj in (layout.q, layout.k, layout.v, layout.o):
            if f"{prefix}.{proj}.weight" not in ckpt:
                raise CheckpointError(f"{ckpt.folder}: tensor {prefix}.{proj}.weight is missing")


def rope_parameters(layout: AttentionLayout, config, skeleton: nn.Module) -> tuple[torch.Tensor, float]:
    """RoPE frequencies (P,) and the cos/sin scaling of the source, from its own rotary module."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") in DYNAMIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope['rope_type']!r} changes its frequencies with the sequence length; MFA keeps a fixed table"
        )
    rotary = type(skeleton.get_submodule(layout.rotary_path))(config=config)
    return rotary.inv_freq.to(torch.float64), float(rotary.attention_scaling)


def attention_tensor_names(layout: AttentionLayout, ckpt: LazyCheckpoint, layer: int) -> list[str]:
    prefix = layout.attention_prefix(layer)
    names = [f"{prefix}.{p}.{kind}" for p in (layout.q, layout.k, layout.v, layout.o) for kind in ("weight", "bias")]
    return [n for n in names if n in ckpt]


def read_attention(
    layout: AttentionLayout,
    ckpt: LazyCheckpoint,
    layer: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    rope_freqs: torch.Tensor,
    rope_scaling: float,
    scale: float,
) -> SourceAttention:
    """One layer's attention in canonical form (float64, biases as the last input column).

    transformers' Llama-family RoPE pairs channel t with t + P inside each head, which is the canonical layout.
    A cos/sin scaling s (YaRN-style attention factor) multiplies every rotary logit by s^2: it is folded into the
    query's rotary rows.
    """
    prefix = layout.attention_prefix(layer)

    def proj(name: str, heads: int) -> tuple[torch.Tensor, bool]:
        w = ckpt.get(f"{prefix}.{name}.weight").to(torch.float64)
        bias_name = f"{prefix}.{name}.bias"
        has_bias = bias_name in ckpt
        b = ckpt.get(bias_name).to(torch.float64) if has_bias else w.new_zeros(w.shape[0])
        w = torch.cat([w, b[:, None]], 1)
        return w.reshape(heads, w.shape[0] // heads, w.shape[1]), has_bias

    wq, q_bias = proj(layout.q, num_heads)
    wk, k_bias = proj(layout.k, num_kv_heads)
    wv, v_bias = proj(layout.v, num_kv_heads)
    P = rope_freqs.shape[0]
    wq[:, : 2 * P] *= rope_scaling**2
    wo = ckpt.get(f"{prefix}.{layout.o}.weight").to(torch.float64)
    wo = wo.reshape(wo.shape[0], num_heads, wo.shape[1] // num_heads)
    o_bias = f"{prefix}.{layout.o}.bias"
    bo = ckpt.get(o_bias).to(torch.float64) if o_bias in ckpt else None
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{num_heads} query heads do not divide into {num_kv_heads} key/value heads")
    return SourceAttention(
        wq=wq,
        wk=wk,
        wv=wv,
        wo=wo,
        bo=bo,
        rope_freqs=rope_freqs,
        scale=scale,
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
    )


def mfa_tensors(
    layout: AttentionLayout, layer: int, mfa: MFALayer, src: SourceAttention, dtype: torch.dtype, q_factors=None
) -> dict[str, torch.Tensor]:
    """Named tensors of one converted attention layer (the names `MFAAttention` expects)."""
    prefix = layout.attention_prefix(layer)
    h, C, d1 = mfa.wq.shape
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: torch.Tensor, bias: bool) -> None:
        out[f"{prefix}.{name}.weight"] = rows[:, :-1].to(dtype).contiguous()
        if bias:
            out[f"{prefix}.{name}.bias"] = rows[:, -1].to(dtype).contiguous()

    if q_factors is None:
        linear("q_proj", mfa.wq.reshape(h * C, d1), src.q_bias)
    else:
        s_q, q_b = q_factors
        linear("q_a_proj", s_q, src.q_bias)
        out[f"{prefix}.q_b_proj.weight"] = q_b.to(dtype).contiguous()
    linear("k_proj", mfa.wk, src.k_bias)
    if mfa.wv is not None:
        linear("v_proj", mfa.wv, src.v_bias)
    out[f"{prefix}.o_proj.weight"] = mfa.wo.reshape(mfa.wo.shape[0], -1).to(dtype).contiguous()
    if mfa.bo is not None:
        out[f"{prefix}.o_proj.bias"] = mfa.bo.to(dtype).contiguous()
    return out


def mfa_layer_spec(mfa: MFALayer, src: SourceAttention, share_q_dim: int | None) -> dict:
    """The per-layer entry of the converted config (see `MFAConfig.mfa_layers`)."""
    return {
        "num_heads": src.num_heads,
        "kv_dim": mfa.kv_dim,
        "v_dim": mfa.v_dim,
        "share_q_dim": share_q_dim,
        "q_norm": False,
        "rope_freqs": [float(f) for f in mfa.rope_freqs.to(torch.float32)],
        "softmax_scale": src.scale,
        "logit_softcap": None,
        "q_bias": src.q_bias,
        "k_bias": src.k_bias,
        "v_bias": src.v_bias,
        "o_bias": src.bo is not None,
    }
