"""Model families as data: where each family keeps its decoder layers and attention, how its projections are
stored and which positions it uses (`AttentionLayout`, one entry per family in `LAYOUTS`), and what can be read
from a config and a weightless skeleton of the model (head shape, RoPE table, soft-cap) before any tensor is loaded.
Adding a family whose layout fits these fields is one more entry in `LAYOUTS`."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    rope_interleaved: RoPE pairs channels (2i, 2i+1) of the rotary part (GLM-4, ERNIE-4.5, Helium, Cohere-2) rather
    than transformers' usual (t, t + P); read in the usual order by permuting every head's query and key channels.
    rope_layers: which layers rotate, by a rule of ROPE_RULES (None: all): SmolLM3 and Cohere-2 leave some layers
    without positions (NoPE), and those convert with every channel NoPE.
    refuse: (config attribute, value, reason) triples this layout cannot express (value NOT_NONE: any set value).
    unsupported: model types the layout's family also has, refused with the reason given.
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
    rope_interleaved: bool = False
    rope_layers: str | None = None
    refuse: tuple[tuple[str, object, str], ...] = ()
    positions: str = "RoPE"

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}.{self.attention_name}"


NOT_NONE = object()  # a `refuse` value matching any setting but None
LLAMA_LIKE = (
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "mixtral",
    "qwen2_moe",
    "gemma",
    "gemma2",
    "granite",
    "seed_oss",
    "arcee",
)
LAYOUTS = (
    AttentionLayout(family="llama", model_types=LLAMA_LIKE, softcap="attn_logit_softcapping"),
    AttentionLayout(
        family="llama, interleaved RoPE",
        model_types=("glm4", "ernie4_5", "ernie4_5_moe", "helium"),
        rope_interleaved=True,
    ),
    AttentionLayout(
        family="cohere2",
        model_types=("cohere2",),
        rope_interleaved=True,
        rope_layers="sliding layers",
    ),
    AttentionLayout(family="smollm3", model_types=("smollm3",), rope_layers="use_rope"),
    AttentionLayout(
        family="qk-norm",
        model_types=("qwen3", "qwen3_moe", "olmo2", "olmo3", "apertus", "olmoe", "glm4_moe"),
        qk_norm=("q_norm", "k_norm"),
        refuse=(("clip_qkv", NOT_NONE, "clamped queries, keys and values (clip_qkv)"),),
    ),
    AttentionLayout(
        family="exaone4",
        model_types=("exaone4",),
        qk_norm=("q_norm", "k_norm"),
        rope_layers="sliding layers when windowed",
    ),
    AttentionLayout(
        family="gemma3",
        model_types=("gemma3_text",),
        qk_norm=("q_norm", "k_norm"),
        qk_norm_offset=1.0,
        refuse=(("use_bidirectional_attention", True, "bidirectional attention"),),
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
# Model types whose decoder layers norm or scale the attention's output before adding it to the residual stream
# (sandwich norms; Granite's residual multiplier). Elsewhere the stream after the attention is the stream before it
# plus the attention's output, whether the MLP follows it or runs beside it.
ATTENTION_OUTPUT_TRANSFORMED = frozenset({"gemma2", "gemma3_text", "glm4", "olmo2", "olmo3", "exaone4", "granite"})


def adds_attention_output(model_type: str) -> bool:
    """Whether the family's decoder layer adds the attention's output to the residual stream as it is."""
    return model_type not in ATTENTION_OUTPUT_TRANSFORMED


DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
# Whether layer i rotates its queries and keys, read off the (weightless) source attention module and config.
ROPE_RULES = {
    "use_rope": lambda attention, config: bool(attention.use_rope),
    "sliding layers": lambda attention, config: attention.sliding_window is not None,
    "sliding layers when windowed": lambda attention, config: config.sliding_window is None or attention.is_sliding,
}
# Families transformers implements whose attention no MFA layer reproduces exactly; refused with the reason.
NOT_EXACT = {
    "hunyuan_v1_dense": "its query/key norms come after RoPE with per-channel weights, which makes the logits depend "
    "on absolute positions",
    "llama4_text": "its NoPE layers scale queries by a position-dependent temperature",
    "llama4": "its NoPE layers scale queries by a position-dependent temperature",
    "gemma3": "the multimodal checkpoint nests its text model; convert a gemma3_text checkpoint",
}


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS for t in layout.model_types)


def find_layout(config) -> AttentionLayout:
    """The layout of a source config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "mfa":
        raise UnsupportedModelError("the source is already an MFA checkpoint")
    if model_type in NOT_EXACT:
        raise UnsupportedModelError(f"{model_type} cannot be converted exactly: {NOT_EXACT[model_type]}")
    layout = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
    if layout is None:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r} (supported: {', '.join(supported_model_types())})"
        )
    for attr, value, reason in layout.refuse:
        setting = getattr(config, attr, None)
        if setting == value or (value is NOT_NONE and setting is not None):
            raise UnsupportedModelError(f"{model_type} with {attr}={setting}: {reason} are not supported")
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


