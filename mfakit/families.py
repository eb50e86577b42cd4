"""Model families as data: where each family keeps its decoder layers and attention, how its projections are
stored and which positions it uses (`AttentionLayout`, one entry per family in `LAYOUTS`), and what can be read
from a config and a weightless skeleton of the model (head shape, RoPE table, soft-cap) before any tensor is loaded.
Adding a family whose layout fits these fields is one more entry in `LAYOUTS`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from mfakit.checkpoint import CheckpointError, LazyCheckpoint
from mfakit.errors import MfakitError, first_line


class UnsupportedModelError(MfakitError):
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
    qk_norm: per-head (or per-projection) norm modules applied to queries and keys before RoPE; qk_norm_offset: what
    the norm adds to its weight (Gemma's norms multiply by 1 + weight).
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
    qk_norm_offset: float = 0.0
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


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS for t in layout.model_types)


def find_layout(config) -> AttentionLayout:
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


def check_shapes(skeleton: nn.Module, ckpt: LazyCheckpoint) -> None:
    """Name the first tensor whose stored shape is not the one the config implies, before any work is done (tensors
    the family's loader assembles from differently named ones, such as fused MoE experts, are checked on loading)."""
    for name, param in skeleton.named_parameters():
        if name in ckpt and ckpt.shape(name) != tuple(param.shape):
            raise CheckpointError(
                f"{ckpt.folder}: tensor {name} has shape {list(ckpt.shape(name))}, but the config implies "
                f"{list(param.shape)}"
            )


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


def logit_softcap(layout: AttentionLayout, config) -> float | None:
    return getattr(config, layout.softcap, None) if layout.softcap else None


def describe(layout: AttentionLayout, config, shape: HeadShape, rope_pairs: int, approximate_qk_norm: bool) -> str:
    """One line saying what was detected."""
    kind = "MHA" if shape.num_kv_heads == shape.num_heads else ("MQA" if shape.num_kv_heads == 1 else "GQA")
    if layout.rotary_path is None:
        positions = f"{layout.positions} positions (every channel NoPE)"
    elif 2 * rope_pairs < shape.head_dim:
        positions = f"partial RoPE ({2 * rope_pairs} of {shape.head_dim} channels; the rest NoPE)"
    else:
        positions = "RoPE"
    fused = f", fused {layout.qkv} ({layout.fused})" if layout.qkv else ""
    extras = ""
    if layout.qk_norm:
        extras = (
            ", QK-norm folded (approximate)"
            if approximate_qk_norm
            else ", QK-norm (exact: the latent reads the normalised keys)"
        )
    cap = logit_softcap(layout, config)
    extras += f", logit soft-cap {cap}" if cap else ""
    return (
        f"{config.model_type} ({layout.family} layout): {kind}, {shape.num_heads} query heads, "
        f"{shape.num_kv_heads} key/value heads of width {shape.head_dim}, {positions}{fused}{extras}"
    )


def meta_skeleton(config) -> nn.Module:
    """The source causal LM with every tensor on the meta device: structure and classes, no memory. In eval mode:
    calibration must not see dropout (GPT-2 and OPT configs default to 0.1). A config that builds no model (zero or
    missing heads, widths that do not divide) is a one-line error."""
    if not getattr(config, "num_hidden_layers", 1) or config.num_hidden_layers < 1:
        raise UnsupportedModelError(f"{config.model_type}: the config's num_hidden_layers must be at least 1")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False).eval()
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, KeyError, IndexError, RuntimeError) as err:
        # The family's own constructor judges its config; whatever it raises means the config is unusable.
        raise UnsupportedModelError(
            f"{config.model_type}: the config does not describe a model transformers can build "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err
