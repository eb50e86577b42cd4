"""The generic reader and writer of attention tensors: one materialised source attention module (of any family in
`mfakit.families.LAYOUTS`) into the canonical `SourceAttention` of the factorization math, and a converted layer
into the named tensors, the per-layer config entry and the module of `MFAAttention`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mfakit.convert.factorize import MFALayer, SourceAttention, fold_qk_norm
from mfakit.families import AttentionLayout, HeadShape, UnsupportedModelError, head_shape
from mfakit.model.modeling_mfa import MFAAttention, MFAConfig


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


def norm_spec(layout: AttentionLayout, norm: nn.Module, head_dim: int) -> dict:
    """How a QK-norm module normalises: over each head or the whole projection, its epsilon and weight offset."""
    return {
        "norm_over": "head" if norm.weight.shape[0] == head_dim else "projection",
        "norm_eps": float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        "norm_offset": layout.qk_norm_offset,
    }


def _normed(y: torch.Tensor, norm: nn.Module, heads: int, head_dim: int) -> torch.Tensor:
    """A projection's output (..., heads * d_h) through the source's own norm module, as (..., heads, d_h)."""
    shape = (*y.shape[:-1], heads, head_dim)
    return norm(y.view(shape)) if norm.weight.shape[0] == head_dim else norm(y).view(shape)


def normalised_inputs(
    layout: AttentionLayout, attention: nn.Module, config, inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """For a QK-norm layer, per calibration batch the inputs of the converted layer's maps: [x, k~, q~], the
    attention input with the source's normalised keys (g * d_h) and queries (h * d_h), computed by the source's
    own projections and norms."""
    shape = head_shape(layout, attention, config)
    q, k = attention.get_submodule(layout.q), attention.get_submodule(layout.k)
    q_norm, k_norm = (attention.get_submodule(name) for name in layout.qk_norm)
    with torch.no_grad():
        return [
            torch.cat(
                [
                    x,
                    _normed(k(x), k_norm, shape.num_kv_heads, shape.head_dim).flatten(-2),
                    _normed(q(x), q_norm, shape.num_heads, shape.head_dim).flatten(-2),
                ],
                -1,
            )
            for x in inputs
        ]


def _normalised_rows(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Query, key and value rows over the inputs [x, k~, q~, 1] of `normalised_inputs`: queries and keys select
    their normalised head's channels, values keep their rows over x and their bias."""
    h, dh, d1 = wq.shape
    g = wk.shape[0]
    d, width = d1 - 1, d1 + (g + h) * dh
    q_rows, k_rows = wq.new_zeros(h, dh, width), wk.new_zeros(g, dh, width)
    q_rows.view(h * dh, width)[:, d + g * dh : d + (g + h) * dh] = torch.eye(h * dh, dtype=wq.dtype, device=wq.device)
    k_rows.view(g * dh, width)[:, d : d + g * dh] = torch.eye(g * dh, dtype=wk.dtype, device=wk.device)
    v_rows = wv.new_zeros(g, wv.shape[1], width)
    v_rows[..., :d], v_rows[..., -1] = wv[..., :d], wv[..., -1]
    return q_rows, k_rows, v_rows


