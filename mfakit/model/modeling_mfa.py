# Multi-matrix Factorization Attention (MFA) and MFA-Key-Reuse (MFA-KR) for Hugging Face transformers.
#
# This file is self-contained: it imports only torch and transformers, and mfakit copies it verbatim into every
# converted checkpoint, so that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without
# mfakit installed.
#
# A converted model is its source model (any decoder family that transformers implements) with each decoder layer's
# attention replaced by `MFAAttention`; embeddings, norms, MLPs/experts and the head are the source family's own
# modules, with the source's tensor names.
#
# Per layer, with input x (batch, seq, hidden):
#   MFA:     q_c = x S_Q Q_c (h heads of width C), K = x S_K (1 head of width C), V = x S_V (1 head of width v_dim)
#   MFA-KR:  q_c as above, L = x S_K (1 head of width C); K = RoPE(L), V = L (the pre-RoPE latent is the value)
#   out = sum_c softmax(scale * RoPE(q_c) K^T) V O_c
# RoPE acts on channel pairs (p, p + C/2) with a per-layer frequency table `rope_freqs` (C/2 entries); a frequency of
# 0 is a NoPE pair (cos = 1, sin = 0: the pair passes through unchanged).
# The cache holds K (after RoPE) and V for MFA, and only the latent L for MFA-KR (its value slot is a zero-width
# tensor), so its size in bytes is 2C (MFA: C + v_dim) or C elements per token per layer.

import sys
import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Cache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

VARIANTS = ("mfa", "mfa-kr")


class MFAConfig(PreTrainedConfig):
    r"""Configuration of a model whose attention layers are MFA or MFA-KR.

    Args:
        text_config: the source model's configuration (any causal-LM family of transformers); it builds every
            non-attention module and answers every attribute this config does not define itself.
        variant: `"mfa"` or `"mfa-kr"`.
        layers_path: dotted path of the decoder-layer list inside the source model (e.g. `"model.layers"`).
        attention_name: attribute name of the attention module inside one decoder layer (e.g. `"self_attn"`).
        mfa_layers: one dict per decoder layer with keys `num_heads`, `kv_dim` (C), `v_dim` (value width; equals
            `kv_dim` for MFA-KR), `share_q_dim` (rank of the shared query down-projection, or None for an unfactored
            query), `q_norm` (RMSNorm between the query down- and up-projection), `q_norm_eps`, `rope_freqs`
            (`kv_dim // 2` angular frequencies, 0 for NoPE pairs), `softmax_scale`, `logit_softcap` (or None),
            `q_bias`, `k_bias`, `v_bias`, `o_bias`, and `pre_latent`: None, or for a source that normalises its
            queries and keys (QK-norm) the stage before the latent: `num_kv_heads`, `head_dim`, `q_bias`, `k_bias`
            (of the source's own projections), `norm_over` ("head" or "projection"), `norm_eps`, `norm_offset`
            (the norm multiplies by offset + weight) and `latent_reads_hidden` (MFA-KR: the latent also reads the
            hidden state, for its value channels).
        conversion: how the checkpoint was made (source, budget, calibration data, mfakit version).
    """

    model_type = "mfa"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    variant: str = "mfa"
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    mfa_layers: list | None = None
    conversion: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mfa_layers is not None:
            n_layers = self.text_config.num_hidden_layers
            if len(self.mfa_layers) != n_layers:
                raise ValueError(f"mfa_layers has {len(self.mfa_layers)} entries for {n_layers} decoder layers")

    def cached_numbers_per_layer(self) -> list[int]:
        """Numbers each layer caches per token: kv_dim + v_dim (MFA), kv_dim (MFA-KR: the latent alone)."""
        return [c["kv_dim"] + (0 if self.variant == "mfa-kr" else c["v_dim"]) for c in self.mfa_layers]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: source-model attributes (vocab_size, tie_word_embeddings, ...)
        # are answered by the source config, so the source family's own forward code can read them from here.
        text_config = self.__dict__.get("text_config")
        if name.startswith("__") or text_config is None or isinstance(text_config, dict):
            raise AttributeError(name)
        return getattr(text_config, name)


