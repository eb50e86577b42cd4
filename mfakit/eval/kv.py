"""KV-cache cost: bytes per token measured on a real cache after a real forward pass, beside the formula."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from mfakit.errors import OptionsError
from mfakit.families import source_kv_width


@dataclass
class KVReport:
    model: str
    kind: str  # "source", "mfa" or "mfa-kr"
    context: int
    batch: int
    dtype: str
    measured_bytes: int
    measured_bytes_per_token: float
    measured_bytes_per_token_per_layer: list[float]
    formula_bytes_per_token: float
    formula_bytes_per_token_per_layer: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def cached_numbers_per_token(config) -> tuple[str, list[int], list[int | None]]:
    """(kind, numbers cached per token for each layer, sliding window of each layer or None).

    Source (GQA/MHA): g * (d_h + d_v) = 2 g d_h. MFA: kv_dim + v_dim. MFA-KR: kv_dim (the latent alone).
    """
    text = config.get_text_config(decoder=True)
    n_layers = text.num_hidden_layers
    # The cache layers transformers builds for this config decide which layers keep only a window.
    _, layer_kwargs = get_layer_types_and_kwargs(text)
    windows = [kw.get("sliding_window") for kw in layer_kwargs]
    if getattr(config, "model_type", None) == "mfa":
        return config.variant, config.cached_numbers_per_layer(), windows
    return "source", [2 * source_kv_width(text)] * n_layers, windows


def cache_bytes_per_layer(cache) -> list[int]:
    """Bytes held by each layer of a transformers cache (keys and values, each storage counted once)."""
    out = []
    for layer in cache.layers:
        seen, total = set(), 0
        for t in (layer.keys, layer.values):
            if t is None or t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        out.append(total)
    return out


@torch.no_grad()
def measure_kv(model, context: int, batch: int) -> list[int]:
    """Run a real forward pass of `batch` sequences of `context` tokens with a cache; bytes cached per layer."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    return cache_bytes_per_layer(cache)


def kv_report(model: torch.nn.Module, context: int = 256, batch: int = 1, name: str = "") -> KVReport:
    """Cache bytes of a loaded model after a real forward pass of `batch` x `context` tokens, per layer and in
    total, beside the formula (sliding-window layers keep at most their window); `name` labels the report."""
    if context < 1 or batch < 1:
        raise OptionsError("context and batch must be positive")
    kind, numbers, windows = cached_numbers_per_token(model.config)
    element = next(model.parameters()).element_size()
    measured = measure_kv(model, context, batch)
    tokens = context * batch
    formula = [
        n * element * min(context, (w - 1) if w else context) / context for n, w in zip(numbers, windows, strict=True)
    ]
    return KVReport(
        model=name,
        kind=kind,
        context=context,
        batch=batch,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        measured_bytes=sum(measured),
        measured_bytes_per_token=sum(measured) / tokens,
        measured_bytes_per_token_per_layer=[m / tokens for m in measured],
        formula_bytes_per_token=sum(formula),
        formula_bytes_per_token_per_layer=formula,
    )
