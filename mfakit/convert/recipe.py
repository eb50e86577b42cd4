"""`mfakit convert` as a recipe: plan the conversion, open the output and its resume state, convert one decoder
layer at a time, finish the checkpoint, summarise.

Each layer: read its tensors lazily, write every tensor outside its attention unchanged, run the calibration hidden
states through it (recording its attention's input and output), factorize its attention, refit the output
projection, write the converted tensors, advance the hidden states, and free it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mfakit._version import __version__
from mfakit.checkpoint import CheckpointError, ShardedWriter, write_mfa_files
from mfakit.convert import factorize as fz
from mfakit.convert.adapters import (
    PreLatent,
    mfa_layer_config,
    mfa_module,
    mfa_tensors,
    normalised_inputs,
    pre_latent,
    read_attention,
)
from mfakit.convert.calibration import (
    LayerInputs,
    Streams,
    attention_weights,
    calibration_batches,
    computing_in,
    correct_targets_,
    free_outside_layers,
    load_module,
    readout_samples,
    readout_statistics,
    record_layer_inputs,
    run_layer,
    second_moment,
    spread_rows,
    tokens_per_batch,
)
from mfakit.convert.plan import (
    ATTENTION_MASS_BYTES,
    ConversionPlan,
    ConvertOptions,
    calibration_token_count,
    convert_layer,
    is_exact,
    layer_cache_share,
    plan_conversion,
)
from mfakit.convert.readout import (
    TOKENS_PER_FEATURE_UNREGULARISED,
    inputs_memory,
    refit_from_samples_,
    refit_from_statistics,
    refit_memory,
)
from mfakit.convert.resume import (
    RESUME_DIR,
    ResumeState,
    has_resume_state,
    load_streams,
    read_resume_state,
    save_resume_state,
    write_state,
)
from mfakit.convert.tune import layer_from_module, reconstruct
from mfakit.errors import MfakitError, first_line
from mfakit.families import adds_attention_output
from mfakit.loading import DTYPES, load_tokenizer
from mfakit.model.modeling_mfa import MFAConfig
from mfakit.outputs import atomic_folder, check_output, clear_folder, folder_size, locked, partial_folder

logger = logging.getLogger(__name__)
READOUT_FOLDS = 8
# Settings a resumed run must share with the killed one: the options, less these, plus what the options resolve to.
NOT_RESUME_SETTINGS = ("device", "overwrite", "resume", "progress")
# Settings recorded in the converted config under `conversion`.
RECORDED_SETTINGS = (
    "kv_ratio",
    "kv_dim",
    "share_q_dim",
    "method",
    "calibration",
    "calibration_tokens",
    "calibration_seq_len",
    "mfakit_version",
)


@dataclass
class ConvertSummary:
    out: str
    variant: str
    kv_dim: list[int]
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    params_before: int
    params_after: int
    calibration: str
    calibration_tokens: int
    seconds: float

    def lines(self) -> list[str]:
        ratio = self.kv_bytes_per_token_after / self.kv_bytes_per_token_before
        widths = self.kv_dim
        width = str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} per layer"
        return [
            f"wrote {self.out} ({self.variant}, kv_dim {width})",
            f"KV cache per token: {self.kv_bytes_per_token_before:,} -> {self.kv_bytes_per_token_after:,} bytes ({ratio:.3f}x)",
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
            f"calibration: {self.calibration_tokens:,} tokens of {self.calibration}",
            f"time: {self.seconds:.1f} s",
        ]


@dataclass
class ConversionRun:
    """The output being built: its partial folder, the shard writer, the state a resumed run continues from, and
    which one-time notes were given."""

    folder: Path
    writer: ShardedWriter
    state: ResumeState
    noted: set[str] = field(default_factory=set)

    def layer_done(self, next_layer: int, streams: Streams) -> None:
        """Record that every layer before `next_layer` is written: the resume state, with the writer's position."""
        self.state.next_layer = next_layer
        self.state.writer = self.writer.state()
        save_resume_state(self.folder, self.state, streams)

    def note_once(self, kind: str, message: str) -> None:
        if kind not in self.noted:
            self.noted.add(kind)
            logger.warning(message)


