"""Converted checkpoints in the clients people use: generate() with every cache that runs on a CPU (dynamic,
static, sliding-window and hybrid static, an explicit StaticCache, torch.compile), left-padded batches, the
tokenizer, output_attentions, PEFT, and the Python API. At the exact budget against the source (tokens equal,
logits within 1e-4); at half the cache, self-consistent."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

from tests.conftest import FAMILIES, QUICK_CALIB, TINY, convert_cli, load, sample_ids

KINDS = [*TINY, *FAMILIES]
MIXED_TEXT = "The for statement, def f(x):\n    return x ** 2  # ünïcødé 模型 🙂\n\tTabs\r\nand  spaces"


@pytest.fixture(scope="module")
def source(tiny, family):
    """source(kind) -> the tiny checkpoint of a Llama-like kind (conftest.TINY) or of another family."""
    return lambda kind: tiny(kind) if kind in TINY else family(kind)


@pytest.fixture(scope="module")
def exact(source, tmp_path_factory):
    """exact(kind, variant) -> the tiny checkpoint converted at the exact budget (once per module)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(kind: str, variant: str) -> Path:
        if (kind, variant) not in cache:
            out = tmp_path_factory.mktemp(f"{kind}-{variant}") / "out"
            calib = ("--calib-tokens", "256", "--calib-seq-len", "128", "--quiet")  # exact: calibration reads nothing
            cache[kind, variant] = convert_cli(source(kind), out, variant, "--kv-ratio", "1.0", calib=calib)
        return cache[kind, variant]

    return get


