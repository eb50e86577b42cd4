"""Fully sharded data parallelism for a model that does not fit one device: PyTorch's own FSDP2 (`fully_shard`)
over every decoder layer and the rest of the model, and its `torch.distributed.checkpoint` state-dict helpers for
moving full (unsharded) tensors in and out. Every function here is collective: all ranks call it, in the same order.

Loading never holds the whole model on a device: every rank builds it on the meta device and shards it there;
rank 0 alone reads the checkpoint (into host memory) and broadcasts it, each rank keeping its own shard."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from mfakit.loading import load_model, torch_dtype

logger = logging.getLogger(__name__)

# Full tensors, gathered to rank 0's host memory (other ranks get empty dicts); only what trains.
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Full tensors given to every rank, each keeping its shard; the frozen weights are not in a trainer state.
_LOAD = StateDictOptions(full_state_dict=True, strict=False)


def load_sharded(
    path: str | Path,
    device: str,
    dtype: str,
    rank: int,
    prepare: Callable[[torch.nn.Module], None],
    reshard_root: bool = False,
) -> torch.nn.Module:
    """The causal LM at `path` in `dtype`, sharded over all ranks on `device`, in eval mode. `prepare` runs on the
    unsharded (meta) model first: what requires a gradient must be settled before sharding.

    reshard_root: free the root's gathered weights (embeddings, final norm, head) after each forward too; right for
    a teacher that never runs backward, wrong for a student whose backward needs them at once."""
    full = load_model(path, "cpu", dtype) if rank == 0 else None  # rank 0 first: a bad checkpoint fails here
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        # dtype as from_pretrained gives it (buffers such as rotary frequencies keep their own dtype).
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), trust_remote_code=False)
    if Path(path, "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    prepare(model)
    shard(model, device, reshard_root)
    model.to_empty(device=device)
    weights = full.state_dict() if full is not None else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _broadcast_buffers(model, full, device)
    return model.eval()


def shard(model: torch.nn.Module, device: str, reshard_root: bool = False) -> None:
    """fully_shard each decoder layer (the classes the model names in `_no_split_modules`), then the root (the
    embeddings, final norm and head), over one mesh of all ranks. A layer is gathered only while it runs."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        logger.warning("%s names no decoder layer class: only the whole model is sharded", type(model).__name__)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_root)


def _broadcast_buffers(model: torch.nn.Module, full: torch.nn.Module | None, device: str) -> None:
    """Rank 0's buffers (rotary frequencies and the like, not in the state dict) on every rank: to_empty left them
    uninitialised. Small, so sent as objects."""
    buffers = [None if full is None else dict(full.named_buffers(remove_duplicate=False))]
    dist.broadcast_object_list(buffers, src=0)
    for name, value in buffers[0].items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, value.to(device))


def trainer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimiser state) as full tensors keyed by parameter name, on rank 0's host (empty
    dicts on the other ranks): what a trainer state holds, independent of how it was sharded."""
    return get_state_dict(model, optimizer, options=_SAVE)


def load_trainer_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict, optimizer_state: dict
) -> None:
    """The inverse of `trainer_tensors`: every rank passes the full tensors and keeps its shard."""
    set_state_dict(model, optimizer, model_state_dict=trainable, optim_state_dict=optimizer_state, options=_LOAD)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model as a full tensor on rank 0's host (an empty dict on the other ranks). Tied weights
    (one parameter under several names) share one tensor, as in an unsharded model's state dict: save_pretrained
    recognises ties by shared storage and writes them once."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in weights:
            weights[name] = weights[owner]
    return weights


def as_number(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over sharded gradients returns one) as a float."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)
