"""The generic reader and writer of attention tensors: one materialised source attention module (of any family in
`mfakit.families.LAYOUTS`) into the canonical `SourceAttention` of the factorization math, and a converted layer
into the named tensors, the per-layer config entry and the module of `MFAAttention`."""

from __future__ import annotations

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


def mfa_layer_config(mfa: MFALayer, src: SourceAttention, share_q_dim: int | None, softcap: float | None) -> dict:
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
