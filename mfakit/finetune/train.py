"""Short continued training of a converted model: distillation from its source (KL to the teacher's next-token
distribution), optionally plus the language-model loss; one process, or many under `torchrun` with PyTorch's own
DistributedDataParallel (rank 0 writes). Checkpoints in OUT/trainer resume exactly: trainable weights, optimiser,
schedule, data position and random state."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfakit.convert.io import CheckpointError, copy_side_files
from mfakit.data import TextSource, load_texts, parse_spec, tokenize
from mfakit.eval.loading import load_model, load_tokenizer, torch_dtype
from mfakit.eval.ppl import stream_nll
from mfakit.finetune.data import check_disjoint, pack, parse_train_spec, sequence_indices, training_stream
from mfakit.model.modeling_mfa import MFAAttention, MFAConfig

LOSSES = ("kd", "lm", "kd+lm")
TRAINABLE = ("attention", "all")
TRAINER_DIR = "trainer"
LOG_FILE = "finetune-log.jsonl"
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
)


class FinetuneError(ValueError):
    """Settings a fine-tuning run cannot start with."""


@dataclass
class FinetuneConfig:
    """tokens or steps: the run's length (tokens are rounded up to whole optimiser steps of
    batch_size * grad_accum * world_size sequences of seq_len). warmup: linear warm-up steps (default 10% of the
    steps, at least 1 and at most 100), then linear decay to zero. eval_every: held-out perplexity every N steps
    (0: only before and after)."""

    teacher: str | None = None
    data: list[str] = field(default_factory=lambda: ["builtin:pydoc"])
    text_column: str = "text"
    tokens: int | None = None
    steps: int | None = None
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
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
    device: str = "cpu"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    progress: bool = True


@dataclass
class FinetuneSummary:
    out: str
    steps: int
    tokens: int
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
    if trainable not in TRAINABLE:
        raise FinetuneError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
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


def _eval_ids(held_out: TextSource | None, tokenizer, max_tokens: int) -> torch.Tensor | None:
    if held_out is None:
        return None
    return tokenize(tokenizer, load_texts(held_out, part="evaluation"))[:max_tokens]


def _held_out_ppl(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, autocast) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        nll, count = stream_nll(model, ids, min(seq_len, ids.numel()), min(seq_len, ids.numel()))
    model.train(was_training)
    return math.exp(nll / count)


def _rng_state() -> dict:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(path: Path, state: dict) -> None:
    """Write then rename, so a run killed while saving keeps the previous state."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_model(model: torch.nn.Module, model_path: Path, out: Path, record: dict) -> None:
    """The fine-tuned model as a normal checkpoint: weights, side files, and config.json last (it marks the
    folder finished), with the run recorded in the config."""
    staging = out / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    source_config = json.loads((model_path / "config.json").read_text())
    saved_dtype = source_config.get("dtype")
    if saved_dtype in ("float32", "bfloat16", "float16"):
        model = model.to(torch_dtype(saved_dtype))
    model.save_pretrained(staging, safe_serialization=True)
    copy_side_files(model_path, staging)
    if isinstance(model.config, MFAConfig):
        shutil.copy2(model_path / "modeling_mfa.py", staging / "modeling_mfa.py")
    config = json.loads((staging / "config.json").read_text())
    conversion = dict(config.get("conversion") or {})
    conversion["finetune"] = record
    config["conversion"] = conversion
    if "auto_map" in source_config:
        config["auto_map"] = source_config["auto_map"]
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(item, out / item.name)
    staging.rmdir()