def convert(source: str | Path, out: str | Path, options: ConvertOptions) -> ConvertSummary:
    """Convert a causal-LM checkpoint (a folder or a hub name) to MFA or MFA-KR at a KV-cache budget; see
    `ConvertOptions` and the README for the checkpoint format.

    The work is built in a hidden partial folder beside `out` and renamed when finished. After every layer it
    records a resume state; a killed run continues with `resume=True` and the same settings to the same bytes.
    """
    start = time.time()
    plan = plan_conversion(source, options)
    out = Path(out)
    check_output(out, [("the source checkpoint", plan.folder)], options.overwrite)
    for line in plan.describe(options.variant):
        logger.info(line)
    partial = partial_folder(out)
    with locked(partial), one_line_errors(out, partial):
        tokenizer = load_tokenizer(plan.folder)
        hidden = plan.skeleton.get_input_embeddings().embedding_dim
        tokens = calibration_token_count(options.calibration_tokens, hidden, options.calibration_seq_len)
        batches, calibration = calibration_batches(tokenizer, options.calibration, tokens, options.calibration_seq_len)
        settings = _resume_settings(plan, options, calibration, sum(b.numel() for b in batches))
        with open_output(out, partial, options, settings) as run:
            inputs, streams = start_streams(plan, options, run, batches)
            bar = tqdm(
                total=plan.n_layers,
                initial=run.state.next_layer,
                desc="converting layers",
                disable=not options.progress,
                unit="layer",
            )
            for i in range(run.state.next_layer, plan.n_layers):
                streams = convert_one_layer(plan, options, run, i, streams, inputs.layer_args[i])
                run.layer_done(i + 1, streams)
                release_freed_memory()
                bar.update()
            bar.close()
            config = finish_checkpoint(run, plan, options, source, type(tokenizer).__name__)
    return summarize(out, plan, config, run, time.time() - start)


def _resume_settings(plan: ConversionPlan, options: ConvertOptions, calibration: str, tokens: int) -> dict:
    settings = {"source": str(plan.folder.resolve())}
    settings.update((k, v) for k, v in asdict(options).items() if k not in NOT_RESUME_SETTINGS)
    settings.update(calibration=calibration, calibration_tokens=tokens, mfakit_version=__version__)
    return json.loads(json.dumps(settings))  # as the resume state reads it back (a tuple of widths: a list)


@contextmanager
def one_line_errors(out: Path, partial: Path) -> Iterator[None]:
    """A user-facing error or a file-system error (disk full, read-only, permissions) as one CheckpointError line,
    which says when the partial folder keeps finished layers that --resume would continue from."""
    try:
        yield
    except (MfakitError, OSError) as err:
        message = first_line(err) if isinstance(err, MfakitError) else f"{err.filename or out}: {err.strerror or err}"
        if has_resume_state(partial):
            message += f"; {partial} ({folder_size(partial)}) keeps the finished layers: once the cause is fixed, rerun with --resume"
        raise CheckpointError(message) from err


@contextmanager
def open_output(out: Path, partial: Path, options: ConvertOptions, settings: dict) -> Iterator[ConversionRun]:
    """The partial output folder and its writer: fresh, or continued from a resume state (with `options.resume`).
    The folder becomes `out` when the block finishes; a failure keeps it only if it holds a resume state."""
    state = read_resume_state(partial, settings) if options.resume else None
    if state is None:
        clear_folder(partial)
        state = ResumeState(settings=settings, layers=[])
    else:
        logger.info(f"resuming {partial} after layer {state.next_layer - 1}")
    with atomic_folder(out, options.overwrite, tmp=partial, keep=has_resume_state) as tmp:
        yield ConversionRun(tmp, ShardedWriter(tmp, options.max_shard_bytes, state.writer), state)


