"""Calibration: run text through the source model one decoder layer at a time and gather, per layer, the second
moment of the attention input. Only one decoder layer's weights and the calibration hidden states are in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from mfakit.convert.io import LazyCheckpoint


def meta_skeleton(config) -> nn.Module:
    """The source causal LM with every tensor on the meta device: structure and classes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], init: Callable[[nn.Module], None]) -> nn.Module:
    """Give a meta module the checkpoint's tensors (all of its parameters and persistent buffers must be there),
    then recompute its non-persistent buffers (RoPE frequencies and the like) with the model's own initialiser."""
    module.load_state_dict(tensors, strict=True, assign=True)
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.to_empty(device="cpu", recurse=False)
            init(sub)
    return module


def load_module(skeleton: nn.Module, path: str, ckpt: LazyCheckpoint, device: str, dtype: torch.dtype) -> nn.Module:
    """Materialise the skeleton's submodule at `path` from the checkpoint, on device in dtype."""
    module = skeleton.get_submodule(path)
    prefix = f"{path}." if path else ""
    names = list(module.state_dict().keys())
    tensors = {n: ckpt.get(prefix + n) for n in names}
    materialize(module, tensors, skeleton._init_weights)
    return module.to(device=device, dtype=dtype)


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes to it and returns its input."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.store = store
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.store.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class LayerInputs:
    """The calibration batches as they enter the decoder layers: hidden states per batch, and per layer the extra
    arguments (masks, RoPE cos/sin, positions) the model passes to that layer for each batch."""

    hidden: list[torch.Tensor]
    layer_args: list[list[tuple[tuple, dict]]] = field(default_factory=list)


def embed(
    skeleton: nn.Module,
    layers_path: str,
    ckpt: LazyCheckpoint,
    batches: list[torch.Tensor],
    device: str,
    dtype: torch.dtype,
) -> LayerInputs:
    """Run the model's own forward with recorders in place of its decoder layers: what enters layer 0 (embeddings,
    learned positions, scaling) and the per-layer arguments come out exactly as the family computes them."""
    base_path = layers_path.rsplit(".", 1)[0]
    base = skeleton.get_submodule(base_path)
    layers_name = layers_path.rsplit(".", 1)[1]
    real_layers = getattr(base, layers_name)
    stores: list[list] = [[] for _ in real_layers]
    setattr(
        base,
        layers_name,
        nn.ModuleList(_Recorder(layer, store) for layer, store in zip(real_layers, stores, strict=True)),
    )
    try:
        load_module(skeleton, base_path, ckpt, device, dtype)
        with torch.no_grad():
            for ids in batches:
                base(input_ids=ids.to(device), use_cache=False)
    finally:
        setattr(base, layers_name, real_layers)
        for name, child in base.named_children():
            if name != layers_name:
                child.to("meta")  # frees the embeddings: the layers come next
    hidden = [h for h, _, _ in stores[0]]
    return LayerInputs(hidden=hidden, layer_args=[[(a, k) for _, a, k in store] for store in stores])


class SecondMoment:
    """Accumulates Sigma = E[x~ x~^T] of x~ = [x; 1] in float64 over every token seen."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        self.sum += (x.T @ x).cpu()
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


class _Stop(Exception):
    """Raised inside a forward pass once what was wanted has been recorded."""


@dataclass
class LayerRun:
    """What one pass of the calibration batches through a decoder layer recorded (None where not asked for)."""

    hidden: list[torch.Tensor] | None  # the layer's outputs: the next layer's inputs
    attn_in: list[torch.Tensor] | None  # the attention's input (after the layer's input norm)
    attn_out: list[torch.Tensor] | None  # the attention's output (before the residual add)


def run_layer(
    layer: nn.Module,
    attention: nn.Module,
    hidden: list[torch.Tensor],
    layer_args: list[tuple[tuple, dict]],
    *,
    attn_in: bool = False,
    attn_out: bool = False,
    outputs: bool = True,
) -> LayerRun:
    """Run each calibration batch through one decoder layer, recording the attention's input and output on the way.
    With outputs=False the pass stops at the attention's input (the rest of the layer is not computed)."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    results: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        ins.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        if not outputs:
            raise _Stop

    def post_hook(_module, _args, out):
        outs.append(out[0] if isinstance(out, tuple) else out)

    handles = []
    if attn_in or not outputs:
        handles.append(attention.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if attn_out:
        handles.append(attention.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            for h, (args, kwargs) in zip(hidden, layer_args, strict=True):
                try:
                    out = layer(h, *args, **kwargs)
                except _Stop:
                    continue
                results.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for handle in handles:
            handle.remove()
    return LayerRun(
        hidden=results if outputs else None,
        attn_in=ins if attn_in or not outputs else None,
        attn_out=outs if attn_out else None,
    )


def second_moment(batches: list[torch.Tensor]) -> torch.Tensor:
    """Sigma = E[x~ x~^T] of x~ = [x; 1] over every token of the batches, in float64."""
    moment = SecondMoment(batches[0].shape[-1])
    for x in batches:
        moment.update(x)
    return moment.value()
