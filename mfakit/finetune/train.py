"""Short continued training of a converted model: distillation from its source (KL to the teacher's next-token
distribution), optionally plus the language-model loss; one process, or many under `torchrun` with PyTorch's own
DistributedDataParallel (a copy of the model per process) or FSDP2 (`--parallel fsdp`: student and teacher sharded
over the processes, for a model that does not fit one device; see sharding.py); rank 0 writes. Checkpoints in
OUT/trainer resume exactly: trainable weights, optimiser, schedule, data position and random state."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from pickle import UnpicklingError
from typing import TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfakit._version import __version__
from mfakit.checkpoint import FINETUNE_LOG, TRAINER_DIR, CheckpointError, copy_side_files, write_mfa_files
from mfakit.errors import MfakitError, OptionsError, first_line
from mfakit.families import cache_share
from mfakit.finetune.dataset import (
    check_disjoint,
    parse_training_source,
    sequence_indices,
    sequences_fingerprint,
    training_sequences,
)
from mfakit.finetune.sharding import as_number, full_weights, load_sharded, load_trainer_tensors, trainer_tensors
from mfakit.loading import DTYPES, check_device, load_model, load_tokenizer
from mfakit.model.modeling_mfa import MFAAttention, MFAConfig
from mfakit.outputs import FINETUNE_STAGING, check_output, clear_folder, locked, replace_file, written_by_mfakit
from mfakit.scoring import stream_nll
from mfakit.texts import DEFAULT_CALIBRATION, TextSource, load_texts, parse_text_spec, tokenize

logger = logging.getLogger(__name__)

LOSSES = ("kd", "lm", "kd+lm")
TRAINABLE = ("attention", "all")
PARALLEL = ("ddp", "fsdp")
STATE_FILE = "state.pt"
# What must not change between a run and its resumption (the rest, like eval and save cadence, may).
RESUME_FIELDS = (
    "teacher",
    "data",
    "tokens",
    "steps",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "weight_decay",
    "trainable",
    "loss",
    "kd_temperature",
    "seed",
    "parallel",
    "dtype",
)


# Peak learning rate unless told otherwise, by how far the conversion is from its source (its KV cache as a share
# of the source's). From half the cache up, low: those conversions start close to the source, and on SmolLM2
# MFA-KR 0.5 larger rates raised the KL in the first steps (docs/method.md). Below half, 5x higher: at MFA-KR 0.25
# on the development domains, 5e-5 closed more of the gap than 2e-5 (98,304 tokens in float32: 39% against 34%,
# then 34% against 31% for the next conversion defaults), and 1e-4 more than 5e-5 (147,456 tokens in bfloat16, the
# same wall time on 2 CPU cores: 39% against 36%); 1e-4 was not measured in float32.
LR = 2e-5
LR_BELOW_HALF = 1e-4
# Training text unless told otherwise: the built-in corpora in equal shares, their training parts (no text the
# conversion calibrated on). On the development domains, MFA-KR 0.25 after 98,304 tokens at 5e-5: 1.980x the
# source's perplexity against 2.009x from the documentation topics alone (docs/benchmarks.md).
DATA = DEFAULT_CALIBRATION
# The teacher's dtype and the student's autocast unless told otherwise: bfloat16 where the device multiplies it in
# hardware (`native_bfloat16`), float32 elsewhere. On this project's development CPU (AVX512-BF16, 2 threads) KD
# fine-tuning ran 1.46x the tokens/s of float32 and, for the same wall time, closed more of the gap on the
# development domains (36% against 32% at MFA-KR 0.25, docs/benchmarks.md).
AUTO_DTYPE = "auto"
DTYPE_CHOICES = (AUTO_DTYPE, *DTYPES)


class FinetuneError(MfakitError):
    """Settings a fine-tuning run cannot start with."""


def native_bfloat16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA device that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bfloat16 is emulated, and slower than float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return False
    # torch has no public check; these private ones (torch >= 2.1) read the CPU's feature flags, and a torch
    # without them gets float32.
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype a run computes in: `dtype`, or for AUTO_DTYPE bfloat16 where `device` has it in hardware
    (`native_bfloat16`), else float32."""
    if dtype != AUTO_DTYPE:
        return dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def default_lr(share: float) -> float:
    """The peak learning rate for a model whose KV cache is `share` of its source's (LR, LR_BELOW_HALF)."""
    return LR if share >= 0.5 else LR_BELOW_HALF