def start_streams(
    plan: ConversionPlan, options: ConvertOptions, run: ConversionRun, batches: list[torch.Tensor]
) -> tuple[LayerInputs, Streams]:
    """Run the calibration batches up to the first decoder layer (recording every layer's extra arguments) and,
    on a fresh run, write every tensor outside the decoder layers; a resumed run takes its saved streams."""
    layout = plan.layout
    inputs = record_layer_inputs(
        plan.skeleton,
        layout.layers_path,
        plan.ckpt,
        batches,
        options.device,
        DTYPES[options.dtype],
        layout.layer_returns_tuple,
    )
    if run.state.next_layer == 0:
        layers_prefix = f"{layout.layers_path}."
        outside = load_module(plan.skeleton, "", plan.ckpt, exclude=(layers_prefix,))
        write_module_state(run.writer, outside, "", skip=(layers_prefix,))
        streams = Streams(inputs.hidden)
    else:
        streams = load_streams(run.folder, run.state, options.device)
    free_outside_layers(plan.skeleton, layout.layers_path)
    return inputs, streams


def write_module_state(writer: ShardedWriter, module: torch.nn.Module, prefix: str, skip: tuple[str, ...]) -> None:
    """Every materialised tensor of a module under its model name (tied tensors once), except those under `skip`."""
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        full = prefix + name
        if tensor.is_meta or full.startswith(skip) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        writer.add(full, tensor)


def convert_one_layer(
    plan: ConversionPlan, options: ConvertOptions, run: ConversionRun, i: int, streams: Streams, layer_args: list
) -> Streams:
    """Layer i: its other tensors passed through, its attention calibrated, factorized, refit and written; returns
    the hidden states entering layer i + 1. The layer stays in its checkpoint's dtype (each pass computes in the
    streams' dtype, `run_layer`) and is released while its attention is factorized and refit, the step whose
    working set is largest, then read again for the pass that follows."""
    layout, method, compute = plan.layout, options.method, DTYPES[options.dtype]
    layer_path = f"{layout.layers_path}.{i}"
    layer = load_module(plan.skeleton, layer_path, plan.ckpt)
    write_module_state(run.writer, layer, f"{layer_path}.", skip=(layout.attention_prefix(i) + ".",))
    attention = layer.get_submodule(layout.attention_name)
    run.state.out_dtype = str(next(attention.parameters()).dtype).removeprefix("torch.")
    pre = pre_latent(layout, attention, plan.config, options.variant) if plan.qk_norm == "exact" else None
    layer.to(device=options.device)
    wants_out = method.refit or method.tune_steps != 0  # None: by the layer's budget, known once it is read
    weigh = method.attention_weight > 0 and attention_mass_fits(plan, run, i, streams.source[0])
    source_run = run_layer(
        layer,
        attention,
        streams.source,
        layer_args,
        attn_in=True,
        attn_out=wants_out,
        attn_mass=weigh,
    )
    x = source_run.attn_in
    if streams.converted is not None:
        x = run_layer(layer, attention, streams.converted, layer_args, outputs=False).attn_in
    src = read_attention(
        layout,
        attention,
        plan.config,
        rope_freqs=plan.rope[i][0],
        rope_scaling=plan.rope[i][1],
        qk_norm=plan.qk_norm,
        calib_inputs=x,
    )
    kv_dim, v_dim = plan.widths[i]
    exact = is_exact(src, options.variant, kv_dim, v_dim)
    with computing_in(attention, compute):
        inputs = normalised_inputs(layout, attention, plan.config, x) if pre else x
        sigma = second_moment(inputs)
        kv_sigma = None
        if weigh and not exact:
            kv_sigma = second_moment(inputs, attention_weights(source_run.attn_mass, method.attention_weight))
    layer.to("meta")
    mfa = convert_layer(src, sigma, options.variant, kv_dim, v_dim, method, plan.nope_context, kv_sigma)
    del kv_sigma
    src = src.without_weights()
    fz.balance_(mfa, sigma)
    share = layer_cache_share(src, options.variant, kv_dim, v_dim)
    scale = 1.0 if exact else method.logit_scale_at(share, options.variant)
    steps = 0 if exact else method.tune_steps_at(share, options.variant)
    if steps and pre is not None:
        run.note_once("tune", "the exact QK-norm layers are not tuned (--tune-steps): only the closed form")
        steps = 0
    tune = steps > 0
    correction = 0.0 if exact else method.stream_correction_at(share, options.variant)
    if correction and streams.converted is not None and source_run.attn_out is not None:
        correct_stream(plan, run, correction, source_run.attn_out, streams)
    # The sequential pass replays the refit's attention only where it is the written one: not after a logit factor
    # or per-layer tuning, nor with the queries written as a product of two rounded factors.
    replayable = method.sequential and scale == 1.0 and not tune and not options.share_q_dim
    replay = None
    if method.refit and not exact:
        # The refit fits the attention as written; elsewhere the write's own cast rounds (no pass for nothing
        # over the query rows, the layer's largest tensor).
        fz.round_inputs_(mfa, getattr(torch, run.state.out_dtype))
        layer_refit = (mfa, src, pre)
        mfa, replay = refit_output(plan, options, run, i, layer_refit, x, source_run.attn_out, layer_args, replayable)
    mfa.readout_factors = None  # only the refit reads them
    if scale != 1.0:  # the query rows are the layer's largest tensor: no pass over them for nothing
        mfa.wq.mul_(scale)
    if tune:  # after the logit factor: the attention tuned is the one written
        mfa = tune_output(plan, options, i, (mfa, src), (x, source_run.attn_out, layer_args), steps)
    layer_config, tensors = write_converted(plan, options, run, i, (mfa, src, pre), sigma)
    del mfa, sigma  # the written tensors replace their float32 forms
    if method.sequential and not exact:
        load_module(plan.skeleton, layer_path, plan.ckpt, exclude=(layout.attention_prefix(i) + ".",))
        converted = mfa_module(plan.config, options.variant, layout, layer_config, tensors, i)
        if replay is not None:
            converted, replay = ReplayedAttention(converted.o_proj, replay), None
        layer.set_submodule(layout.attention_name, converted)
        layer.to(device=options.device)
        converted_stream = run_layer(layer, converted, streams.converted_or_source, layer_args).hidden
    elif streams.converted is None:
        converted_stream = None  # nothing converted has changed the hidden states yet
    else:
        load_module(plan.skeleton, layer_path, plan.ckpt).to(device=options.device)
        converted_stream = run_layer(layer, attention, streams.converted, layer_args).hidden
    layer.to("meta")
    return Streams(source_run.hidden, converted_stream)