def generated(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every step."""
    out = model.generate(
        ids,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        pad_token_id=1,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_cache_and_left_padding_match_the_source(exact, source, reference_generations, tokenizer, kind, variant):
    """Dynamic and static caches (sliding-window and hybrid layers where the family has them: the 3-token row fills
    no window) give the source's tokens and logits on a left-padded batch, whose padded row equals that prompt
    alone, with a one-position prefill."""
    model = load(exact(kind, variant))
    ids, mask = padded_batch(tokenizer)
    widths = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    for cache in (None, "static"):
        tokens, scores = generated(model, ids, attention_mask=mask, cache_implementation=cache)
        reference_tokens, reference_scores = reference_generations(kind)[cache]
        assert torch.equal(tokens, reference_tokens), cache
        assert (scores - reference_scores).abs().max() <= 1e-4, cache
    handle.remove()
    assert widths[0] == 1, widths  # prefill computes the logits of the last position only
    alone, _ = generated(model, ids[:1, 9:], cache_implementation="static")
    assert torch.equal(tokens[0, 9:], alone[0])
    reference = load(source(kind))
    assert set(inspect.signature(model.forward).parameters) == set(inspect.signature(reference.forward).parameters)


def padded_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 12-token prompts, the first left-padded down to its last 3 tokens."""
    ids = sample_ids(tokenizer, n=12)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference_generations(source, tokenizer):
    """reference_generations(kind)[cache] -> the source's tokens and logits on the padded batch (once per kind)."""
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            model = load(source(kind))
            ids, mask = padded_batch(tokenizer)
            cache[kind] = {
                c: generated(model, ids, attention_mask=mask, cache_implementation=c) for c in (None, "static")
            }
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral"])
def test_explicit_static_cache_and_compile(exact, source, tokenizer, kind):
    """Prefill and decode step by step through an explicit StaticCache, eager and under torch.compile, at the exact
    budget of MFA-KR (the variant that re-rotates its cached latent); the tiny Mistral's 16-token window wraps."""
    reference_model, model = load(source(kind)), load(exact(kind, "mfa-kr"))
    ids = sample_ids(tokenizer, n=20, batch=1)

    def decode(m) -> torch.Tensor:
        cache = StaticCache(config=m.config, max_cache_len=40)
        steps = [m(ids, cache=cache, use_cache=True).logits[:, -1]]
        token = steps[0].argmax(-1, keepdim=True)
        for _ in range(12):
            steps.append(m(token, cache=cache, use_cache=True).logits[:, -1])
            token = steps[-1].argmax(-1, keepdim=True)
        return torch.stack(steps)

    with torch.no_grad():
        reference = decode(reference_model)
        assert (decode(model) - reference).abs().max() <= 1e-4
        assert (decode(torch.compile(model)) - reference).abs().max() <= 1e-4


def test_half_budget_generation_is_self_consistent(source, tokenizer, tmp_path):
    """Below the exact budget the outputs are the model's own: a static cache, a dynamic one and an uncached
    forward pass agree."""
    for variant in ("mfa", "mfa-kr"):
        model = load(convert_cli(source("gemma2"), tmp_path / variant, variant, "--kv-ratio", "0.5", calib=QUICK_CALIB))
        ids = sample_ids(tokenizer, n=12)
        dynamic, dynamic_scores = generated(model, ids)
        static, static_scores = generated(model, ids, cache_implementation="static")
        assert torch.equal(dynamic, static) and (dynamic_scores - static_scores).abs().max() <= 1e-4
        with torch.no_grad():
            full = model(dynamic[:, :-1]).logits[:, ids.shape[1] - 1 :]
        assert (full - dynamic_scores).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_the_converted_folder_tokenizes_as_the_source(exact, source, kind):
    expected = AutoTokenizer.from_pretrained(source(kind))
    converted = AutoTokenizer.from_pretrained(exact(kind, "mfa-kr"))
    assert type(converted) is type(expected)
    assert converted(MIXED_TEXT)["input_ids"] == expected(MIXED_TEXT)["input_ids"]


def test_tokenizer_and_model_load_without_mfakit_and_without_a_prompt(exact, tmp_path):
    """In a process that cannot import mfakit: the tokenizer and the model load with trust_remote_code=True, and no
    prompt to run code appears (stdin closed; a prompt would also wait)."""
    path = exact("qwen2", "mfa-kr")
    script = f"""
import sys
sys.modules["mfakit"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
print(type(tokenizer).__name__, type(model).__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Do you wish" not in result.stdout + result.stderr
    assert result.stdout.split() == ["Qwen2Tokenizer", "MFAForCausalLM"]


@pytest.mark.parametrize("variant", ["mfa", "mfa-kr"])
def test_output_attentions_match_the_source(exact, source, tokenizer, variant):
    """With eager attention the converted model returns every layer's attention weights, equal to the source's at
    the exact budget; with SDPA it returns what the source's SDPA path returns."""
    ids = sample_ids(tokenizer, n=24)
    for implementation in ("eager", "sdpa"):
        reference = AutoModelForCausalLM.from_pretrained(source("llama-gqa"), attn_implementation=implementation)
        model = AutoModelForCausalLM.from_pretrained(exact("llama-gqa", variant), attn_implementation=implementation)
        with torch.no_grad():
            expected = reference.eval()(ids, output_attentions=True).attentions
            got = model.eval()(ids, output_attentions=True).attentions
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                # Each query head attends over the shared head exactly as its source head did.
                assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
        if implementation == "eager":
            assert len(got) == 2 and got[0] is not None


def test_peft_lora_without_target_modules_merges_and_reloads(exact, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = load(exact("llama-gqa", "mfa-kr"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert lora.get_nb_trainable_parameters()[0] > 0
    ids = sample_ids(tokenizer, n=24)
    merged = lora.merge_and_unload().eval()
    with torch.no_grad():
        expected = merged(ids).logits
    merged.save_pretrained(tmp_path / "merged")
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["mfakit"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "reloaded.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    assert (torch.load(tmp_path / "reloaded.pt") - expected).abs().max() <= 1e-5


def test_the_python_api_works_every_time(tiny, tmp_path):
    """`convert` is a function of the `mfakit.convert` package that no submodule import can shadow."""
    import mfakit.eval.kv  # noqa: F401  (an import that once rebound the name)
    from mfakit.convert import ConvertOptions, convert

    options = ConvertOptions(
        variant="mfa", kv_ratio=1.0, calibration_tokens=256, calibration_seq_len=128, progress=False
    )
    for name in ("first", "second"):
        assert convert(tiny("llama-gqa"), tmp_path / name, options).kv_dim == [32, 32]
    assert callable(convert) and not callable(sys.modules["mfakit.convert"])


LM_EVAL_TASKS = {
    "mfakit_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    },
    "mfakit_rolling": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}],
    },
    "mfakit_generate": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def lm_eval_samples(path: Path, tasks: Path) -> dict[str, list]:
    """Every sample's response of the three local tasks under lm-evaluation-harness's HF backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={path},trust_remote_code=True,dtype=float32",
        device="cpu",
        tasks=list(LM_EVAL_TASKS),
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=1,
        log_samples=True,
    )
    return {task: [s["resps"] for s in samples] for task, samples in results["samples"].items()}


def logliks(samples: list) -> list[float]:
    """The log-likelihood of every request of every sample in order (multiple choice: (value, is_greedy) pairs;
    rolling: values), flat for pytest.approx."""
    return [float(r[0][0]) if isinstance(r[0], tuple) else float(r[0]) for sample in samples for r in sample]


@pytest.mark.slow
def test_lm_evaluation_harness_scores_the_exact_conversion_as_the_source(exact, source, tmp_path):
    """Multiple choice, rolling log-likelihood and generation on local tasks (no hub): per-sample log-likelihoods
    of the exact conversion equal the source's, and its generations are the same."""
    pytest.importorskip("lm_eval")
    import json

    import yaml

    from mfakit.texts import builtin_texts

    texts = builtin_texts("pydoc", "evaluation")
    rows = [
        {"question": t[:120], "choices": [t[120:150], t[200:230], t[300:330]], "answer": 0, "text": t[:400]}
        for t in texts[:6]
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, spec in LM_EVAL_TASKS.items():
        config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (tmp_path / f"{task}.yaml").write_text(yaml.safe_dump({**config, "test_split": "test", **spec}))
    expected = lm_eval_samples(source("llama-gqa"), tmp_path)
    got = lm_eval_samples(exact("llama-gqa", "mfa-kr"), tmp_path)
    for task in ("mfakit_choice", "mfakit_rolling"):
        assert logliks(got[task]) == pytest.approx(logliks(expected[task]), abs=1e-3), task
    assert got["mfakit_generate"] == expected["mfakit_generate"]