def finetune(model_path: str | Path, out: str | Path, config: FinetuneConfig | None = None) -> FinetuneSummary:
    """Fine-tune `model_path` (a converted checkpoint, or any causal LM with --trainable all) into `out`."""
    config = config or FinetuneConfig()
    model_path, out = Path(model_path), Path(out)
    if config.loss not in LOSSES:
        raise FinetuneError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if (config.tokens is None) == (config.steps is None):
        raise FinetuneError("give exactly one of tokens and steps")
    for name in ("seq_len", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise FinetuneError(f"{name} must be at least 1, got {getattr(config, name)}")
    if (config.tokens or config.steps or 0) < 1 or config.lr <= 0 or config.kd_temperature <= 0:
        raise FinetuneError("tokens/steps, lr and kd_temperature must be positive")
    if out.resolve() == model_path.resolve():
        raise FinetuneError(f"{out} is the model being trained; write the result elsewhere")
    state_file = out / TRAINER_DIR / "state.pt"
    if out.exists() and not config.resume:
        raise CheckpointError(f"{out} exists (pass --resume to continue a run there, or choose another folder)")
    if config.resume and not state_file.is_file():
        raise CheckpointError(f"{out} holds no fine-tuning state to resume ({state_file} is missing)")
    sources = [parse_train_spec(s, config.text_column) for s in config.data]
    held_out = parse_spec(config.eval_text, config.text_column) if config.eval_text else None
    check_disjoint(sources, held_out)
    torch_dtype(config.dtype)
    with _distributed(config.device) as (rank, world, device):
        return _train(model_path, out, config, sources, held_out, state_file, rank, world, device)


def _train(model_path, out, config, sources, held_out, state_file, rank, world, device) -> FinetuneSummary:
    torch.manual_seed(config.seed)
    model = load_model(model_path, device, "float32")
    tokenizer = load_tokenizer(model_path)
    select_trainable(model, config.trainable)
    teacher = None
    if config.loss != "lm" or any(isinstance(s, int) for s in sources):
        teacher = load_model(_teacher_path(model_path, config.teacher), device, config.dtype)
        teacher.requires_grad_(False)
    sequences = pack(training_stream(sources, tokenizer, teacher, config.seq_len, config.seed), config.seq_len)
    per_step = config.batch_size * config.grad_accum * world
    steps = config.steps or -(-config.tokens // (per_step * config.seq_len))
    warmup = config.warmup if config.warmup is not None else min(100, max(1, steps // 10))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    start_step = 0
    if config.resume:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        changed = [k for k in RESUME_FIELDS if state["config"][k] != asdict(config)[k]]
        if changed:
            raise FinetuneError(f"cannot resume with changed settings: {', '.join(changed)}")
        if state["world_size"] != world:
            raise FinetuneError(f"the run was started on {state['world_size']} processes, not {world}")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        ppl_before = state["eval_ppl_before"]
        _set_rng_state(state["rng"][rank])
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )
    device_type = torch.device(device).type

    def autocast():
        if config.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type, dtype=torch_dtype(config.dtype))

    eval_ids = _eval_ids(held_out, tokenizer, config.eval_tokens) if rank == 0 else None
    if rank == 0:
        (out / TRAINER_DIR).mkdir(parents=True, exist_ok=True)
    log = open(out / LOG_FILE, "a") if rank == 0 else None  # noqa: SIM115  (kept open for the whole run)

    def write_log(record: dict) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate(step: int) -> float | None:
        ppl = None
        if eval_ids is not None:
            ppl = _held_out_ppl(model, eval_ids, config.seq_len, autocast)
            write_log({"step": step, "eval_ppl": ppl})
        if world > 1:
            dist.barrier()
        return ppl

    if start_step == 0:
        ppl_before = evaluate(0)
    bar = tqdm(total=steps, initial=start_step, desc="fine-tuning", disable=not config.progress or rank > 0)
    start, loss_value, trained = time.time(), float("nan"), 0
    try:
        for step in range(start_step, steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accum):
                position = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
                ids = sequences[sequence_indices(position, config.batch_size, len(sequences), config.seed)].to(device)
                sync = world == 1 or micro == config.grad_accum - 1
                with nullcontext() if sync else wrapped.no_sync(), autocast():
                    loss = _train_loss(wrapped, teacher, ids, config) / config.grad_accum
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            trained += 1
            loss_value = total
            if world > 1:
                reduced = torch.tensor([total], device=device)
                dist.all_reduce(reduced)
                loss_value = reduced.item() / world
            elapsed = time.time() - start
            tps = trained * per_step * config.seq_len / elapsed
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
            bar.update()
            write_log({"step": step + 1, "loss": loss_value, "lr": lr, "tokens_per_second": tps, "seconds": elapsed})
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < steps:
                evaluate(step + 1)
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < steps:
                extra = {"eval_ppl_before": ppl_before}
                _checkpoint(model, optimizer, scheduler, step + 1, config, world, rank, state_file, extra)
    finally:
        bar.close()
    ppl_after = evaluate(steps)
    seconds = time.time() - start
    summary = FinetuneSummary(
        out=str(out),
        steps=steps,
        tokens=steps * per_step * config.seq_len,
        final_loss=loss_value,
        eval_ppl_before=ppl_before,
        eval_ppl_after=ppl_after,
        tokens_per_second=trained * per_step * config.seq_len / max(seconds, 1e-9),
        seconds=seconds,
    )
    if rank == 0:
        record = {k: v for k, v in asdict(config).items() if k not in ("resume", "progress")}
        record.update(world_size=world, eval_ppl_before=ppl_before, eval_ppl_after=ppl_after)
        _write_model(model, model_path, out, record)
        log.close()
    if world > 1:
        dist.barrier()
    return summary


def _train_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, ids: torch.Tensor, config) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.zeros((), device=ids.device)
    if config.loss in ("kd", "kd+lm"):
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        loss = loss + kd_loss(logits, target, config.kd_temperature)
    if config.loss in ("lm", "kd+lm"):
        loss = loss + lm_loss(logits, ids)
    return loss


def _checkpoint(model, optimizer, scheduler, step, config, world, rank, state_file: Path, extra: dict) -> None:
    """Every rank's random state goes to rank 0, which writes the whole state."""
    rng = [_rng_state()]
    if world > 1:
        rng = [None] * world
        dist.all_gather_object(rng, _rng_state())
    if rank == 0:
        state = {
            "step": step,
            "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "world_size": world,
            "config": asdict(config),
            **extra,
        }
        _save_state(state_file, state)
    if world > 1:
        dist.barrier()