def correct_stream(
    plan: ConversionPlan, run: ConversionRun, share: float, targets: list[torch.Tensor], streams: Streams
) -> None:
    """The attention's targets moved in place by `share` of the stream's drift (`correct_targets_`), where the
    family adds the attention's output to the stream as it is; elsewhere they stay the source's outputs, noted once."""
    model_type = plan.config.model_type
    if adds_attention_output(model_type):
        correct_targets_(targets, streams.source, streams.converted, share)
    else:
        run.note_once(
            "stream",
            f"{model_type} norms or scales the attention's output before adding it to the stream: the layers are "
            "fitted to the source attention's outputs (--stream-correction is not applied)",
        )


def attention_mass_fits(plan: ConversionPlan, run: ConversionRun, i: int, batch: torch.Tensor) -> bool:
    """Whether layer i's calibration batches (like `batch`, (sequences, tokens, d)) can be run with eager attention
    to read the attention each token receives: its probabilities, batch x heads x tokens^2 in float32, must stay
    within ATTENTION_MASS_BYTES; otherwise the layer's tokens weigh alike (noted once)."""
    sequences, tokens = batch.shape[0], batch.shape[1]
    need = sequences * plan.shape.num_heads * tokens * tokens * 4
    if need <= ATTENTION_MASS_BYTES:
        return True
    run.note_once(
        "mass",
        f"layer {i}: key and value statistics weigh every token alike (reading the attention each receives would "
        f"hold {need / 1e9:.1f} GB of attention probabilities per batch > {ATTENTION_MASS_BYTES / 1e9:.1f} GB; "
        f"shorter --calib-seq-len fits); same for the other layers",
    )
    return False


