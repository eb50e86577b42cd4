"""Architecture adapters: each family's attention layout described as data, and one generic reader/writer.

An `AttentionLayout` says where a family keeps its decoder layers and attention, how its projections are stored
(separate or fused, and how fused rows are ordered), which positions it uses and where its softmax scale lives.
`read_attention` turns one materialised attention module into the canonical `SourceAttention` of the factorization
math; `mfa_tensors` names the converted tensors. Adding a family whose layout fits these fields is one more entry in
`LAYOUTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mfakit.convert.factorize import MFALayer, SourceAttention, fold_qk_norm
from mfakit.convert.io import CheckpointError, LazyCheckpoint


class UnsupportedModelError(ValueError):
    """A source model that mfakit cannot convert (or not without an explicit option)."""


@dataclass(frozen=True)
class AttentionLayout:
    """Where and how one family keeps its attention.

    model_types: transformers `model_type` values with this layout. layers_path: the decoder-layer list inside the
    causal LM; attention_name: the attention module inside one layer.
    q, k, v, o: projection modules inside the attention. qkv: the fused projection that replaces q, k and v, if any;
    fused: its row order, "concat" (all query heads, then all key heads, then all value heads) or "grouped" (per
    key/value group g: its h/g query heads, its key head, its value head; MHA is g = h, MQA g = 1).
    conv1d: weights stored (in, out), as GPT-2's Conv1D does. Biases are read wherever the module has them.
    rotary_path: the module holding the RoPE frequencies (`inv_freq`; partial rotary gives fewer pairs than d_h/2,
    and the remaining channels are NoPE), or None for learned absolute positions (every channel is NoPE).
    head_dim_attr, scale_attr: attributes of the attention module holding d_h and the softmax scale.
    softcap: config attribute of the attention-logit soft cap (tanh), if the family has one.
    qk_norm: per-head (or per-projection) norm modules applied to queries and keys before RoPE.
    layer_returns_tuple: the decoder layer returns (hidden, ...) rather than hidden.
    refuse: (config attribute, value, reason) triples this layout cannot express.
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    fused: str = "concat"
    conv1d: bool = False
    rotary_path: str | None = "model.rotary_emb"
    head_dim_attr: str = "head_dim"
    scale_attr: str = "scaling"
    softcap: str | None = None
    qk_norm: tuple[str, str] | None = None
    layer_returns_tuple: bool = False
    refuse: tuple[tuple[str, object, str], ...] = ()
    positions: str = "RoPE"

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}.{self.attention_name}"


LAYOUTS = (
    AttentionLayout(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "gemma", "gemma2"),
        softcap="attn_logit_softcapping",
    ),
    AttentionLayout(
        family="qk-norm",
        model_types=("qwen3", "qwen3_moe", "olmo2"),
        qk_norm=("q_norm", "k_norm"),
    ),
    AttentionLayout(family="phi3", model_types=("phi3",), qkv="qkv_proj"),
    AttentionLayout(
        family="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        attention_name="attn",
        qkv="c_attn",
        o="c_proj",
        conv1d=True,
        rotary_path=None,
        positions="learned absolute",
        refuse=(("add_cross_attention", True, "cross-attention blocks"),),
    ),
    AttentionLayout(
        family="gpt-neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        attention_name="attention",
        qkv="query_key_value",
        fused="grouped",
        o="dense",
        rotary_path="gpt_neox.rotary_emb",
        head_dim_attr="head_size",
    ),
    AttentionLayout(
        family="opt",
        model_types=("opt",),
        layers_path="model.decoder.layers",
        o="out_proj",
        rotary_path=None,
        positions="learned absolute",
    ),
    AttentionLayout(
        family="falcon",
        model_types=("falcon",),
        layers_path="transformer.h",
        attention_name="self_attention",
        qkv="query_key_value",
        fused="grouped",
        o="dense",
        rotary_path="transformer.rotary_emb",
        scale_attr="inv_norm_factor",
        layer_returns_tuple=True,
        refuse=(("alibi", True, "ALiBi position biases"),),
    ),
)
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
QK_NORM_FLAG = "--approximate-qk-norm"


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS for t in layout.model_types)