@dataclass(frozen=True)
class FinetuneOptions:
    """tokens or steps: the run's length (tokens are rounded up to whole optimiser steps of
    batch_size * grad_accum * world_size sequences of seq_len). warmup: linear warm-up steps (default 10% of the
    steps, at least 1 and at most 100), then linear decay to zero. lr: the peak learning rate (None: `default_lr` of
    the model's KV cache share). eval_every: held-out perplexity every N steps
    (0: only before and after). save_every: resumable state every N steps (0: never). resume: continue the run in
    OUT from its saved state. overwrite: replace a finished fine-tune in OUT. parallel: under torchrun, `ddp` keeps a
    whole copy of student and teacher on every process; `fsdp` shards both over the processes (fully_shard per
    decoder layer), for models that do not fit one device (one process: no difference)."""

    teacher: str | None = None
    data: list[str] = field(default_factory=lambda: list(DATA))
    text_column: str = "text"
    tokens: int | None = None
    steps: int | None = None
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable: str = "attention"
    loss: str = "kd"
    kd_temperature: float = 1.0
    eval_text: str | None = "builtin:pydoc"
    eval_tokens: int = 16384
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    parallel: str = "ddp"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise OptionsError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.trainable not in TRAINABLE:
            raise OptionsError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.parallel not in PARALLEL:
            raise OptionsError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if (self.tokens is None) == (self.steps is None):
            raise OptionsError("give exactly one of tokens and steps")
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise OptionsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if (self.tokens or self.steps or 0) < 1 or not (self.lr is None or self.lr > 0) or not self.kd_temperature > 0:
            raise OptionsError("tokens/steps, lr and kd_temperature must be positive")
        if self.dtype not in DTYPE_CHOICES:
            raise OptionsError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        check_device(self.device)


@dataclass
class FinetuneSummary:
    out: str
    steps: int
    tokens: int
    lr: float
    final_loss: float
    eval_ppl_before: float | None
    eval_ppl_after: float | None
    tokens_per_second: float
    seconds: float


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)); logits (..., vocab).

    The T^2 keeps the gradient's scale independent of T (Hinton et al. 2015)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (b, t, vocab), ids (b, t)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps to 1, then linear decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def select_trainable(model: torch.nn.Module, trainable: str) -> None:
    """Freeze all but the chosen parameters (`attention`: those of the MFA attention modules); what trains is then
    what requires a gradient."""
    if trainable == "all":
        names = [n for n, _ in model.named_parameters()]
    else:
        prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, MFAAttention))
        if not prefixes:
            raise FinetuneError("--trainable attention needs a converted (MFA) model; use --trainable all")
        names = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
    chosen = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)


@contextmanager
def _distributed(device: str) -> Iterator[tuple[int, int, str]]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1); (0, 1, device) otherwise.

    A process group opened here is closed here: gloo's worker threads abort the interpreter at exit otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, device
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if owned:
            dist.destroy_process_group()


def _teacher_path(model_path: Path, teacher: str | None) -> str:
    if teacher is not None:
        return teacher
    config = json.loads((model_path / "config.json").read_text())
    source = (config.get("conversion") or {}).get("source")
    if source is None:
        raise FinetuneError(f"{model_path} records no source model; give --teacher")
    return source