class MFARMSNorm(nn.Module):
    """RMS norm over the last dimension, computed in float32, times (offset + weight): offset 0 for most families,
    1 for Gemma's norms, whose weights store the difference from 1."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) - offset)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.offset + self.weight.to(torch.float32)) * x).to(dtype)


class MFAAttention(nn.Module):
    """One MFA / MFA-KR attention layer; a drop-in replacement for a transformers decoder layer's attention."""

    def __init__(self, config: MFAConfig, layer_idx: int):
        super().__init__()
        layer = config.mfa_layers[layer_idx]  # this layer's entry; the converter writes every key
        hidden = config.text_config.hidden_size
        self.config = config
        self.layer_idx = layer_idx
        self.key_reuse = config.variant == "mfa-kr"
        self.num_heads = layer["num_heads"]
        self.kv_dim = layer["kv_dim"]
        self.v_dim = self.kv_dim if self.key_reuse else layer["v_dim"]
        self.share_q_dim = layer["share_q_dim"]
        self.scaling = layer["softmax_scale"]
        self.logit_softcap = layer["logit_softcap"]
        self.is_causal = True
        if len(layer["rope_freqs"]) != self.kv_dim // 2 or self.kv_dim % 2:
            raise ValueError(f"layer {layer_idx}: rope_freqs needs kv_dim/2 = {self.kv_dim // 2} entries")
        q_out = self.num_heads * self.kv_dim
        self.pre = layer.get("pre_latent")
        if self.pre is not None:
            self._init_pre_latent(hidden)
        elif self.share_q_dim:
            self.q_a_proj = nn.Linear(hidden, self.share_q_dim, bias=layer["q_bias"])
            self.q_norm = MFARMSNorm(self.share_q_dim, layer.get("q_norm_eps", 1e-6)) if layer["q_norm"] else None
            self.q_b_proj = nn.Linear(self.share_q_dim, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_out, bias=layer["q_bias"])
        if self.pre is None:
            self.k_proj = nn.Linear(hidden, self.kv_dim, bias=layer["k_bias"])
        if not self.key_reuse:
            self.v_proj = nn.Linear(hidden, self.v_dim, bias=layer["v_bias"])
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=layer["o_bias"])
        # Kept as numbers, not a buffer: a buffer would be cast by model.to(bfloat16) and left empty by meta init.
        freqs = [float(f) for f in layer["rope_freqs"]]
        # The converter puts NoPE pairs last; only the pairs up to the last rotating one are rotated.
        self.rotary_pairs = max((p + 1 for p, f in enumerate(freqs) if f != 0), default=0)
        self.has_rope = self.rotary_pairs > 0
        self.rope_freqs_list = freqs[: self.rotary_pairs]
        self._rope_freqs: dict[torch.device, torch.Tensor] = {}

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on x (batch, heads, seq, C) at positions (batch, seq): pair p = channels (p, p + C/2) turns by
        position * rope_freqs[p]. The angles are computed for the rotating pairs only: MFA-KR rotates its whole
        cached latent at every step, and its cos/sin were the largest cost of decoding."""
        n, half = self.rotary_pairs, self.kv_dim // 2
        if x.device not in self._rope_freqs:
            self._rope_freqs[x.device] = torch.tensor(self.rope_freqs_list, dtype=torch.float32, device=x.device)
        angles = positions.to(torch.float32)[:, None, :, None] * self._rope_freqs[x.device]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., :n], x[..., half : half + n]
        return torch.cat((x1 * cos - x2 * sin, x[..., n:half], x2 * cos + x1 * sin, x[..., half + n :]), dim=-1)

    def _init_pre_latent(self, hidden: int) -> None:
        """The source's own query and key projections and norms (same tensor names as the source), then per head a
        query map into latent coordinates and one map of the normalised keys (and, MFA-KR, the hidden state) into
        the latent. Exact at full budget for QK-norm families, whose keys are not linear in the hidden state."""
        pre, h = self.pre, self.num_heads
        g, dh = pre["num_kv_heads"], pre["head_dim"]
        self.q_proj = nn.Linear(hidden, h * dh, bias=pre["q_bias"])
        self.k_proj = nn.Linear(hidden, g * dh, bias=pre["k_bias"])
        per_head = pre["norm_over"] == "head"
        self.q_norm = MFARMSNorm(dh if per_head else h * dh, pre["norm_eps"], pre["norm_offset"])
        self.k_norm = MFARMSNorm(dh if per_head else g * dh, pre["norm_eps"], pre["norm_offset"])
        self.q_mix = nn.Parameter(torch.zeros(h, self.kv_dim, dh))
        reads = g * dh + (hidden if pre["latent_reads_hidden"] else 0)
        self.latent_proj = nn.Linear(reads, self.kv_dim, bias=True)

    def _normed(self, y: torch.Tensor, norm: nn.Module, heads: int) -> torch.Tensor:
        """A source projection's output (batch, seq, heads * d_h) through its norm, as (batch, seq, heads, d_h)."""
        shape = (*y.shape[:-1], heads, self.pre["head_dim"])
        return norm(y.view(shape)) if self.pre["norm_over"] == "head" else norm(y).view(shape)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (batch, h, seq, C) and the latent (batch, 1, seq, C) of the hidden states x (batch, seq, d)."""
        bsz, seq, _ = x.shape
        if self.pre is not None:
            q = torch.einsum("bshd,hcd->bhsc", self._normed(self.q_proj(x), self.q_norm, self.num_heads), self.q_mix)
            keys = self._normed(self.k_proj(x), self.k_norm, self.pre["num_kv_heads"]).flatten(2)
            latent = self.latent_proj(torch.cat([x, keys], -1) if self.pre["latent_reads_hidden"] else keys)
            return q, latent[:, None]
        if self.share_q_dim:
            q = self.q_a_proj(x)
            q = self.q_b_proj(q if self.q_norm is None else self.q_norm(q))
        else:
            q = self.q_proj(x)
        q = q.view(bsz, seq, self.num_heads, self.kv_dim).transpose(1, 2)
        return q, self.k_proj(x)[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers passes the cache as `cache` (Llama-like families), `layer_past` (Falcon, GPT-NeoX) or, in
        # older code paths, `past_key_values`.
        cache = cache if cache is not None else kwargs.get("past_key_values", kwargs.get("layer_past"))
        bsz, seq, _ = hidden_states.shape
        q, latent = self.project(hidden_states)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if isinstance(past, torch.Tensor):
            past = past.clone()  # a static cache's length is a tensor that its update increments in place
        if position_ids is None and self.has_rope:
            position_ids = torch.arange(past, past + seq, device=hidden_states.device)[None]
        if self.has_rope:
            q = self.rotate(q, position_ids)
        if self.key_reuse:
            key, value = self._reused_key_value(latent, position_ids, cache, past)
        else:
            key = self.rotate(latent, position_ids) if self.has_rope else latent
            value = self.v_proj(hidden_states)[:, None]
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
        out, weights = self.attend(q, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.v_dim)
        return self.o_proj(out), weights

    def _reused_key_value(
        self, latent: torch.Tensor, position_ids: torch.Tensor | None, cache: Cache | None, past: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MFA-KR: the cache keeps the pre-RoPE latent (its value slot is zero-width); the value is the latent, the
        key the latent rotated at each cached token's position. Slot s of what the cache returns holds cache
        position kv_offset + s (the offset the cache reports for its masks before this update: 0, or the first
        position a sliding window keeps), and positions run alongside cache positions, shifted per row by left
        padding; so this holds for dynamic, static, sliding-window and quantized caches alike."""
        seq = latent.shape[2]
        if cache is not None:
            _, first = cache.get_mask_sizes(seq, self.layer_idx)
            latent, _ = cache.update(latent, latent[..., :0], self.layer_idx)
        if not self.has_rope:
            return latent, latent
        key_pos = position_ids
        if cache is not None:
            shift = position_ids[:, -1:] - (past + seq - 1)
            key_pos = shift + first + torch.arange(latent.shape[2], device=latent.device)
        return self.rotate(latent, key_pos), latent

    def attend(
        self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of h query heads (batch, h, seq, C) on one shared key/value head (batch, 1, kv_len, C);
        the shared head is broadcast, never repeated per query head."""
        dropout = getattr(self.config.text_config, "attention_dropout", 0.0) if self.training else 0.0
        dropout = dropout if isinstance(dropout, float) else 0.0
        if mask is not None and mask.dim() == 4:
            mask = mask[..., : key.shape[2]]
        if self.config._attn_implementation == "eager" or self.logit_softcap is not None:
            scores = torch.matmul(q, key.transpose(2, 3)) * self.scaling
            if self.logit_softcap is not None:
                scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            return torch.matmul(weights, value), weights
        bsz, heads, seq, _ = q.shape
        # Without a mask, causal from the top-left over every key, as transformers' own SDPA attention does: a
        # static cache's prefill relies on it (its buffer holds the prompt in the first slots).
        is_causal = seq > 1 and mask is None
        if seq == 1:
            # Decoding: the heads become the query length of one shared head, which every SDPA kernel takes.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), key, value, attn_mask=mask, dropout_p=dropout, scale=self.scaling
            )
            return out.transpose(1, 2), None
        out = F.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, dropout_p=dropout, scale=self.scaling, is_causal=is_causal, enable_gqa=True
        )
        return out, None


class MFAPreTrainedModel(PreTrainedModel):
    config: MFAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        # The source family's initialiser covers its own modules and ours (nn.Linear, and *RMSNorm by name).
        self._source_class._init_weights(self, module)


class _SourceMethod:
    """A method of the source family's causal-LM class, bound to the converted model: the source's own signature,
    which generate() reads to decide what to pass (position_ids built from the attention mask, the mask inferred
    from padding, logits_to_keep for a one-position prefill). Requires of the source class what transformers'
    causal LMs give: methods that do not rely on zero-argument super()."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None or "_source_class" not in model.__dict__:
            return self
        return types.MethodType(getattr(model._source_class, self.name), model)


class MFAForCausalLM(MFAPreTrainedModel, GenerationMixin):
    """The source family's causal LM with MFA attention. Its submodules and tensor names are the source model's,
    and its forward (with its signature) is the source family's forward, borrowed: this requires of the source
    class only that its forward and embedding accessors use no zero-argument super(), as transformers' do."""

    def __init__(self, config: MFAConfig):
        super().__init__(config)
        source = AutoModelForCausalLM.from_config(config.text_config)
        self._source_class = type(source)
        # The source's own base-model attribute (`model`, `transformer`, `gpt_neox`, ...), so that `base_model` and
        # the embedding accessors find it.
        self.base_model_prefix = source.base_model_prefix
        self._tied_weights_keys = source._tied_weights_keys
        self._no_split_modules = source._no_split_modules
        for name, child in source.named_children():
            self.add_module(name, child)
        for name, value in vars(source).items():  # plain attributes the source's forward reads (logit_scale, ...)
            if not name.startswith("_") and name not in vars(self):
                setattr(self, name, value)
        for idx, layer in enumerate(self.get_submodule(config.layers_path)):
            setattr(layer, config.attention_name, MFAAttention(config, idx))
        _record_mfa_attentions(self)
        _register_peft_targets()
        self.post_init()

    forward = _SourceMethod()
    get_input_embeddings = _SourceMethod()
    set_input_embeddings = _SourceMethod()
    get_output_embeddings = _SourceMethod()
    set_output_embeddings = _SourceMethod()


def _record_mfa_attentions(model: nn.Module) -> None:
    """Let output_attentions see MFA layers: transformers records attention weights by hooking the classes a base
    model lists under "attentions" (the source's own attention class), so MFAAttention joins that list. The list
    is kept per base-model class; source models of that class have no MFA layers and record as before."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry records through the class attribute alone
        _CAN_RECORD_REGISTRY = None
    for module in model.modules():
        recorded = dict(getattr(module, "_can_record_outputs", None) or {})
        if module is model or "attentions" not in recorded:
            continue
        specs = recorded["attentions"] if isinstance(recorded["attentions"], list) else [recorded["attentions"]]
        if MFAAttention not in specs:
            recorded["attentions"] = [*specs, MFAAttention]
            type(module)._can_record_outputs = recorded
            if _CAN_RECORD_REGISTRY is not None:
                _CAN_RECORD_REGISTRY[module] = recorded


# PEFT's default LoRA targets for model_type "mfa": the query and the cached projections (in MFA-KR the latent is
# the value too), as its Llama default takes the query and value projections.
PEFT_LORA_TARGETS = ["q_proj", "q_b_proj", "k_proj", "v_proj"]


def _register_peft_targets() -> None:
    """Give PEFT default target modules for model_type "mfa" when PEFT is in use (imported): `LoraConfig()` without
    target_modules then works as for the source. PEFT is not imported here (it is slow to import and optional)."""
    constants = sys.modules.get("peft.utils.constants")
    if constants is not None:
        constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MFAConfig.model_type, PEFT_LORA_TARGETS)


MFAConfig.register_for_auto_class()
MFAForCausalLM.register_for_auto_class("AutoModelForCausalLM")