def read_attention(
    layout: AttentionLayout,
    attention: nn.Module,
    config,
    *,
    rope_freqs: torch.Tensor,
    rope_scaling: float,
    qk_norm: str | None = None,
    calib_inputs: list[torch.Tensor] | None = None,
) -> SourceAttention:
    """One layer's attention in canonical form (float64 on the module's device, biases as the last input column).

    transformers' RoPE pairs channel t with t + P inside each head (of the rotary part, for partial rotary), which
    is the canonical layout; families that pair (2i, 2i+1) have their query and key channels reordered into it
    (a permutation of each head's channels, which leaves every logit as it was). A cos/sin scaling s (YaRN-style attention factor) multiplies every rotary logit by
    s^2: it is folded into the query's rotary rows. A QK-norm layer is read over the inputs of
    `normalised_inputs` (qk_norm="exact": queries and keys select the normalised heads, the layer stays exact),
    or approximated by folding its norm into the projections with a gain calibrated on `calib_inputs`
    (qk_norm="fold", see `fold_qk_norm`).
    """
    shape = head_shape(layout, attention, config)
    if shape.num_heads % shape.num_kv_heads:
        raise UnsupportedModelError(
            f"{shape.num_heads} query heads do not divide into {shape.num_kv_heads} key/value heads"
        )
    wq, wk, wv = projections(layout, attention, shape)
    if qk_norm == "fold":
        x = torch.cat([b.reshape(-1, b.shape[-1]) for b in calib_inputs]).to(torch.float64)
        for rows, name in ((wq, layout.qk_norm[0]), (wk, layout.qk_norm[1])):
            norm = attention.get_submodule(name)
            gamma = norm.weight.detach().to(torch.float64) + layout.qk_norm_offset
            eps = norm_spec(layout, norm, shape.head_dim)["norm_eps"]
            rows.copy_(fold_qk_norm(rows, gamma, eps, x))
    elif qk_norm == "exact":
        wq, wk, wv = _normalised_rows(wq, wk, wv)
    P = rope_freqs.shape[0]
    if layout.rope_interleaved and P:
        order = torch.cat([torch.arange(0, 2 * P, 2), torch.arange(1, 2 * P, 2), torch.arange(2 * P, shape.head_dim)])
        wq, wk = wq[:, order], wk[:, order]  # interleaved pairs (2i, 2i+1) to the canonical (t, t + P)
    wq[:, : 2 * P] *= rope_scaling**2
    output = attention.get_submodule(layout.o)
    wo = _linear(layout, output)
    bo = wo[:, -1] if _has_bias(output) else None
    wo = wo[:, :-1].reshape(wo.shape[0], shape.num_heads, shape.head_dim)
    fused = attention.get_submodule(layout.qkv) if layout.qkv else None
    exact_qk_norm = qk_norm == "exact"
    return SourceAttention(
        wq=wq.contiguous(),
        wk=wk.contiguous(),
        wv=wv.contiguous(),
        wo=wo,
        bo=bo,
        rope_freqs=rope_freqs.to(wq.device),
        scale=float(getattr(attention, layout.scale_attr)),
        q_bias=_has_bias(fused or attention.get_submodule(layout.q)) and not exact_qk_norm,
        k_bias=_has_bias(fused or attention.get_submodule(layout.k)) and not exact_qk_norm,
        v_bias=_has_bias(fused or attention.get_submodule(layout.v)),
    )


@dataclass
class PreLatent:
    """The stage before the latent of a layer converted exactly from QK-norm: its `pre_latent` config entry, and
    the source's own query and key projections and norms (tensor names relative to the attention module, under
    the names `MFAAttention` gives them)."""

    spec: dict
    tensors: dict[str, torch.Tensor]


PRE_LATENT_NAMES = ("q_proj", "k_proj", "q_norm", "k_norm")


def pre_latent(layout: AttentionLayout, attention: nn.Module, config, variant: str) -> PreLatent:
    shape = head_shape(layout, attention, config)
    sources = (layout.q, layout.k, *layout.qk_norm)
    spec = {
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "q_bias": _has_bias(attention.get_submodule(layout.q)),
        "k_bias": _has_bias(attention.get_submodule(layout.k)),
        **norm_spec(layout, attention.get_submodule(layout.qk_norm[0]), shape.head_dim),
        "latent_reads_hidden": variant == "mfa-kr",
    }
    tensors = {
        f"{name}.{key}": tensor.detach()
        for source, name in zip(sources, PRE_LATENT_NAMES, strict=True)
        for key, tensor in attention.get_submodule(source).state_dict().items()
    }
    return PreLatent(spec, tensors)


