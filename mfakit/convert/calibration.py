"""Calibration: run text through the model one decoder layer at a time and record, per layer, what the conversion
needs (the attention's input and output, the second moment of the input, the readout refit's data). Only one
decoder layer's weights and the calibration hidden states are in memory.

Loading goes through transformers' own loader (`convert_and_load_state_dict_in_model` with the family's
conversion mapping), so fused MoE experts and legacy names load exactly as `from_pretrained` loads them. These are
transformers internals, not public API: the `<6` pin in pyproject.toml covers them, and they are the first thing
to check when a new transformers release breaks conversion."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from mfakit.checkpoint import CheckpointError, LazyCheckpoint, all_finite
from mfakit.convert.readout import ReadoutSamples, ReadoutStats, add_gram_, mirror_gram_
from mfakit.texts import mixed_windows, parse_text_spec

CALIBRATION_BATCH = 8  # sequences per forward pass


def _rebuild_meta_buffers(module: nn.Module, init: Callable[[nn.Module], None]) -> None:
    """Recompute non-persistent buffers (RoPE frequencies, embedding scales) with the model's own initialiser; the
    loaded tensors of the same submodule are put back, since the initialiser would overwrite them too."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            # to_empty swaps a parameter's .data in place, so the loaded data is kept, not the Parameter.
            params = {n: p.data for n, p in sub.named_parameters(recurse=False) if not p.is_meta}
            buffers = {n: b for n, b in sub.named_buffers(recurse=False) if not b.is_meta}
            sub.to_empty(device="cpu", recurse=False)
            init(sub)
            for n, data in params.items():
                getattr(sub, n).data = data
            for n, buffer in buffers.items():
                setattr(sub, n, buffer)


def _match_checkpoint_dtypes(module: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Give each meta parameter the dtype its checkpoint tensor has (the loader casts to the parameter's dtype,
    which follows config.dtype); parameters the family's loader assembles from differently named tensors (fused
    experts) take the checkpoint's most common floating dtype. Pass-through then stays bit-identical."""
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if not floating:
        return
    common = max(set(floating), key=floating.count)
    for name, param in list(module.named_parameters()):
        want = state[prefix + name].dtype if prefix + name in state else common
        if param.is_meta and param.dtype != want:
            owner, _, leaf = name.rpartition(".")
            meta = torch.empty(param.shape, dtype=want, device="meta")
            module.get_submodule(owner)._parameters[leaf] = nn.Parameter(meta, requires_grad=param.requires_grad)


def load_module(
    skeleton: PreTrainedModel,
    path: str,
    ckpt: LazyCheckpoint,
    exclude: tuple[str, ...] = (),
) -> nn.Module:
    """Materialise the skeleton's submodule at `path` (on the CPU, in the checkpoint's dtype) from the checkpoint
    tensors under that prefix, less those under `exclude`. transformers' own loader does the reading, so a family's
    on-disk names and layouts (per-expert MoE tensors, legacy names) become its module's parameters exactly as
    `from_pretrained` makes them; every parameter of the submodule outside `exclude` must be found."""
    module = skeleton.get_submodule(path)
    prefix = f"{path}." if path else ""
    names = [n for n in ckpt.names() if n.startswith(prefix) and not (exclude and n.startswith(exclude))]
    state = {n: ckpt.get(n) for n in names}
    _match_checkpoint_dtypes(module, prefix, state)
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        convert_and_load_state_dict_in_model(
            skeleton, state, LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(skeleton))
        )
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    skeleton.tie_weights()  # a tied head is absent from the checkpoint and shares the embedding once loaded
    missing = [n for n, p in module.named_parameters() if p.is_meta and not (prefix + n).startswith(exclude or "\0")]
    if missing:
        raise CheckpointError(f"{ckpt.folder}: tensor {prefix}{missing[0]} is missing")
    for name, tensor in module.state_dict().items():
        if not tensor.is_meta and tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"{ckpt.folder}: tensor {prefix}{name} holds NaN or infinite values")
    _rebuild_meta_buffers(module, skeleton._init_weights)
    return module


