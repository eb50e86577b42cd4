"""Fine-tuning by distillation on tiny converted models: the losses and schedule, that training brings the student
towards the teacher, exact resumption, refusals, generated data, and two processes under torchrun (gloo): DDP, and
FSDP2 with its resumption after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from mfakit import texts as texts_module
from mfakit.cli import main
from mfakit.convert import PLAIN_METHOD, ConvertOptions, convert
from mfakit.errors import OptionsError
from mfakit.families import cache_share
from mfakit.finetune import FinetuneOptions, finetune
from mfakit.finetune import train as train_module
from mfakit.finetune.dataset import sequence_indices, training_sequences
from mfakit.finetune.train import LR, LR_BELOW_HALF, kd_loss, lr_factor, native_bfloat16, resolve_dtype
from mfakit.texts import TextSource, TextSourceError, builtin_texts
from tests.conftest import one_error_line, sample_ids

FAST = FinetuneOptions(
    steps=6,
    seq_len=64,
    batch_size=4,
    lr=3e-3,
    warmup=1,
    eval_tokens=512,
    progress=False,
    data=["builtin:pydoc"],
    dtype="float32",
)


@pytest.fixture(scope="module")
def teacher(trained_tiny) -> Path:
    return trained_tiny


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    """The teacher converted to MFA-KR at a sixteenth of its cache by the plain method: far enough from its source
    (KL 0.013 on held-out text) that 40 steps of distillation show well above their noise (0.54x). At an eighth,
    calibrated on the calibration part alone, it starts at 0.011 and those steps leave 0.70x, at the test's bound."""
    out = tmp_path_factory.mktemp("student") / "kr"
    options = ConvertOptions(
        variant="mfa-kr", kv_ratio=0.0625, method=PLAIN_METHOD, calibration_tokens=2048, calibration_seq_len=128
    )
    convert(teacher, out, options)
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def teacher_kl(student_path: Path, teacher_path: Path, ids: torch.Tensor) -> float:
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()(ids).logits
        t = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()(ids).logits
    return float(kd_loss(s, t))


def test_kd_loss_is_the_kl_divergence():
    t = torch.randn(3, 5, 11)
    assert kd_loss(t, t).abs() < 1e-6
    s = torch.randn(3, 5, 11)
    p, log_p, log_q = t.softmax(-1), t.log_softmax(-1), s.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t), expected, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, 2.0), 4 * kd_loss(s / 2, t / 2), atol=1e-6)


def test_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 4, 20) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))
    assert f[-1] > 0 and lr_factor(20, 4, 20) == 0


def test_data_order_covers_every_sequence_each_epoch():
    order = sequence_indices(0, 30, 10, seed=3)
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]
    assert sequence_indices(7, 13, 10, seed=3) == order[7:20]


def test_training_texts_are_mixed_in_equal_shares(tokenizer, tmp_path):
    """Each text supplies an equal share of the run's sequences, spread over it (a shorter text all it has), and
    every sequence is a window of its text."""
    long_text, short_text = tmp_path / "long.txt", tmp_path / "short.txt"
    long_text.write_text(Path(json.__file__).read_text() * 8)
    short_text.write_text(" ".join(f"word{i}" for i in range(100)))
    ids = {p: tokenizer(p.read_text(), add_special_tokens=False)["input_ids"] for p in (long_text, short_text)}
    short_windows = len(ids[short_text]) // 64
    assert 0 < short_windows < 10

    def windows_of(path: Path, rows: torch.Tensor) -> bool:
        text = ids[path]
        return all(any(text[i : i + 64] == r.tolist() for i in range(len(text) - 63)) for r in rows)

    texts = [TextSource("file", str(long_text)), TextSource("file", str(short_text))]
    sequences = training_sequences(texts, tokenizer, None, 64, 0, 20)
    assert sequences.shape == (10 + short_windows, 64)
    assert windows_of(long_text, sequences[:10]) and windows_of(short_text, sequences[10:])
    alone = training_sequences(texts[:1], tokenizer, None, 64, 0, 20)
    assert alone.shape == (20, 64) and alone[0].tolist() == ids[long_text][:64]
    assert alone[-1].tolist() == ids[long_text][len(ids[long_text]) - 64 :]
    with pytest.raises(TextSourceError, match="give a teacher"):
        training_sequences([*texts, 512], tokenizer, None, 64, 0, 20)