@dataclass(frozen=True)
class RefitPlan:
    """How a layer's output refit runs within its memory: `way` "statistics" (the (n, n) sums), "samples" (the
    calibration samples, kernel form) or "skip"; `folds` of the ridge's validation (one where none is needed);
    `sequences` the calibration sequences it reads (all of them unless their samples would not fit); `need` the bytes
    of each way with every sequence (`refit_memory`); `replay` whether it keeps the output-projection inputs of every
    sequence for the sequential pass to replay (`ReplayedAttention`): always from the samples of all of them, and
    from statistics when the inputs fit beside the sums."""

    way: str
    folds: int
    sequences: int
    need: dict[str, int]
    replay: bool


def refit_plan(features: int, d: int, sequences: int, seq_len: int, limit_gb: float) -> RefitPlan:
    """How the output refit of a layer with `features` readout features and width d runs on `sequences` calibration
    sequences of seq_len tokens within `limit_gb`: from statistics if they fit, else from the samples of as many
    sequences as fit (spread over all of them; at least two, for the ridge's validation), else skipped."""

    def folds_for(kept: int) -> int:
        return 1 if kept * seq_len >= TOKENS_PER_FEATURE_UNREGULARISED * features else READOUT_FOLDS

    need, limit = refit_memory(features, d, sequences * seq_len, folds_for(sequences)), limit_gb * 1e9
    if need["statistics"] <= limit:
        replay = need["statistics"] + inputs_memory(features, sequences * seq_len) <= limit
        return RefitPlan("statistics", folds_for(sequences), sequences, need, replay)
    for kept in range(sequences, 1, -1):
        if refit_memory(features, d, kept * seq_len, folds_for(kept))["samples"] <= limit:
            return RefitPlan("samples", folds_for(kept), kept, need, kept == sequences)
    return RefitPlan("skip", folds_for(sequences), 0, need, False)


def refit_output(
    plan: ConversionPlan,
    options: ConvertOptions,
    run: ConversionRun,
    i: int,
    layer: tuple[fz.MFALayer, fz.SourceAttention, PreLatent | None],
    x: list[torch.Tensor],
    target: list[torch.Tensor],
    layer_args: list,
    replayable: bool,
) -> tuple[fz.MFALayer, list[torch.Tensor] | None]:
    """Layer i's output projection refit on what the converted attention computes from its inputs `x` against the
    source attention's outputs `target`, in the way its memory allows (`refit_plan`; each fallback noted once).
    If `replayable` (the written attention will be the refit's) and its plan allows (`RefitPlan.replay`), it also
    returns the output-projection inputs of every sequence, one (batch, tokens, n) tensor per batch of `x`, for the
    sequential pass to replay (`ReplayedAttention`); else None."""
    mfa, src, pre = layer
    features = mfa.wo.shape[1] * mfa.wo.shape[2]
    sequences = sum(b.shape[0] for b in x)
    way = refit_plan(features, mfa.wo.shape[0], sequences, x[0].shape[1], options.refit_memory_gb)
    need = {kind: f"{size / 1e9:.1f} GB" for kind, size in way.need.items()}
    over = f"> refit_memory_gb {options.refit_memory_gb}); same for wider layers"
    if way.way == "skip":
        least = min(way.need, key=way.need.get)
        run.note_once("skip", f"layer {i}: output refit skipped ({features} readout features need {need[least]} {over}")
        return mfa, None
    if way.sequences < sequences:
        run.note_once(
            "subset",
            f"layer {i}: output refit from {way.sequences} of the {sequences} calibration sequences, spread over "
            f"them (all of them would need {need['samples']} {over}",
        )
        x, target, layer_args = spread_rows(x, target, layer_args, way.sequences)
    elif way.way == "samples":
        run.note_once(
            "samples",
            f"layer {i}: output refit from the {sequences * x[0].shape[1]} calibration samples (its statistics "
            f"would need {need['statistics']} {over}",
        )
    module = working_module(plan, options, i, (mfa, src, pre))
    keep_inputs = replayable and way.replay
    if way.way == "samples":
        if mfa.readout_factors is not None:
            module.o_proj = FactoredReadout(module.o_proj, mfa.readout_factors)
        samples = readout_samples(module, x, target, layer_args, way.folds)
        refit_from_samples_(mfa, samples, getattr(torch, run.state.out_dtype))
        if not keep_inputs:
            return mfa, None
        return mfa, [u.view(*xb.shape[:-1], -1) for u, xb in zip(samples.u.split(tokens_per_batch(x)), x, strict=True)]
    mfa.readout_factors = None  # only the samples path reads them (at 70B W_O alone is 268 MB)
    inputs: list[torch.Tensor] | None = [] if keep_inputs else None
    stats = readout_statistics(module, x, target, layer_args, src.bo, way.folds, inputs)
    return refit_from_statistics(mfa, stats)[0], inputs