def _rng_state() -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """One process's side of a run: the student (and its DDP wrapper), the teacher, optimiser and schedule, the
    packed training sequences, and the log and held-out text of rank 0."""

    options: FinetuneOptions
    out: Path
    model: torch.nn.Module
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sequences: torch.Tensor
    steps: int
    rank: int
    world: int
    device: str
    wrapped: torch.nn.Module | None = None
    eval_ids: torch.Tensor | None = None
    log: TextIO | None = None
    start_step: int = 0
    ppl_before: float | None = None
    data: str = ""  # the checksum of `sequences` (`sequences_fingerprint`), saved with the state

    @property
    def per_step(self) -> int:
        """Sequences per optimiser step, over all ranks."""
        return self.options.batch_size * self.options.grad_accum * self.world

    @property
    def sharded(self) -> bool:
        """FSDP over several processes: each holds a shard, so every forward is a collective all ranks run."""
        return self.options.parallel == "fsdp" and self.world > 1

    @property
    def state_file(self) -> Path:
        return self.out / TRAINER_DIR / STATE_FILE

    def autocast(self) -> AbstractContextManager:
        if self.options.dtype == "float32":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=DTYPES[self.options.dtype])

    def write_log(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def evaluate(self, step: int) -> float | None:
        """Held-out perplexity (rank 0, or every rank when sharded; None without held-out text), logged by rank 0."""
        ppl = None
        if self.eval_ids is not None:
            was_training = self.model.training
            self.model.eval()
            window = min(self.options.seq_len, self.eval_ids.numel())
            with torch.no_grad(), self.autocast():
                nll, count = stream_nll(self.model, self.eval_ids, window, window)
            if self.sharded:
                # The root keeps its gathered weights after a forward (backward would need them); without a
                # backward to free them they would stay gathered, and registered in place of the shards.
                self.model.reshard()
            self.model.train(was_training)
            ppl = math.exp(nll / count)
            self.write_log({"step": step, "eval_ppl": ppl})
        if self.world > 1:
            dist.barrier()
        return ppl


def finetune(model_path: str | Path, out: str | Path, options: FinetuneOptions) -> FinetuneSummary:
    """Fine-tune `model_path` (a converted checkpoint, or any causal LM with trainable="all") into `out`.

    OUT holds the run's log and resumable state (trainer/) while it trains, and the fine-tuned checkpoint when it
    finishes (config.json last). A rerun without `resume` starts over in an unfinished OUT; a finished one is
    replaced only with `overwrite`."""
    model_path, out = Path(model_path), Path(out)
    sources = [parse_training_source(s, options.text_column) for s in options.data]
    held_out = parse_text_spec(options.eval_text, options.text_column) if options.eval_text else None
    check_disjoint(sources, held_out)
    _check_finetune_output(model_path, out, options, sources, held_out)
    with _distributed(options.device) as (rank, world, device), _run_folder(out, options, rank):
        if options.dtype == AUTO_DTYPE:
            # Rank 0's answer for every rank: ranks on other hardware must still compute (and shard) alike.
            resolved = [resolve_dtype(options.dtype, device)]
            if world > 1:
                dist.broadcast_object_list(resolved, src=0)
            options = replace(options, dtype=resolved[0])
            if rank == 0:
                logger.info(f"--dtype auto: computing in {options.dtype} on {device}")
        run = _start_run(model_path, out, options, sources, held_out, rank, world, device)
        try:
            start = time.time()
            loss = _train_steps(run)
            return _finish(run, model_path, loss, time.time() - start)
        finally:
            # DDP's reducer holds the process group. Freed after the group is destroyed, its destructor would end
            # gloo's worker threads while holding the GIL, which a worker still releasing its last collective's
            # tensors waits for: a deadlock (seen under load, 3 runs in 66). Freed first, it leaves the last hold
            # on the group to the group's Python handle, whose destructor releases the GIL.
            del run
            gc.collect()


def _check_finetune_output(
    model_path: Path, out: Path, options: FinetuneOptions, sources: list, held_out: TextSource | None
) -> None:
    """OUT overlaps no input; resuming needs a saved state there; an unfinished run of mfakit's there is started
    over; anything else that exists needs `overwrite` (and must be mfakit's own)."""
    inputs = [("the model being trained", model_path)]
    inputs += [("a text", Path(t.name)) for t in [*sources, held_out] if isinstance(t, TextSource) and t.kind == "file"]
    if options.teacher is not None and Path(options.teacher).exists():
        inputs.append(("the teacher", Path(options.teacher)))
    check_output(out, inputs, overwrite=True)  # overlaps and someone else's files, whatever the flags
    state_file = out / TRAINER_DIR / STATE_FILE
    if options.resume and not state_file.is_file():
        raise CheckpointError(f"{out} holds no fine-tuning state to resume ({state_file} is missing)")
    unfinished = out.is_dir() and written_by_mfakit(out) and not (out / "config.json").exists()
    if out.exists() and not (options.resume or options.overwrite or unfinished):
        raise CheckpointError(
            f"{out} exists (pass --overwrite to replace it, or --resume to continue the run whose state it holds)"
        )


@contextmanager
def _run_folder(out: Path, options: FinetuneOptions, rank: int) -> Iterator[None]:
    """Rank 0 holds the run's lock (OUT/trainer/.lock) for the whole run, and a fresh run clears what an earlier
    unfinished run left there; an OUT this run created and left empty is removed."""
    if rank > 0:
        yield
        return
    created = not out.exists()
    try:
        with locked(out / TRAINER_DIR):
            if not options.resume:
                clear_folder(out, keep=(TRAINER_DIR,))
                clear_folder(out / TRAINER_DIR)
            yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _start_run(
    model_path: Path,
    out: Path,
    options: FinetuneOptions,
    sources: list[TextSource | int],
    held_out: TextSource | None,
    rank: int,
    world: int,
    device: str,
) -> RunState:
    """Load student and teacher, settle the learning rate (unless given: by the student's cache share), pack the
    data, build optimiser and schedule, restore a saved state (resume), and open the log; every rank does the same,
    so the random state stays in step."""
    torch.manual_seed(options.seed)
    model, teacher = _load_models(model_path, options, sources, rank, world, device)
    if options.lr is None:
        options = replace(options, lr=default_lr(cache_share(model.config)))
    tokenizer = load_tokenizer(model_path)
    per_step = options.batch_size * options.grad_accum * world
    steps = options.steps or -(-options.tokens // (per_step * options.seq_len))
    sequences = training_sequences(sources, tokenizer, teacher, options.seq_len, options.seed, steps * per_step)
    warmup = options.warmup if options.warmup is not None else min(100, max(1, steps // 10))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    run = RunState(options, out, model, teacher, optimizer, scheduler, sequences, steps, rank, world, device)
    run.data = sequences_fingerprint(sequences)
    if options.resume:
        _restore(run, any(isinstance(s, TextSource) and s.kind == "builtin" for s in sources))
    if options.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    run.wrapped = model  # a sharded model is its own wrapper
    if world > 1 and not run.sharded:
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        run.wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if held_out is not None and (rank == 0 or run.sharded):
        run.eval_ids = tokenize(tokenizer, load_texts(held_out, part="evaluation"))[: options.eval_tokens]
    if rank == 0:
        run.log = open(out / FINETUNE_LOG, "a")  # noqa: SIM115  (kept open for the whole run, closed in _finish)
    if run.start_step == 0:
        run.ppl_before = run.evaluate(0)
    return run


def _load_models(
    model_path: Path, options: FinetuneOptions, sources: list, rank: int, world: int, device: str
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The student in float32 with its trainable parameters chosen, and the frozen teacher in `options.dtype`
    (None when nothing needs it). Sharded (FSDP), the teacher is sharded like the student: it is about as large,
    so a whole copy of it per device (even in bfloat16) would not fit where the student does not."""
    sharded = options.parallel == "fsdp" and world > 1
    if options.parallel == "fsdp" and world == 1:
        logger.info("--parallel fsdp shards over the processes of a torchrun launch; one process trains unsharded")

    def load(path: str | Path, dtype: str, prepare, teacher: bool) -> torch.nn.Module:
        if sharded:
            return load_sharded(path, device, dtype, rank, prepare, reshard_root=teacher)
        loaded = load_model(path, device, dtype)
        prepare(loaded)
        return loaded

    model = load(model_path, "float32", lambda m: select_trainable(m, options.trainable), teacher=False)
    if options.loss == "lm" and not any(isinstance(s, int) for s in sources):
        return model, None
    teacher_path = _teacher_path(model_path, options.teacher)
    teacher = load(teacher_path, options.dtype, lambda m: m.requires_grad_(False), teacher=True)
    vocab = model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vocab[0] != vocab[1]:
        raise FinetuneError(
            f"the teacher {teacher_path} predicts {vocab[1]} tokens, the model {vocab[0]}: give the teacher the "
            "model was converted from (--teacher)"
        )
    return model, teacher


def _restore(run: RunState, reads_builtin: bool) -> None:
    """Continue from the saved state: weights, optimiser, schedule, step and this rank's random state, if its
    settings and training sequences are the run's (`reads_builtin`: some of its text is a built-in corpus). The
    file holds tensors and plain values only, and is read as such (no code in it can run)."""
    try:
        state = torch.load(run.state_file, map_location="cpu", weights_only=True)
        state["options"], state["world_size"], state["rng"]
    except (UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{run.state_file}: not a fine-tuning state that mfakit wrote ({first_line(err)})"
        ) from err
    # A state written before an option existed ran with that option's default.
    saved = {f.name: f.default for f in fields(FinetuneOptions) if f.default is not MISSING} | state["options"]
    changed = [k for k in RESUME_FIELDS if saved[k] != asdict(run.options)[k]]
    if changed:
        raise FinetuneError(f"cannot resume with changed settings: {', '.join(changed)}")
    if state["world_size"] != run.world:
        raise FinetuneError(f"the run was started on {state['world_size']} processes, not {run.world}")
    # A state written before the checksum existed: built-in text was then read from other documents; other text
    # cannot be checked.
    if "data" not in state and reads_builtin:
        raise FinetuneError(
            "cannot resume: the run was started by an earlier mfakit, which read other documents of the built-in "
            "corpora; start it over"
        )
    if state.get("data", run.data) != run.data:
        raise FinetuneError(
            "cannot resume: the training sequences differ from the run's (its text changed, or the run was started "
            "by a version of mfakit that read other text)"
        )
    if run.sharded:
        load_trainer_tensors(run.model, run.optimizer, state["trainable"], state["optimizer"])
    else:
        run.model.load_state_dict(state["trainable"], strict=False)
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.start_step = state["step"]
    run.ppl_before = state["eval_ppl_before"]
    _set_rng_state(state["rng"][run.rank])


def _train_steps(run: RunState) -> float:
    """The optimiser steps from `run.start_step` to the end; returns the last step's loss (averaged over ranks)."""
    options = run.options
    # The optimiser's own list: a sharded model's parameters() names gathered copies while it is unsharded.
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    bar = tqdm(
        total=run.steps, initial=run.start_step, desc="fine-tuning", disable=not options.progress or run.rank > 0
    )
    start, loss_value, trained = time.time(), float("nan"), 0
    try:
        for step in range(run.start_step, run.steps):
            loss_value = _one_step(run, step, params)
            trained += 1
            tps = trained * run.per_step * options.seq_len / (time.time() - start)
            lr = run.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            bar.update()
            run.write_log(
                {
                    "step": step + 1,
                    "loss": loss_value,
                    "lr": lr,
                    "tokens_per_second": tps,
                    "seconds": time.time() - start,
                }
            )
            if options.eval_every and (step + 1) % options.eval_every == 0 and step + 1 < run.steps:
                run.evaluate(step + 1)
            if options.save_every and (step + 1) % options.save_every == 0 and step + 1 < run.steps:
                _save_state(run, step + 1)
    finally:
        bar.close()
    return loss_value


def _one_step(run: RunState, step: int, params: list[torch.nn.Parameter]) -> float:
    """One optimiser step over grad_accum micro-batches; rank r reads rows r*B.. of each global micro-batch."""
    options = run.options
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(options.grad_accum):
        position = ((step * options.grad_accum + micro) * run.world + run.rank) * options.batch_size
        rows = sequence_indices(position, options.batch_size, len(run.sequences), options.seed)
        ids = run.sequences[rows].to(run.device)
        # Sharded gradients are reduce-scattered after every micro-batch: skipping that (as DDP's no_sync does)
        # would accumulate whole unsharded gradients, the memory sharding is there to save.
        sync = run.world == 1 or run.sharded or micro == options.grad_accum - 1
        with nullcontext() if sync else run.wrapped.no_sync(), run.autocast():
            loss = _train_loss(run.wrapped, run.teacher, ids, options) / options.grad_accum
        loss.backward()
        total += loss.item()
    if run.world > 1:
        reduced = torch.tensor([total], device=run.device)
        dist.all_reduce(reduced)
        total = reduced.item() / run.world
    norm = as_number(torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm))
    if not (math.isfinite(total) and math.isfinite(norm)):
        # Every rank sees the same averaged loss and gradient norm, so every rank stops here, before the step.
        raise FinetuneError(
            f"step {step + 1}: the loss is {total} and the gradient norm {norm}: training diverged (try a lower --lr); "
            "nothing of this step is kept, and no fine-tuned checkpoint is written"
        )
    run.optimizer.step()
    run.scheduler.step()
    return total


def _train_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, ids: torch.Tensor, options) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.zeros((), device=ids.device)
    if options.loss in ("kd", "kd+lm"):
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        loss = loss + kd_loss(logits, target, options.kd_temperature)
    if options.loss in ("lm", "kd+lm"):
        loss = loss + lm_loss(logits, ids)
    return loss


def _save_state(run: RunState, step: int) -> None:
    """Every rank's random state goes to rank 0, which writes the whole state (write, then rename). Sharded, the
    trainable weights and optimiser state are first gathered whole to rank 0 (keyed by parameter name), so the
    file holds full tensors either way."""
    rng = [_rng_state()]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, _rng_state())
    if run.sharded:
        trainable, optimizer = trainer_tensors(run.model, run.optimizer)
    elif run.rank == 0:
        trainable = {n: p.detach().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
        optimizer = run.optimizer.state_dict()
    if run.rank == 0:
        state = {
            "step": step,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": run.scheduler.state_dict(),
            "rng": rng,
            "world_size": run.world,
            "options": asdict(run.options),
            "eval_ppl_before": run.ppl_before,
            "data": run.data,
        }
        replace_file(run.state_file, lambda tmp: torch.save(state, tmp))
    if run.world > 1:
        dist.barrier()


def _finish(run: RunState, model_path: Path, loss: float, seconds: float) -> FinetuneSummary:
    """Final held-out score, the fine-tuned checkpoint (rank 0; sharded, its weights gathered whole to rank 0
    first), and the summary."""
    ppl_after = run.evaluate(run.steps)
    trained = run.steps - run.start_step
    tokens_per_step = run.per_step * run.options.seq_len
    weights = full_weights(run.model) if run.sharded else None
    if run.rank == 0:
        record = {k: v for k, v in asdict(run.options).items() if k not in ("resume", "progress")}
        record.update(world_size=run.world, eval_ppl_before=run.ppl_before, eval_ppl_after=ppl_after)
        _write_model(run.model, model_path, run.out, record, weights)
        run.log.close()
    if run.world > 1:
        dist.barrier()
    return FinetuneSummary(
        out=str(run.out),
        steps=run.steps,
        tokens=run.steps * tokens_per_step,
        lr=run.options.lr,
        final_loss=loss,
        eval_ppl_before=run.ppl_before,
        eval_ppl_after=ppl_after,
        tokens_per_second=trained * tokens_per_step / max(seconds, 1e-9),
        seconds=seconds,
    )


def _write_model(
    model: torch.nn.Module, model_path: Path, out: Path, record: dict, weights: dict[str, torch.Tensor] | None
) -> None:
    """The fine-tuned model as a normal checkpoint in the dtype it was loaded from, staged beside and moved in
    with config.json last (it marks the folder finished), with the run recorded under `conversion.finetune`.
    weights: the full weights of a sharded model (None: the model's own)."""
    staging = out / FINETUNE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    saved_dtype = DTYPES.get(json.loads((model_path / "config.json").read_text()).get("dtype"))
    config = model.config
    config.conversion = {
        "mfakit_version": __version__,
        **(getattr(config, "conversion", None) or {}),
        "finetune": record,
    }
    if weights is None:
        model = model if saved_dtype is None else model.to(saved_dtype)
        model.save_pretrained(staging, safe_serialization=True)
    else:
        if saved_dtype is not None:
            weights = _cast(weights, saved_dtype)
        model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
        # save_pretrained records the dtype of the model it is called on (the float32 sharded one), not the weights'.
        config.dtype = saved_dtype or torch.float32
        config.save_pretrained(staging)
    if isinstance(config, MFAConfig):
        write_mfa_files(staging, model_path, config)
    else:
        copy_side_files(model_path, staging)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(item, out / item.name)
    staging.rmdir()


def _cast(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights in `dtype`, a tensor shared by several names (tied weights) still shared after the cast."""
    cast: dict[int, torch.Tensor] = {}
    for w in weights.values():
        if id(w) not in cast:
            cast[id(w)] = w.to(dtype)
    return {name: cast[id(w)] for name, w in weights.items()}