def mfa_tensors(
    layout: AttentionLayout,
    layer: int,
    mfa: MFALayer,
    src: SourceAttention,
    dtype: torch.dtype,
    q_factors=None,
    pre: PreLatent | None = None,
) -> dict[str, torch.Tensor]:
    """Named tensors of one converted attention layer (the names `MFAAttention` expects). Where `dtype` is the
    layer's own, the projections are views of its tensors, not copies (the per-head query rows and output columns
    are the largest tensors of a conversion), and need not be contiguous."""
    prefix = layout.attention_prefix(layer)
    h, C, d1 = mfa.wq.shape
    out: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: torch.Tensor, bias: bool) -> None:
        out[f"{prefix}.{name}.weight"] = rows[:, :-1].to(dtype)
        if bias:
            out[f"{prefix}.{name}.bias"] = rows[:, -1].to(dtype).contiguous()

    if pre is not None:
        out.update(_pre_latent_tensors(prefix, mfa, pre, dtype))
    elif q_factors is None:
        linear("q_proj", mfa.wq.reshape(h * C, d1), src.q_bias)
    else:
        s_q, q_b = q_factors
        linear("q_a_proj", s_q, src.q_bias)
        out[f"{prefix}.q_b_proj.weight"] = q_b.to(dtype).contiguous()
    if pre is None:
        linear("k_proj", mfa.wk, src.k_bias)
    if mfa.wv is not None:
        wv = mfa.wv if pre is None else torch.cat([mfa.wv[:, : mfa.wo.shape[0]], mfa.wv[:, -1:]], 1)
        linear("v_proj", wv, src.v_bias)
    out[f"{prefix}.o_proj.weight"] = mfa.wo.reshape(mfa.wo.shape[0], -1).to(dtype)
    if mfa.bo is not None:
        out[f"{prefix}.o_proj.bias"] = mfa.bo.to(dtype).contiguous()
    return out


def _pre_latent_tensors(prefix: str, mfa: MFALayer, pre: PreLatent, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The source's projections and norms as they are, then the maps from the normalised queries (per head, q_mix
    (h, C, d_h)) and keys (and, MFA-KR, the hidden state: latent_proj) into the latent. The rows are over the
    inputs [x, k~, q~, 1] of `normalised_inputs`; what a map does not read must be zero."""
    d, h, g, dh = mfa.wo.shape[0], mfa.wq.shape[0], pre.spec["num_kv_heads"], pre.spec["head_dim"]
    keys, queries = slice(d, d + g * dh), slice(d + g * dh, d + (g + h) * dh)
    out = {f"{prefix}.{name}": tensor for name, tensor in pre.tensors.items()}
    q_mix = torch.stack([mfa.wq[i][:, queries][:, i * dh : (i + 1) * dh] for i in range(h)])
    reads = [mfa.wk[:, :d], mfa.wk[:, keys]] if pre.spec["latent_reads_hidden"] else [mfa.wk[:, keys]]
    if mfa.wk[:, queries].abs().max() > 0 or not pre.spec["latent_reads_hidden"] and mfa.wk[:, :d].abs().max() > 0:
        raise ValueError("the latent rows read inputs the latent map has no place for")
    out[f"{prefix}.q_mix"] = q_mix.to(dtype).contiguous()
    out[f"{prefix}.latent_proj.weight"] = torch.cat(reads, 1).to(dtype).contiguous()
    out[f"{prefix}.latent_proj.bias"] = mfa.wk[:, -1].to(dtype).contiguous()
    return out


def mfa_layer_config(
    mfa: MFALayer,
    src: SourceAttention,
    share_q_dim: int | None,
    softcap: float | None,
    pre: PreLatent | None = None,
) -> dict:
    """The per-layer entry of the converted config (see `MFAConfig.mfa_layers`)."""
    config = {
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
    if pre is not None:
        config["pre_latent"] = pre.spec
    return config


def mfa_module(
    config, variant: str, layout: AttentionLayout, layer_config: dict, tensors: dict[str, torch.Tensor], layer: int
) -> MFAAttention:
    """The converted attention of one layer as a module (for the output refit and the sequential pass), built on
    the meta device and given the converted tensors as they are (no random initialisation, no copy)."""
    mfa_config = MFAConfig(
        text_config=config.to_dict(), variant=variant, mfa_layers=[layer_config] * config.num_hidden_layers
    )
    mfa_config._attn_implementation = "sdpa"  # on a fresh text config: the source skeleton keeps its own
    with torch.device("meta"):
        module = MFAAttention(mfa_config, layer)
    prefix = layout.attention_prefix(layer) + "."
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True, assign=True)
    return module.eval()
