"""Loading source and converted checkpoints and their tokenizers (one-line errors for what is not a checkpoint),
and the one map from dtype names to torch dtypes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mfakit.model  # noqa: F401  (registers the MFA classes with the Auto classes)
from mfakit.checkpoint import check_checkpoint_folder
from mfakit.errors import MfakitError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(MfakitError):
    """A model path that is not a loadable causal-LM checkpoint."""


def torch_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype of a name in `allowed` (a one-line error for any other)."""
    if name not in allowed:
        raise ModelLoadError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return DTYPES[name]


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    check_checkpoint_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: cannot load a causal LM ({first_line(err)})") from err
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    check_checkpoint_folder(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: cannot load its tokenizer ({first_line(err)})") from err