@contextmanager
def layers_swapped(skeleton: nn.Module, layers_path: str, stand_ins: nn.ModuleList) -> Iterator[None]:
    """The skeleton with `stand_ins` in place of its decoder-layer list for the duration of the block."""
    base_path, name = layers_path.rsplit(".", 1)
    base = skeleton.get_submodule(base_path)
    layers = getattr(base, name)
    setattr(base, name, stand_ins)
    try:
        yield
    finally:
        setattr(base, name, layers)


def free_outside_layers(skeleton: nn.Module, layers_path: str) -> None:
    """Return every tensor outside the decoder layers to the meta device."""
    with layers_swapped(skeleton, layers_path, nn.ModuleList()):
        skeleton.to("meta")


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes to it and returns its input."""

    def __init__(self, layer: nn.Module, store: list, as_tuple: bool):
        super().__init__()
        self.store = store
        self.as_tuple = as_tuple
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.store.append((hidden_states, args, kwargs))
        return (hidden_states,) if self.as_tuple else hidden_states


@dataclass
class LayerInputs:
    """The calibration batches as they enter the decoder layers: hidden states per batch, and per layer the extra
    arguments (masks, RoPE cos/sin, positions) the model passes to that layer for each batch."""

    hidden: list[torch.Tensor]
    layer_args: list[list[tuple[tuple, dict]]] = field(default_factory=list)


def record_layer_inputs(
    skeleton: nn.Module,
    layers_path: str,
    ckpt: LazyCheckpoint,
    batches: list[torch.Tensor],
    device: str,
    dtype: torch.dtype,
    layer_returns_tuple: bool = False,
) -> LayerInputs:
    """Run the model's own forward with recorders in place of its decoder layers: what enters layer 0 (embeddings,
    learned positions, scaling) and the per-layer arguments come out exactly as the family computes them."""
    base_path = layers_path.rsplit(".", 1)[0]
    real_layers = skeleton.get_submodule(layers_path)
    stores: list[list] = [[] for _ in real_layers]
    recorders = nn.ModuleList(
        _Recorder(layer, store, layer_returns_tuple) for layer, store in zip(real_layers, stores, strict=True)
    )
    try:
        with layers_swapped(skeleton, layers_path, recorders):
            base = load_module(skeleton, base_path, ckpt, exclude=(f"{layers_path}.",)).to(device=device, dtype=dtype)
            with torch.no_grad():
                for ids in batches:
                    base(input_ids=ids.to(device), use_cache=False)
    finally:
        free_outside_layers(skeleton, layers_path)  # the embeddings: the layers come next
    hidden = [h for h, _, _ in stores[0]]
    return LayerInputs(hidden=hidden, layer_args=[[(a, k) for _, a, k in store] for store in stores])


class SecondMoment:
    """Accumulates Sigma = E[x~ x~^T] of x~ = [x; 1] in float64 over every token seen, on `device` (where the
    calibration runs: the tokens never leave it)."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        if weights is None:
            add_gram_(self.sum, x)
            self.count += x.shape[0]
            return
        w = weights.reshape(-1, 1).to(x)
        add_gram_(self.sum, x * w.sqrt())
        self.count += float(w.sum())

    def value(self) -> torch.Tensor:
        return mirror_gram_(self.sum) / max(self.count, 1)


class _Stop(Exception):
    """Raised inside a forward pass once what was wanted has been recorded."""


def _floating_own_tensors(module: nn.Module, dtype: torch.dtype) -> list[tuple[dict, str]]:
    """(dict, name) of the module's own floating parameters and buffers (not its children's) not in `dtype`."""
    found = []
    for table in (module._parameters, module._buffers):
        found += [(table, n) for n, t in table.items() if t is not None and t.is_floating_point() and t.dtype != dtype]
    return found