def test_built_in_training_text_is_the_training_part(tokenizer, monkeypatch):
    """Fine-tuning on a built-in corpus reads its training part, never the calibration part that conversions fit or
    the evaluation part: every sequence is a window of the training part. (Some passages recur in several
    documentation topics, so a window can also occur in another part's text; what is read is checked directly.)"""
    read = []
    real_load = texts_module.load_texts
    monkeypatch.setattr(
        texts_module, "load_texts", lambda source, part, **kw: read.append(part) or real_load(source, part, **kw)
    )
    sequences = training_sequences([TextSource("builtin", "pydoc")], tokenizer, None, 64, 0, 12)
    assert read == ["training"]
    ids = tokenizer("\n\n".join(builtin_texts("pydoc", "training")), add_special_tokens=False)["input_ids"]
    windows = {tuple(ids[i : i + 64]) for i in range(len(ids) - 63)}
    assert len({tuple(r.tolist()) for r in sequences}) == 12 and all(tuple(r.tolist()) in windows for r in sequences)


def test_auto_dtype_is_bfloat16_where_the_hardware_has_it(student, tmp_path, monkeypatch):
    """--dtype auto resolves to bfloat16 on a CPU with AVX512-BF16 or AMX and to float32 on one without; the run
    records the dtype it resolved to, and an explicit dtype is used as given."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not native_bfloat16("cpu") and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    one_step = replace(FAST, steps=1, eval_text=None, dtype="auto")
    finetune(student, tmp_path / "f32", one_step)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bfloat16("cpu") and resolve_dtype("auto", "cpu") == "bfloat16" and not native_bfloat16("meta")
    finetune(student, tmp_path / "bf16", one_step)
    recorded = [
        json.loads((tmp_path / run / "config.json").read_text())["conversion"]["finetune"]["dtype"]
        for run in ("f32", "bf16")
    ]
    assert recorded == ["float32", "bfloat16"]
    with pytest.raises(OptionsError, match="auto, float32, bfloat16"):
        replace(FAST, dtype="float64")


def test_distillation_moves_the_student_towards_the_teacher(student, teacher, tokenizer, tmp_path):
    finetune(student, tmp_path / "ft", replace(FAST, steps=40, lr=1e-3, warmup=5))
    ids = sample_ids(tokenizer, n=64, batch=4)
    before = teacher_kl(student, teacher, ids)
    after = teacher_kl(tmp_path / "ft", teacher, ids)
    assert after < 0.7 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "ft" / "finetune-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in log if "eval_ppl" in r] == [0, 40]


def test_output_is_a_checkpoint_with_only_attention_trained(student, tmp_path):
    out = tmp_path / "ft"
    finetune(student, out, FAST)
    before, after = weights(student), weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert all(before[k].dtype == after[k].dtype for k in before)
    config = json.loads((out / "config.json").read_text())
    assert config["conversion"]["finetune"]["steps"] == 6
    assert config["auto_map"] and (out / "modeling_mfa.py").is_file()
    assert main(["eval", "ppl", str(out), "--max-tokens", "256", "--seq-len", "64", "--json"]) == 0


def test_interrupted_run_resumes_to_the_same_weights(student, tmp_path, monkeypatch):
    config = replace(FAST, steps=5, save_every=2)
    finetune(student, tmp_path / "whole", config)

    calls = {"n": 0}
    real = train_module._train_loss

    def interrupt_at_fourth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_loss", interrupt_at_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(student, tmp_path / "cut", config)
    monkeypatch.setattr(train_module, "_train_loss", real)
    assert not (tmp_path / "cut" / "config.json").exists()
    finetune(student, tmp_path / "cut", replace(config, resume=True))
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert loss_curve(tmp_path / "cut") == loss_curve(tmp_path / "whole")


def loss_curve(out: Path) -> dict[int, float]:
    """Loss per step from the run's log; a resumed run logs the steps after its last saved state again."""
    records = [json.loads(line) for line in (out / "finetune-log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_default_learning_rate_follows_the_cache_share(student, teacher, tmp_path):
    """Unless given, the peak rate is LR for a model that caches at least half of its source's KV and LR_BELOW_HALF
    below (the student: a sixteenth); a given rate is used as it is."""
    half = tmp_path / "half"
    calibration = {"calibration_tokens": 256, "calibration_seq_len": 128}
    convert(
        teacher, half, ConvertOptions(variant="mfa", kv_ratio=0.5, method=PLAIN_METHOD, progress=False, **calibration)
    )
    shares = [cache_share(AutoConfig.from_pretrained(p)) for p in (teacher, half, student)]
    assert shares == [1.0, pytest.approx(0.5), pytest.approx(0.0625)]
    one_step = replace(FAST, steps=1, eval_text=None)
    assert finetune(half, tmp_path / "ft-half", replace(one_step, lr=None)).lr == LR
    assert finetune(student, tmp_path / "ft", replace(one_step, lr=None)).lr == LR_BELOW_HALF
    assert finetune(student, tmp_path / "ft", replace(one_step, overwrite=True)).lr == FAST.lr


def test_refusals_are_one_line(student, tiny, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("some words to train on and to evaluate on " * 200)
    args = ["finetune", str(student), str(tmp_path / "a"), "--steps", "1", "--seq-len", "32", "--quiet"]
    assert "evaluation text" in one_error_line(capsys, [*args, "--data", str(text), "--eval-text", str(text)])
    assert "no fine-tuning state" in one_error_line(capsys, [*args, "--resume"])
    assert "positive token count" in one_error_line(capsys, [*args, "--data", "generate:zero"])
    assert "must be positive" in one_error_line(capsys, [*args, "--kd-temperature", "0"])
    assert "--trainable all" in one_error_line(
        capsys, ["finetune", str(tiny("llama-gqa")), str(tmp_path / "b"), "--steps", "1"]
    )
    assert "elsewhere" in one_error_line(capsys, ["finetune", str(student), str(student), "--steps", "1"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    assert "--resume" in one_error_line(capsys, ["finetune", str(student), str(tmp_path / "c"), "--steps", "1"])


def test_changed_settings_refuse_to_resume(student, tmp_path):
    config = replace(FAST, steps=3, save_every=1)
    finetune(student, tmp_path / "ft", config)
    with pytest.raises(ValueError, match="changed settings: lr"):
        finetune(student, tmp_path / "ft", replace(config, lr=1e-3, resume=True))
    with pytest.raises(ValueError, match="changed settings: parallel"):
        finetune(student, tmp_path / "ft", replace(config, parallel="fsdp", resume=True))
    with pytest.raises(ValueError, match="changed settings: dtype"):
        finetune(student, tmp_path / "ft", replace(config, dtype="bfloat16", resume=True))
    with pytest.raises(OptionsError, match="parallel must be one of ddp, fsdp"):
        replace(config, parallel="zero")
    # A state written before `parallel` existed ran with its default, and resumes.
    state_file = tmp_path / "ft" / "trainer" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["options"]["parallel"]
    torch.save(state, state_file)
    assert finetune(student, tmp_path / "ft", replace(config, resume=True)).steps == 3
    # One written before the training sequences' checksum read other documents of the built-in corpora.
    del state["data"]
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="earlier mfakit"):
        finetune(student, tmp_path / "ft", replace(config, resume=True))


def test_resuming_on_other_training_text_is_refused(student, tmp_path):
    """A resumed run must read the sequences it started on: changed text (a file edited, or built-in text that
    another mfakit version split differently) is refused, and the saved state is left as it was."""
    text = tmp_path / "train.txt"
    text.write_text(Path(json.__file__).read_text())
    config = replace(FAST, steps=3, save_every=1, data=[str(text)], eval_text=None)
    finetune(student, tmp_path / "ft", config)
    state_file = tmp_path / "ft" / "trainer" / "state.pt"
    saved = state_file.read_bytes()
    text.write_text(Path(json.__file__).read_text().upper())
    with pytest.raises(ValueError, match="training sequences differ"):
        finetune(student, tmp_path / "ft", replace(config, resume=True))
    assert state_file.read_bytes() == saved
    text.write_text(Path(json.__file__).read_text())
    assert finetune(student, tmp_path / "ft", replace(config, resume=True)).steps == 3
    # A file's text in a state written before the checksum existed cannot be checked, and resumes.
    state = torch.load(state_file, weights_only=True)
    del state["data"]
    torch.save(state, state_file)
    assert finetune(student, tmp_path / "ft", replace(config, resume=True)).steps == 3


def test_generated_data_and_all_parameters(student, tmp_path):
    out = tmp_path / "gen"
    finetune(student, out, replace(FAST, data=["generate:512"], trainable="all", loss="kd+lm", eval_text=None))
    before, after = weights(student), weights(out)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_gradient_checkpointing_gives_the_same_training(student, tmp_path):
    finetune(student, tmp_path / "plain", replace(FAST, steps=2, eval_text=None))
    finetune(student, tmp_path / "ckpt", replace(FAST, steps=2, eval_text=None, gradient_checkpointing=True))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# Two processes read batch 2 each where one process reads batch 4: the same sequences per step. In float32 on every
# machine: the runs agree up to summation order, which bfloat16's rounding would swamp.
TORCHRUN_ARGS = ["--steps", "3", "--seq-len", "64", "--lr", "3e-3", "--warmup", "1", "--eval-tokens", "256", "--quiet"]
TORCHRUN_ARGS += ["--dtype", "float32"]


def torchrun(*args: str, script: tuple[str, ...] = ("-m", "mfakit.cli")) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2` on gloo, one thread per process (2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run([*launch, *script, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(student, tmp_path_factory) -> Path:
    """One process, batch 4, the attention trained (the default)."""
    out = tmp_path_factory.mktemp("one") / "ft"
    assert main(["finetune", str(student), str(out), "--batch-size", "4", *TORCHRUN_ARGS]) == 0
    return out


# Defines write_rank_line(text) in a torchrun script: each rank writes its line to its own file `rank<RANK>` beside
# the script, because the ranks share stdout, where their lines can interleave mid-line.
WRITE_RANK_LINE = """
import os
def write_rank_line(text):
    with open(os.path.join(os.path.dirname(__file__), "rank" + os.environ["RANK"]), "w") as log:
        log.write(text)
"""


def rank_lines(folder: Path) -> list[str]:
    """The line each of the two torchrun ranks wrote with `write_rank_line` (scripts in `folder`), by rank."""
    return [(folder / f"rank{rank}").read_text() for rank in (0, 1)]


# Runs mfakit under torchrun and writes, as the process group is destroyed, whether the trained model still lives.
MODEL_AT_DESTROY = """
import sys, weakref
import torch.distributed as dist
from mfakit.cli import main
from mfakit.finetune import train
models, real_start, real_destroy = [], train._start_run, dist.destroy_process_group
def start(*args, **kwargs):
    run = real_start(*args, **kwargs)
    models.append(weakref.ref(run.model))
    return run
def destroy(*args, **kwargs):
    write_rank_line(f"model alive at destroy: {models[0]() is not None}")
    return real_destroy(*args, **kwargs)
train._start_run, train.dist.destroy_process_group = start, destroy
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_under_torchrun_equal_one_with_twice_the_batch(student, one_process, tmp_path):
    """DistributedDataParallel on gloo: rank r reads the sequences a single process would read as rows r*B..,
    and gradients are averaged, so the result matches one process with batch 2B (up to summation order). Each
    rank frees its model (and DDP's reducer) before it destroys the process group: freed after, the reducer's
    destructor can deadlock with gloo's worker threads on the GIL."""
    two, script = tmp_path / "two", tmp_path / "watch.py"
    script.write_text(WRITE_RANK_LINE + MODEL_AT_DESTROY)
    args = ["finetune", str(student), str(two), "--batch-size", "2", "--eval-text", "none", *TORCHRUN_ARGS]
    result = torchrun(*args, script=(str(script),))
    assert result.returncode == 0, result.stderr[-3000:]
    assert rank_lines(tmp_path) == ["model alive at destroy: False"] * 2
    one, two_weights = weights(one_process), weights(two)
    assert all(torch.allclose(one[k], two_weights[k], atol=1e-5) for k in one)
    config = json.loads((two / "config.json").read_text())
    assert config["conversion"]["finetune"]["world_size"] == 2


# Runs mfakit under torchrun with rank 1 on hardware that has no native bfloat16 (rank 0's has).
DIFFERENT_HARDWARE = """
import os, sys
from mfakit.cli import main
from mfakit.finetune import train
train.native_bfloat16 = lambda device: os.environ["RANK"] == "0"
real_start = train._start_run
def start(model_path, out, options, *args, **kwargs):
    write_rank_line(f"rank {os.environ['RANK']} computes in {options.dtype}")
    return real_start(model_path, out, options, *args, **kwargs)
train._start_run = start
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_compute_in_the_dtype_rank_0_resolves(student, tmp_path):
    """--dtype auto is resolved once, by rank 0, for every rank: ranks whose hardware differs still load and
    autocast alike (sharded, a teacher in two dtypes would break the collectives)."""
    out, script = tmp_path / "auto", tmp_path / "hardware.py"
    script.write_text(WRITE_RANK_LINE + DIFFERENT_HARDWARE)
    args = ["finetune", str(student), str(out), "--batch-size", "2", "--steps", "1", "--seq-len", "32", "--quiet"]
    result = torchrun(*args, "--dtype", "auto", "--eval-text", "none", "--parallel", "fsdp", script=(str(script),))
    assert result.returncode == 0, result.stderr[-3000:]
    assert rank_lines(tmp_path) == [
        "rank 0 computes in bfloat16",
        "rank 1 computes in bfloat16",
    ]
    assert json.loads((out / "config.json").read_text())["conversion"]["finetune"]["dtype"] == "bfloat16"


def test_fsdp_under_torchrun_equals_one_process_with_twice_the_batch(student, tmp_path):
    """FSDP2 (fully_shard) on gloo, every parameter trained, so the root's (embeddings, head) too, with a held-out
    evaluation (a sharded forward every rank runs) between steps: the checkpoint, gathered whole to rank 0, matches
    one process with twice the batch, as do the perplexities, and is written in the student's own format."""
    every = ["--trainable", "all", "--loss", "kd+lm", "--eval-every", "1", *TORCHRUN_ARGS]
    assert main(["finetune", str(student), str(tmp_path / "one"), "--batch-size", "4", *every]) == 0
    sharded = ["finetune", str(student), str(tmp_path / "fsdp"), "--batch-size", "2", "--parallel", "fsdp", *every]
    result = torchrun(*sharded)
    assert result.returncode == 0, result.stderr[-3000:]
    one, fsdp, before = weights(tmp_path / "one"), weights(tmp_path / "fsdp"), weights(student)
    assert one.keys() == fsdp.keys() and all(one[k].dtype == fsdp[k].dtype for k in one)
    assert all(torch.allclose(one[k], fsdp[k], atol=1e-5) for k in one)
    assert not torch.equal(fsdp["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    config_one = json.loads((tmp_path / "one" / "config.json").read_text())
    config_fsdp = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    record_one, record_fsdp = config_one.pop("conversion")["finetune"], config_fsdp.pop("conversion")["finetune"]
    assert config_one == config_fsdp
    assert (record_fsdp["parallel"], record_fsdp["world_size"]) == ("fsdp", 2)
    for key in ("eval_ppl_before", "eval_ppl_after"):
        assert record_fsdp[key] == pytest.approx(record_one[key], rel=1e-5)


KILL_AT_THIRD_STEP = """
import os, signal, sys
from mfakit.cli import main
from mfakit.errors import OptionsError
from mfakit.finetune import train
real, calls = train._train_loss, [0]
def killed(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train._train_loss = killed
sys.exit(main(sys.argv[1:]))
"""


def test_fsdp_run_killed_midway_resumes_to_the_same_weights(student, one_process, tmp_path):
    """FSDP with only the attention trained (frozen and trainable weights in one sharded layer), both processes
    killed (SIGKILL) in step 3 of 3: the state saved after step 2 holds full tensors (gathered from the shards,
    read with weights_only), and the resumed run ends where an uninterrupted one does (one process, batch 4)."""
    cut, script = tmp_path / "cut", tmp_path / "kill.py"
    script.write_text(KILL_AT_THIRD_STEP)
    args = ["finetune", str(student), str(cut), "--batch-size", "2", "--parallel", "fsdp", "--save-every", "1"]
    killed = torchrun(*args, *TORCHRUN_ARGS, script=(str(script),))
    assert killed.returncode != 0 and not (cut / "config.json").exists()
    state = torch.load(cut / "trainer" / "state.pt", weights_only=True)
    attention = {k: v.shape for k, v in weights(student).items() if ".self_attn." in k}
    assert state["step"] == 2 and {k: v.shape for k, v in state["trainable"].items()} == attention
    assert state["optimizer"]["state"].keys() == attention.keys()
    resumed = torchrun(*args, *TORCHRUN_ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, again = weights(one_process), weights(cut)
    assert all(torch.allclose(whole[k], again[k], atol=1e-5) for k in whole)
    assert loss_curve(cut) == pytest.approx(loss_curve(one_process), rel=1e-5)
