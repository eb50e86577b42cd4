"""Loading source and converted checkpoints and their tokenizers (one-line errors for what is not a checkpoint),
and the one map from dtype names to torch dtypes."""

from __future__ import annotations

from pathlib import Path
from pickle import UnpicklingError

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, AutoTokenizer

import mfakit.model  # noqa: F401  (registers the MFA classes with the Auto classes)
from mfakit.checkpoint import check_checkpoint_folder
from mfakit.errors import MfakitError, OptionsError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(MfakitError):
    """A model path that is not a loadable causal-LM checkpoint."""


def torch_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype of a name in `allowed` (a one-line error for any other)."""
    if name not in allowed:
        raise ModelLoadError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return DTYPES[name]


def check_device(device: str) -> None:
    """A one-line error for a device name torch does not know or a device this machine does not have."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise OptionsError(f"--device {device}: not a device name ({first_line(err)})") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
    if (
        kind == "cuda"
        and torch.device(device).index is not None
        and torch.device(device).index >= torch.cuda.device_count()
    ):
        raise OptionsError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise OptionsError(f"--device {device}: MPS is not available")


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """A causal LM (source or converted) in `dtype` on `device`, in eval mode; never runs code from the folder
    (converted checkpoints use mfakit's own registered classes)."""
    check_device(device)
    check_checkpoint_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, StrictDataclassError, UnpicklingError) as err:
        raise ModelLoadError(f"{path}: cannot load a causal LM ({first_line(err)})") from err
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (a one-line error when the folder has none); never runs code from the folder."""
    check_checkpoint_folder(path)
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{path}: cannot load its tokenizer ({first_line(err)})") from err
