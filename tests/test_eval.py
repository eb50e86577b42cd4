"""Perplexity windows against a hand computation, KV accounting against the formula, comparison outputs, and
one-line errors for bad evaluation input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from mfakit.cli import main
from mfakit.scoring import stream_nll, windows
from tests.conftest import QUICK_CALIB as CALIB
from tests.conftest import one_error_line, sample_ids


@pytest.mark.parametrize(
    ("n", "seq_len", "stride"), [(100, 16, 16), (100, 16, 5), (97, 32, 7), (64, 64, 64), (65, 64, 1)]
)
def test_windows_score_every_token_once(n, seq_len, stride):
    plan = windows(n, seq_len, stride)
    scored = [t for _, end, first in plan for t in range(first, end)]
    # Overlapping windows score every token but the first once; non-overlapping ones cannot score their first.
    unscored = set(range(0, n, seq_len)) if stride == seq_len else {0}
    assert scored == [t for t in range(n) if t not in unscored]
    for i, (begin, end, first) in enumerate(plan):
        assert end - begin <= seq_len and begin < first
        if i and end - begin == seq_len:
            assert first - begin >= seq_len - stride  # every token after the first window sees this much context


def test_strided_perplexity_matches_hand_computation(tiny, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny("llama-gqa")).eval()
    ids = sample_ids(tokenizer, n=53, batch=1)[0]
    seq_len, stride = 16, 6
    total, count = stream_nll(model, ids, seq_len, stride, batch_size=3)
    # By hand: each token t is predicted from the tokens of its window before it, one forward pass per token.
    expected = 0.0
    with torch.no_grad():
        for begin, end, first in windows(ids.numel(), seq_len, stride):
            for t in range(first, end):
                logits = model(ids[begin:t][None]).logits[0, -1]
                expected -= F.log_softmax(logits, -1)[ids[t]].item()
    assert count == ids.numel() - 1
    assert total == pytest.approx(expected, rel=1e-5)


def test_batched_windows_equal_single(tiny, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny("qwen2")).eval()
    ids = sample_ids(tokenizer, n=100, batch=1)[0]
    one = stream_nll(model, ids, 32, 32, batch_size=1)
    many = stream_nll(model, ids, 32, 32, batch_size=4)
    assert one[1] == many[1] and one[0] == pytest.approx(many[0], rel=1e-5)


def test_eval_ppl_cli_json(capsys, tiny):
    assert main(["eval", "ppl", str(tiny("llama-gqa")), "--seq-len", "64", "--max-tokens", "640", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 10 * 63 and result["seq_len"] == 64 and result["stride"] == 64
    assert math.isclose(result["ppl"], math.exp(result["nll"]))
    assert {"model", "ppl", "tokens", "seconds", "tokens_per_second"} <= set(result)
    assert result["text"].startswith("builtin:pydoc")


@pytest.mark.parametrize("variant", ["source", "mfa", "mfa-kr"])
def test_eval_kv_matches_formula(capsys, tiny, tmp_path, variant):
    path = tiny("mistral")
    if variant != "source":
        out = tmp_path / variant
        assert main(["convert", str(path), str(out), "--variant", variant, "--kv-ratio", "0.5", *CALIB]) == 0
        path = out
    capsys.readouterr()
    # The tiny Mistral keeps a 16-token window: 40 tokens of context keep 15 in the cache.
    assert main(["eval", "kv", str(path), "--context", "40", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    numbers = {"source": 64, "mfa": 32, "mfa-kr": 32}[variant]
    assert report["kind"] == variant
    assert report["measured_bytes"] == 2 * 2 * 15 * numbers * 4
    assert report["measured_bytes_per_token"] == pytest.approx(report["formula_bytes_per_token"])
    assert report["measured_bytes_per_token_per_layer"] == pytest.approx(report["formula_bytes_per_token_per_layer"])


def test_eval_kv_baseline_ratio(capsys, tiny, tmp_path):
    out = tmp_path / "kr"
    assert main(["convert", str(tiny("llama-gqa")), str(out), "--variant", "mfa-kr", "--kv-ratio", "0.25", *CALIB]) == 0
    capsys.readouterr()
    assert main(["eval", "kv", str(out), "--baseline", str(tiny("llama-gqa")), "--context", "32"]) == 0
    assert "ratio to baseline: 0.2500" in capsys.readouterr().out


def test_eval_compare_writes_table_and_plot(capsys, tiny, tmp_path):
    pytest.importorskip("matplotlib")
    src = tiny("llama-gqa")
    models = []
    for variant in ("mfa", "mfa-kr"):
        out = tmp_path / variant
        assert main(["convert", str(src), str(out), "--variant", variant, "--kv-ratio", "0.5", *CALIB]) == 0
        models.append(str(out))
    results = tmp_path / "results"
    assert (
        main(["eval", "compare", str(src), *models, "--seq-len", "64", "--max-tokens", "512", "--out", str(results)])
        == 0
    )
    rows = json.loads((results / "compare.json").read_text())
    assert [r["kind"] for r in rows] == ["source", "mfa", "mfa-kr"]
    assert rows[0]["ppl_ratio"] == 1.0 and all(r["kv_ratio"] == pytest.approx(0.5) for r in rows[1:])
    assert "| mfa-kr | mfa-kr |" in (results / "compare.md").read_text()
    assert (results / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_compare_scores_each_text_as_a_domain(capsys, tiny, tmp_path):
    """Two texts are two domains: each model's ratio per domain against the source's perplexity there, and their
    geometric mean; the same text given whole scores as the domain did."""
    from mfakit.texts import builtin_texts

    src = tiny("llama-gqa")
    out = tmp_path / "kr"
    assert main(["convert", str(src), str(out), "--variant", "mfa-kr", "--kv-ratio", "0.25", *CALIB]) == 0
    held_out = builtin_texts("pydoc", "evaluation")
    (tmp_path / "first.txt").write_text("\n\n".join(held_out[:8]))
    (tmp_path / "second.txt").write_text("\n\n".join(held_out[8:]))
    texts = [str(tmp_path / "first.txt"), str(tmp_path / "second.txt")]
    common = ["--seq-len", "64", "--max-tokens", "640", "--out", str(tmp_path / "results")]
    assert main(["eval", "compare", str(src), str(out), "--text-file", *texts, *common]) == 0
    rows = json.loads((tmp_path / "results" / "compare.json").read_text())
    ratios = [d["ppl_ratio"] for d in rows[1]["domains"].values()]
    assert list(rows[1]["domains"]) == ["first", "second"] and len(set(ratios)) == 2
    assert rows[1]["ppl_ratio"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
    for name, domain in rows[1]["domains"].items():
        assert domain["ppl"] == pytest.approx(rows[0]["domains"][name]["ppl"] * domain["ppl_ratio"])
    capsys.readouterr()
    assert (
        main(["eval", "ppl", str(out), "--text-file", texts[1], "--seq-len", "64", "--max-tokens", "640", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(rows[1]["domains"]["second"]["ppl"])
    assert "geo-mean" in (tmp_path / "results" / "compare.md").read_text()


def test_eval_bad_inputs(capsys, tiny, tmp_path):
    model = str(tiny("llama-gqa"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("A short text.")
    (tmp_path / "folder").mkdir()
    cases = [
        (["eval", "ppl", model, "--text-file", str(tmp_path / "missing.txt")], "no such file"),
        (["eval", "ppl", model, "--text-file", str(tmp_path / "empty.txt")], "the text is empty"),
        (["eval", "ppl", model, "--text-file", str(tmp_path / "short.txt")], "fewer than one window of 1024"),
        (["eval", "ppl", model, "--dataset", str(tmp_path / "no-such-dataset")], "could not be loaded"),
        (["eval", "ppl", str(tmp_path / "folder")], "not a checkpoint folder"),
        (["eval", "kv", str(tmp_path / "folder")], "not a checkpoint folder"),
        (["eval", "ppl", model, "--seq-len", "64", "--stride", "65"], "stride must be in 1..seq_len"),
    ]
    for argv, message in cases:
        assert message in one_error_line(capsys, argv), argv