@contextmanager
def computing_in(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run the module's forward passes in `dtype` while its tensors stay stored as they are: each submodule's own
    parameters and buffers are cast when its forward starts and the stored tensors put back when it ends. The
    results are those of `module.to(dtype)` (the same casts of the same tensors), but only one submodule's cast
    copies exist at a time instead of the whole layer's: a bfloat16 decoder layer computing in float32 holds its
    largest matrix in float32, not all of them. A parameter that a parent reads from a child without calling it
    stays in its stored dtype (a matrix product then fails loudly; the families supported do not do this)."""
    stored: dict[tuple[int, str], torch.Tensor] = {}

    def cast(sub: nn.Module, *_) -> None:
        for table, name in _floating_own_tensors(sub, dtype):
            if (id(table), name) not in stored:
                stored[(id(table), name)] = table[name]
                _swap(table, name, table[name].detach().to(dtype))

    def restore(sub: nn.Module, *_) -> None:
        for table in (sub._parameters, sub._buffers):
            for name in list(table):
                if (id(table), name) in stored:
                    _swap(table, name, stored.pop((id(table), name)))

    handles, subs = [], [sub for sub in module.modules() if _floating_own_tensors(sub, dtype)]
    for sub in subs:
        handles.append(sub.register_forward_pre_hook(cast))
        handles.append(sub.register_forward_hook(restore, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for sub in subs:
            restore(sub)  # after an exception inside a forward (the recorders' _Stop), whatever is still cast


def _swap(table: dict, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the module's parameter or buffer slot `name` (a parameter as a parameter)."""
    old = table[name]
    table[name] = nn.Parameter(tensor, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else tensor


@dataclass
class LayerRun:
    """What one pass of the calibration batches through a decoder layer recorded (None where not asked for)."""

    hidden: list[torch.Tensor] | None  # the layer's outputs: the next layer's inputs
    attn_in: list[torch.Tensor] | None  # the attention's input (after the layer's input norm)
    attn_out: list[torch.Tensor] | None  # the attention's output (before the residual add)
    attn_mass: list[torch.Tensor] | None = None  # (batch, tokens): attention each token receives, mean over heads


def run_layer(
    layer: nn.Module,
    attention: nn.Module,
    hidden: list[torch.Tensor],
    layer_args: list[tuple[tuple, dict]],
    *,
    attn_in: bool = False,
    attn_out: bool = False,
    attn_mass: bool = False,
    outputs: bool = True,
) -> LayerRun:
    """Run each calibration batch through one decoder layer, recording the attention's input and output on the way,
    and with attn_mass the attention each token receives (eager attention, whose probabilities are its second
    output, with the batch's mask made additive: `_additive_mask`).
    With outputs=False the pass stops at the attention's input (the rest of the layer is not computed). The layer
    computes in the dtype of the hidden states (`computing_in`), whatever dtype its tensors are stored in."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    results: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        ins.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        if not outputs:
            raise _Stop

    masses: list[torch.Tensor] = []

    def post_hook(_module, _args, out):
        if attn_out:
            outs.append(out[0] if isinstance(out, tuple) else out)
        if attn_mass:
            # Summed over the queries in float32 (at most `tokens` terms in [0, 1], kept to 1e-7), then in float64:
            # a float64 sum over the (batch, heads, tokens, tokens) probabilities took 20 times as long.
            masses.append(out[1].sum(dim=2, dtype=torch.float32).to(torch.float64).mean(dim=1))

    handles = []
    if attn_in or not outputs:
        handles.append(attention.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if attn_out or attn_mass:
        handles.append(attention.register_forward_hook(post_hook))
    if attn_mass:
        handles.append(attention.register_forward_pre_hook(_additive_mask, with_kwargs=True))
        config = attention.config
        implementation = config._attn_implementation
        config._attn_implementation = "eager"  # the one implementation that returns the probabilities
    try:
        with torch.no_grad(), computing_in(layer, hidden[0].dtype):
            for h, (args, kwargs) in zip(hidden, layer_args, strict=True):
                try:
                    out = layer(h, *args, **kwargs)
                except _Stop:
                    continue
                results.append(out[0] if isinstance(out, tuple) else out)
    finally:
        if attn_mass:
            config._attn_implementation = implementation
        for handle in handles:
            handle.remove()
    return LayerRun(
        hidden=results if outputs else None,
        attn_in=ins if attn_in or not outputs else None,
        attn_out=outs if attn_out else None,
        attn_mass=masses if attn_mass else None,
    )


def _additive_mask(_module, args, kwargs):
    """The attention mask in the form eager attention adds to its logits: the fused kernels' masks are boolean
    (True: attend) or None for plain causal attention, which eager attention would read as no mask at all."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    mask = kwargs.get("attention_mask")
    if mask is None:
        n = hidden.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min
        )
    return args, {**kwargs, "attention_mask": mask}


def second_moment(batches: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sigma = E[x~ x~^T] of x~ = [x; 1] over every token of the batches, in float64 on their device; with
    `weights` (one (batch, tokens) tensor per batch) each token counts in proportion to its weight."""
    moment = SecondMoment(batches[0].shape[-1], batches[0].device)
    for k, x in enumerate(batches):
        moment.update(x, None if weights is None else weights[k])
    return moment.value()


def correct_targets_(
    targets: list[torch.Tensor], source: list[torch.Tensor], converted: list[torch.Tensor], share: float
) -> None:
    """In place, y_b <- y_b + share * (x_b - x'_b) for every batch b: the attention outputs y (n, s, d) the source
    layer computes on its own hidden states x (n, s, d), moved by `share` of the way towards the outputs that would
    put the converted model's stream x' (n, s, d) back on the source's after the attention (x' + y' = x + y where the
    layer adds its attention's output to the stream). Computed in float32, stored in the targets' dtype."""
    for y, x, x_conv in zip(targets, source, converted, strict=True):
        y.copy_(y.float() + share * (x.float() - x_conv.float()))


def attention_weights(mass: list[torch.Tensor], share: float) -> list[torch.Tensor]:
    """Per-token weights (1 - share) + share a_t / mean(a) from the attention a_t = sum_q p_qt that each calibration
    token t receives (`LayerRun.attn_mass`, averaged over heads). A value error e_t reaches query q's output as
    sum_t p_qt e_t, and sum_q |sum_t p_qt e_t|^2 <= sum_t a_t |e_t|^2 (each row of p sums to 1), so a second moment
    with these weights measures what a lost direction costs the outputs; a key error at t likewise moves only the
    attention on t. Share 0 counts every token alike."""
    mean = sum(float(m.sum()) for m in mass) / sum(m.numel() for m in mass)
    return [(1 - share) + share * m / mean for m in mass]


@dataclass
class Streams:
    """The calibration hidden states entering the next decoder layer: as the source model computes them, and as the
    model converted so far computes them (None while no converted layer has changed them: the same tensors)."""

    source: list[torch.Tensor]
    converted: list[torch.Tensor] | None = None

    @property
    def converted_or_source(self) -> list[torch.Tensor]:
        return self.source if self.converted is None else self.converted


def calibration_batches(tokenizer, specs: tuple[str, ...], tokens: int, seq_len: int) -> tuple[list[torch.Tensor], str]:
    """The calibration texts as batches of token windows: about `tokens` tokens in windows of `seq_len`, in equal
    shares of the texts (`mixed_windows`); and a description of the texts with their checksums."""
    windows, described = mixed_windows(
        tokenizer, [parse_text_spec(s) for s in specs], max(1, tokens // seq_len), seq_len
    )
    return list(windows.split(CALIBRATION_BATCH)), described


def _readout_pairs(
    module: nn.Module,
    x: list[torch.Tensor],
    y: list[torch.Tensor],
    layer_args: list,
    inputs: list[torch.Tensor] | None = None,
    outputs: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per calibration sequence: the converted attention's output-projection input u (tokens, n) on its inputs x, in
    the dtype it computes in; the source attention's output y (tokens, d) in float64; and the converted attention's
    own output (tokens, d), the product of its output projection with u, as computed; all on the module's device
    and with the output bias (the source's, in both). With outputs=False the output projection is not run and the
    third is None. With `inputs` (a list) each batch's output-projection input (batch, tokens, n) is appended to it
    as well."""
    n = module.o_proj.in_features
    recorded: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def record_input(_module, args):
        recorded.append((args[0], None))
        raise _Stop

    if outputs:
        handle = module.o_proj.register_forward_hook(lambda _m, args, out: recorded.append((args[0], out)))
    else:
        handle = module.o_proj.register_forward_pre_hook(record_input)
    try:
        with torch.no_grad(), computing_in(module, x[0].dtype):
            for xb, yb, (_, kwargs) in zip(x, y, layer_args, strict=True):
                recorded.clear()
                try:
                    module(xb, attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"))
                except _Stop:
                    pass  # u is recorded: the output projection, which only the samples' residual reads, is skipped
                u_batch, out_batch = recorded[0]
                if inputs is not None:
                    inputs.append(u_batch)
                for row, target in enumerate(yb):
                    target = target.reshape(-1, target.shape[-1]).to(torch.float64)
                    out = None if out_batch is None else out_batch[row].reshape(target.shape)
                    yield u_batch[row].reshape(-1, n), target, out
    finally:
        handle.remove()


def rows_of(t: torch.Tensor | None, index: slice | torch.Tensor) -> torch.Tensor | None:
    """The rows `index` of a per-sequence argument of a batch (attention mask, positions); one broadcast row stays as
    it is."""
    return t if t is None or t.shape[0] == 1 else t[index]


def spread_rows(
    x: list[torch.Tensor], y: list[torch.Tensor], layer_args: list, keep: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """`keep` of the calibration sequences, spread evenly over all of them (every text of a mixture keeps its
    share), with their targets and the attention's per-sequence arguments, batch by batch: for a refit whose
    samples would not all fit in its memory."""
    rows = sum(b.shape[0] for b in x)
    chosen = torch.div(torch.arange(keep, device=x[0].device) * rows, keep, rounding_mode="floor")
    names = ("attention_mask", "position_ids")  # what the converted attention reads (`_readout_pairs`)
    out_x, out_y, out_args, start = [], [], [], 0
    for xb, yb, (_, kwargs) in zip(x, y, layer_args, strict=True):
        local = chosen[(chosen >= start) & (chosen < start + xb.shape[0])] - start
        start += xb.shape[0]
        if len(local):
            out_x.append(xb[local])
            out_y.append(yb[local])
            out_args.append(((), {name: rows_of(kwargs.get(name), local) for name in names}))
    return out_x, out_y, out_args


def readout_statistics(
    module: nn.Module,
    x: list[torch.Tensor],
    y: list[torch.Tensor],
    layer_args: list,
    bias,
    folds: int,
    inputs: list[torch.Tensor] | None = None,
) -> list[ReadoutStats]:
    """The readout refit's statistics in `folds` folds (calibration sequences dealt round-robin); empty folds are
    left out. With `inputs` (a list), each batch's output-projection inputs are appended to it (`_readout_pairs`)."""
    n, d = module.o_proj.in_features, module.o_proj.out_features
    weight = module.o_proj.weight
    stats = [
        ReadoutStats(weight.new_zeros(n, n, dtype=torch.float64), weight.new_zeros(n, d, dtype=torch.float64), 0.0, 0)
        for _ in range(folds)
    ]
    for row, (u, target, _) in enumerate(_readout_pairs(module, x, y, layer_args, inputs, outputs=False)):
        fold = stats[row % folds]
        u, target = u.to(torch.float64), target if bias is None else target - bias
        add_gram_(fold.gram, u)
        fold.cross.addmm_(u.T, target)
        fold.energy += float(target.pow(2).sum())
        fold.tokens += u.shape[0]
    kept = [s for s in stats if s.energy > 0]
    for s in kept:
        mirror_gram_(s.gram)
    return kept


def tokens_per_batch(batches: list[torch.Tensor]) -> list[int]:
    """The tokens of each (batch, tokens, width) batch."""
    return [b.numel() // b.shape[-1] for b in batches]


def readout_samples(
    module: nn.Module, x: list[torch.Tensor], y: list[torch.Tensor], layer_args: list, folds: int
) -> ReadoutSamples:
    """The readout refit's calibration samples themselves, each token labelled with its sequence's fold, written into
    buffers of their final size as they come (a concatenation would hold them twice); u in float32 at least."""
    tokens = sum(tokens_per_batch(x))
    n, d = module.o_proj.in_features, module.o_proj.out_features
    u_dtype, device = torch.promote_types(x[0].dtype, torch.float32), x[0].device
    samples = ReadoutSamples(
        torch.empty(tokens, n, dtype=u_dtype, device=device),
        torch.empty(tokens, d, dtype=torch.float64, device=device),
        torch.empty(tokens, dtype=torch.long, device=device),
    )
    start = 0
    for row, (u, target, out) in enumerate(_readout_pairs(module, x, y, layer_args)):
        rows = slice(start, start + u.shape[0])
        samples.u[rows], samples.fold[rows] = u, row % folds
        torch.sub(target, out, out=samples.residual[rows])  # the bias, in both, cancels
        start += u.shape[0]
    return samples