def rope_tables(layout: AttentionLayout, config, skeleton: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """Per decoder layer, the RoPE frequencies (P,) and cos/sin scaling of the source, from its own rotary module
    (a table per layer type where the family keeps one, as Gemma-3 and OLMo-3 do); P = 0 on layers without
    positions (no rotary module, or NoPE layers by the layout's `rope_layers` rule)."""
    none = (torch.zeros(0, dtype=torch.float64), 1.0)
    if layout.rotary_path is None:
        return [none] * config.num_hidden_layers
    rope = getattr(config, "rope_parameters", None) or {}
    for params in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
        if params.get("rope_type") in DYNAMIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {params['rope_type']!r} changes its frequencies with the sequence length; MFA keeps a "
                "fixed table"
            )
    rotary = type(skeleton.get_submodule(layout.rotary_path))(config=config)
    layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    tables = []
    for i, layer_type in enumerate(layer_types):
        attention = skeleton.get_submodule(layout.attention_prefix(i))
        if layout.rope_layers is not None and not ROPE_RULES[layout.rope_layers](attention, config):
            tables.append(none)
            continue
        per_type = layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq")
        prefix = f"{layer_type}_" if per_type else ""
        scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        tables.append((getattr(rotary, f"{prefix}inv_freq").to(torch.float64), scaling))
    return tables


def logit_softcap(layout: AttentionLayout, config) -> float | None:
    return getattr(config, layout.softcap, None) if layout.softcap else None


def with_present_norms(layout: AttentionLayout, attention: nn.Module) -> AttentionLayout:
    """The layout as this model has it: without QK-norm where its attention has no norm modules (GLM-4-MoE
    normalises only with use_qk_norm). Any other module with weights in the attention, which the layout would not
    read, is refused rather than silently dropped."""
    if layout.qk_norm and not all(hasattr(attention, name) for name in layout.qk_norm):
        layout = replace(layout, qk_norm=None)
    read = {layout.q, layout.k, layout.v, layout.o, layout.qkv, *(layout.qk_norm or ())}
    unread = [name for name, child in attention.named_children() if name not in read and any(child.parameters())]
    if unread:
        raise UnsupportedModelError(
            f"the {layout.family} attention has weights in {unread[0]!r}, which mfakit does not read"
        )
    return layout


def describe(
    layout: AttentionLayout,
    config,
    shape: HeadShape,
    tables: list[tuple[torch.Tensor, float]],
    approximate_qk_norm: bool,
) -> str:
    """One line saying what was detected."""
    kind = "MHA" if shape.num_kv_heads == shape.num_heads else ("MQA" if shape.num_kv_heads == 1 else "GQA")
    pairs = max(freqs.shape[0] for freqs, _ in tables)
    if layout.rotary_path is None:
        positions = f"{layout.positions} positions (every channel NoPE)"
    elif 2 * pairs < shape.head_dim:
        positions = f"partial RoPE ({2 * pairs} of {shape.head_dim} channels; the rest NoPE)"
    else:
        positions = "RoPE"
    if layout.rope_interleaved:
        positions += " on interleaved pairs (read reordered)"
    nope = sum(freqs.shape[0] == 0 for freqs, _ in tables)
    if layout.rotary_path is not None and nope:
        positions += f", no positions on {nope} of {len(tables)} layers"
    if len({tuple(f.tolist()) for f, _ in tables if f.shape[0]}) > 1:
        positions += ", a RoPE table per layer type"
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


def source_kv_width(config) -> int:
    """g * d_h of a source model: from its family's layout when mfakit knows it (Falcon's MQA and fused layouts say
    it only in their weight shapes), else from the config's head counts."""
    try:
        layout = find_layout(config)
    except UnsupportedModelError:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    attention = meta_skeleton(config).get_submodule(layout.attention_prefix(0))
    shape = head_shape(layout, attention, config)
    return shape.num_kv_heads * shape.head_dim


def cache_share(config) -> float:
    """The KV cache a model keeps per token as a share of its source's: sum over layers of the numbers each caches
    (`MFAConfig.cached_numbers_per_layer`) over layers x 2 g d_h; 1.0 for a model that is not a conversion."""
    if getattr(config, "model_type", None) != "mfa":
        return 1.0
    source = 2 * source_kv_width(config.get_text_config(decoder=True))
    return sum(config.cached_numbers_per_layer()) / (len(config.mfa_layers) * source)