def find_layout(config, approximate_qk_norm: bool = False) -> AttentionLayout:
    """The layout of a source config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "mfa":
        raise UnsupportedModelError("the source is already an MFA checkpoint")
    layout = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
    if layout is None:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r} (supported: {', '.join(supported_model_types())})"
        )
    for attr, value, reason in layout.refuse:
        if getattr(config, attr, None) == value:
            raise UnsupportedModelError(f"{model_type} with {attr}={value}: {reason} are not supported")
    if layout.qk_norm and not approximate_qk_norm:
        raise UnsupportedModelError(
            f"{model_type} normalises queries and keys per head (QK-norm) before RoPE, which no MFA layer reproduces "
            f"exactly; pass {QK_NORM_FLAG} to fold the norms into the projections (an approximation, see the README)"
        )
    return layout


@dataclass(frozen=True)
class HeadShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def head_shape(layout: AttentionLayout, attention: nn.Module, config) -> HeadShape:
    """Query heads, key/value heads and head width, from the module's own (possibly meta) weight shapes."""
    head_dim = int(getattr(attention, layout.head_dim_attr))
    heads = int(config.num_attention_heads)
    if layout.qkv is None:
        rows = _rows(layout, attention.get_submodule(layout.k).weight)
        return HeadShape(heads, rows // head_dim, head_dim)
    rows = _rows(layout, attention.get_submodule(layout.qkv).weight)
    kv_heads, rest = divmod(rows // head_dim - heads, 2)
    if rest or kv_heads < 1 or heads % kv_heads:
        raise UnsupportedModelError(f"fused projection {layout.qkv} has {rows} rows: not {heads} query heads + k + v")
    return HeadShape(heads, kv_heads, head_dim)


def _rows(layout: AttentionLayout, weight: torch.Tensor) -> int:
    return weight.shape[1] if layout.conv1d else weight.shape[0]


def check_attention(layout: AttentionLayout, skeleton: nn.Module, ckpt: LazyCheckpoint, num_layers: int) -> None:
    """Name the first attention tensor the checkpoint lacks, before any work is done."""
    for layer in range(num_layers):
        prefix = layout.attention_prefix(layer)
        for name, _ in skeleton.get_submodule(prefix).named_parameters():
            if f"{prefix}.{name}" not in ckpt:
                raise CheckpointError(f"{ckpt.folder}: tensor {prefix}.{name} is missing")


def rope_parameters(layout: AttentionLayout, config, skeleton: nn.Module) -> tuple[torch.Tensor, float]:
    """RoPE frequencies (P,) and the cos/sin scaling of the source, from its own rotary module (none: P = 0)."""
    if layout.rotary_path is None:
        return torch.zeros(0, dtype=torch.float64), 1.0
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") in DYNAMIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope['rope_type']!r} changes its frequencies with the sequence length; MFA keeps a fixed table"
        )
    rotary = type(skeleton.get_submodule(layout.rotary_path))(config=config)
    return rotary.inv_freq.to(torch.float64), float(getattr(rotary, "attention_scaling", 1.0))


def _linear(layout: AttentionLayout, module: nn.Module) -> torch.Tensor:
    """(out, in + 1) rows in float64, the bias (or zeros) as the last column."""
    w = module.weight.detach().to(torch.float64)
    w = w.T if layout.conv1d else w
    b = module.bias.detach().to(torch.float64) if _has_bias(module) else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], 1)


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def projections(layout: AttentionLayout, attention: nn.Module, shape: HeadShape) -> tuple[torch.Tensor, ...]:
    """Query (h, d_h, d1), key (g, d_h, d1) and value (g, d_h, d1) rows of one attention module, unfused."""
    h, g, dh = shape.num_heads, shape.num_kv_heads, shape.head_dim
    if layout.qkv is None:
        rows = [_linear(layout, attention.get_submodule(n)) for n in (layout.q, layout.k, layout.v)]
        return rows[0].reshape(h, dh, -1), rows[1].reshape(g, dh, -1), rows[2].reshape(g, dh, -1)
    fused = _linear(layout, attention.get_submodule(layout.qkv))
    if layout.fused == "concat":
        q, k, v = fused.split([h * dh, g * dh, g * dh])
        return q.reshape(h, dh, -1), k.reshape(g, dh, -1), v.reshape(g, dh, -1)
    per_group = fused.reshape(g, h // g + 2, dh, -1)
    return per_group[:, :-2].reshape(h, dh, -1), per_group[:, -2], per_group[:, -1]


def read_attention(
    layout: AttentionLayout,
    attention: nn.Module,
    config,
    *,
    rope_freqs: torch.Tensor,
    rope_scaling: float,
    calib_inputs: list[torch.Tensor] | None = None,
) -> SourceAttention:
    """One layer's attention in canonical form (float64, biases as the last input column).

    transformers' RoPE pairs channel t with t + P inside each head (of the rotary part, for partial rotary), which
    is the canonical layout. A cos/sin scaling s (YaRN-style attention factor) multiplies every rotary logit by
    s^2: it is folded into the query's rotary rows. A QK-norm layer is approximated by folding its norm into the
    projections with a gain calibrated on `calib_inputs` (see `fold_qk_norm`).
    """
    shape = head_shape(layout, attention, config)
    if shape.num_heads % shape.num_kv_heads:
        raise UnsupportedModelError(
            f"{shape.num_heads} query heads do not divide into {shape.num_kv_heads} key/value heads"
        )
    wq, wk, wv = projections(layout, attention, shape)
    if layout.qk_norm:
        if calib_inputs is None:
            raise ValueError("folding a QK-norm needs the layer's calibration inputs")
        x = torch.cat([b.reshape(-1, b.shape[-1]) for b in calib_inputs]).to(torch.float64).cpu()
        for rows, name in ((wq, layout.qk_norm[0]), (wk, layout.qk_norm[1])):
            norm = attention.get_submodule(name)
            gamma = norm.weight.detach().to(torch.float64).cpu()
            eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
            rows.copy_(fold_qk_norm(rows, gamma, eps, x))
    P = rope_freqs.shape[0]
    wq[:, : 2 * P] *= rope_scaling**2
    output = attention.get_submodule(layout.o)
    wo = _linear(layout, output)
    bo = wo[:, -1] if _has_bias(output) else None
    wo = wo[:, :-1].reshape(wo.shape[0], shape.num_heads, shape.head_dim)
    fused = attention.get_submodule(layout.qkv) if layout.qkv else None
    return SourceAttention(
        wq=wq.contiguous(),
        wk=wk.contiguous(),
        wv=wv.contiguous(),
        wo=wo,
        bo=bo,
        rope_freqs=rope_freqs,
        scale=float(getattr(attention, layout.scale_attr)),
        q_bias=_has_bias(fused or attention.get_submodule(layout.q)),
        k_bias=_has_bias(fused or attention.get_submodule(layout.k)),
        v_bias=_has_bias(fused or attention.get_submodule(layout.v)),
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


def mfa_layer_spec(mfa: MFALayer, src: SourceAttention, share_q_dim: int | None, softcap: float | None) -> dict:
    """The per-layer entry of the converted config (see `MFAConfig.mfa_layers`)."""
    return {
        "num_heads": src.num_heads,
        "kv_dim": mfa.kv_dim,
        "v_dim": mfa.v_dim,
        "share_q_dim": share_q_dim,
        "q_norm": False,
        "rope_freqs": [float(f) for f in mfa.rope_freqs.to(torch.float32)],
        "softmax_scale": src.scale,
        "logit_softcap": softcap,
        "q_bias": src.q_bias,
        "k_bias": src.k_bias,
        "v_bias": src.v_bias,
        "o_bias": src.bo is not None,
    }


def logit_softcap(layout: AttentionLayout, config) -> float | None:
    return getattr(config, layout.softcap, None) if layout.softcap else None


def describe(layout: AttentionLayout, config, shape: HeadShape, rope_pairs: int) -> str:
    """One line saying what was detected."""
    kind = "MHA" if shape.num_kv_heads == shape.num_heads else ("MQA" if shape.num_kv_heads == 1 else "GQA")
    if layout.rotary_path is None:
        positions = f"{layout.positions} positions (every channel NoPE)"
    elif 2 * rope_pairs < shape.head_dim:
        positions = f"partial RoPE ({2 * rope_pairs} of {shape.head_dim} channels; the rest NoPE)"
    else:
        positions = "RoPE"
    fused = f", fused {layout.qkv} ({layout.fused})" if layout.qkv else ""
    extras = ", QK-norm folded (approximate)" if layout.qk_norm else ""
    cap = logit_softcap(layout, config)
    extras += f", logit soft-cap {cap}" if cap else ""
    return (
        f"{config.model_type} ({layout.family} layout): {kind}, {shape.num_heads} query heads, "
        f"{shape.num_kv_heads} key/value heads of width {shape.head_dim}, {positions}{fused}{extras}"
    )