class FactoredReadout(torch.nn.Module):
    """A converted attention's output projection before its refit, computed as the product it is
    (`MFALayer.readout_factors`): out = W_O (R_i u_i)_i + b. At hidden 4096 and half the cache the dense projection
    is 4096 x 32,768 and its factors 4096 x 4096 and 32 of 128 x 1,024: a sixth of the multiplications for the
    refit's residual, which is all that reads this output."""

    def __init__(self, dense: torch.nn.Linear, factors: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.bias = dense.in_features, dense.out_features, dense.bias
        self.heads_out, self.per_head = factors

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # At least float32 inside: rounding the per-head values to bf16 between the two factors would make the
        # residual noisier than the dense bf16 product it stands for; the result is rounded once, as that one is.
        dtype = torch.promote_types(u.dtype, torch.float32)
        per_head = self.per_head.to(dtype)
        values = torch.einsum("...hn,hvn->...hv", u.to(dtype).unflatten(-1, (per_head.shape[0], -1)), per_head)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = torch.nn.functional.linear(values.flatten(-2), self.heads_out.flatten(1).to(dtype), bias)
        return out.to(u.dtype)


class ReplayedAttention(torch.nn.Module):
    """A converted attention in the sequential pass, from what its output refit computed: each call returns the
    output projection of the next batch's recorded output-projection inputs (the refit ran the converted attention,
    its query, key and value rows already as written, on the very inputs the pass gives it, batch by batch). Only
    the output projection, fitted afterwards, is computed again, by the written module's own; the attention,
    at hidden 4096 a 4096 -> 32,768 query map at half the cache, is not."""

    def __init__(self, o_proj: torch.nn.Module, inputs: list[torch.Tensor]):
        super().__init__()
        self.o_proj = o_proj
        self.inputs = list(reversed(inputs))  # each popped when replayed: none outlives its batch

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        u = self.inputs.pop()
        if u.shape[:-1] != hidden_states.shape[:-1]:
            raise RuntimeError("the replayed attention was given other inputs than its refit")
        return self.o_proj(u), None


def tune_output(
    plan: ConversionPlan,
    options: ConvertOptions,
    i: int,
    layer: tuple[fz.MFALayer, fz.SourceAttention],
    calibration: tuple[list[torch.Tensor], list[torch.Tensor], list],
    steps: int,
) -> fz.MFALayer:
    """Layer i's converted attention after `steps` Adam steps of output reconstruction on its calibration inputs,
    the source attention's outputs and the batches' arguments, from its balanced factors (`balance_`: Adam's steps
    suit unit-scale channels)."""
    mfa, src = layer
    module = working_module(plan, options, i, (mfa, src, None))
    with torch.enable_grad():
        reconstruct(module, *calibration, steps, options.method.tune_lr)
    return layer_from_module(module, mfa)


def working_module(
    plan: ConversionPlan,
    options: ConvertOptions,
    i: int,
    layer: tuple[fz.MFALayer, fz.SourceAttention, PreLatent | None],
) -> torch.nn.Module:
    """Layer i's converted attention as a float32 module on the calibration device, for the steps that run it
    before it is written (the output refit, per-layer reconstruction)."""
    mfa, src, pre = layer
    layer_config = mfa_layer_config(mfa, src, None, plan.softcap, pre)
    tensors = mfa_tensors(plan.layout, i, mfa, src, torch.float32, pre=pre)
    return mfa_module(plan.config, options.variant, plan.layout, layer_config, tensors, i).to(options.device)


def write_converted(
    plan: ConversionPlan,
    options: ConvertOptions,
    run: ConversionRun,
    i: int,
    layer: tuple[fz.MFALayer, fz.SourceAttention, PreLatent | None],
    sigma: torch.Tensor,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Factor the query if asked, and write layer i's converted tensors in the source's dtype (the source's own
    tensors of a QK-norm layer's pre-latent stage as they are); returns its `mfa_layers` entry and the tensors."""
    mfa, src, pre = layer
    q_factors = fz.factor_query(mfa, sigma, options.share_q_dim) if options.share_q_dim else None
    out_dtype = getattr(torch, run.state.out_dtype)
    # The largest two in the output dtype one after the other, each replacing its float32 form (the caller's
    # layer is not read again), so that both forms of both never exist at once.
    mfa.wq = mfa.wq.to(out_dtype)
    mfa.wo = mfa.wo.to(out_dtype)
    tensors = mfa_tensors(plan.layout, i, mfa, src, out_dtype, q_factors, pre)
    for name, tensor in tensors.items():
        run.writer.add(name, tensor)
    share_q_dim = q_factors[0].shape[0] if q_factors else None
    layer_config = mfa_layer_config(mfa, src, share_q_dim, plan.softcap, pre)
    run.state.layers.append(layer_config)
    return layer_config, tensors


def release_freed_memory() -> None:
    """Hand the allocator's free pages back to the system between layers (glibc keeps them otherwise, and each
    layer's float64 temporaries then fragment the heap into a slowly rising peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to hand back this way


def finish_checkpoint(
    run: ConversionRun, plan: ConversionPlan, options: ConvertOptions, source: str | Path, tokenizer_class: str
) -> MFAConfig:
    """Close and check the last shard (recorded in the resume state, so that a run killed from here on finishes
    the same files), name the shards, write config.json (with how the checkpoint was made), the modeling file and
    the source's tokenizer and generation files, and drop the resume state; returns the converted config."""
    run.writer.close()
    run.state.writer = run.writer.state()
    write_state(run.folder, run.state)
    run.writer.finish()
    settings = run.state.settings
    conversion = {
        "source": str(plan.folder.resolve()) if Path(source).is_dir() else str(source),
        "family": plan.layout.family,
        "approximate_qk_norm": plan.qk_norm == "fold",
        **{k: settings[k] for k in RECORDED_SETTINGS},
    }
    # The source's auto_map would point the converted folder's Auto classes at code that is not copied, and an
    # import record describes the source folder, not this one.
    text_config = {k: v for k, v in plan.config.to_dict().items() if k not in ("auto_map", "mfakit_import")}
    config = MFAConfig(
        text_config=text_config,
        variant=options.variant,
        layers_path=plan.layout.layers_path,
        attention_name=plan.layout.attention_name,
        mfa_layers=run.state.layers,
        conversion=conversion,
        architectures=["MFAForCausalLM"],
        dtype=run.state.out_dtype,
    )
    write_mfa_files(run.folder, plan.folder, config, tokenizer_class)
    shutil.rmtree(run.folder / RESUME_DIR)
    return config


def summarize(out: Path, plan: ConversionPlan, config: MFAConfig, run: ConversionRun, seconds: float) -> ConvertSummary:
    element = torch.tensor([], dtype=getattr(torch, run.state.out_dtype)).element_size()
    cached = sum(config.cached_numbers_per_layer())
    return ConvertSummary(
        out=str(out),
        variant=config.variant,
        kv_dim=[c["kv_dim"] for c in config.mfa_layers],
        kv_bytes_per_token_before=2 * plan.shape.num_kv_heads * plan.shape.head_dim * plan.n_layers * element,
        kv_bytes_per_token_after=cached * element,
        params_before=plan.ckpt.num_params(),
        params_after=run.writer.elements,
        calibration=run.state.settings["calibration"],
        calibration_tokens=run.state.settings["calibration_tokens"],
        seconds=seconds,
    )
