"""Speed: evaluation throughput of `mfakit eval ppl` next to a plain transformers loop, and prefill / greedy-decode
throughput with KV-cache bytes for SmolLM2-135M-Instruct and its MFA and MFA-KR conversions.

    python scripts/bench_speed.py --out bench-out/speed                                     # CPU, small sizes
    python scripts/bench_speed.py --out bench-out/speed --device cuda --dtype bfloat16 \\
        --contexts 1024 4096 16384 32768 --batches 1 8

Speed depends only on the widths of a conversion, not on how it was calibrated, so the conversions here use the
plain method on 2,048 calibration tokens (fast). Writes speed.md and speed.json into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from benchlib import machine_name, smollm2, write_report
from mfakit.convert import PLAIN_METHOD, ConvertOptions, convert
from mfakit.eval import evaluation_ids, perplexity
from mfakit.eval.kv import cache_bytes_per_layer, cached_numbers_per_token
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource, load_texts, tokenize


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def plain_loop_tokens_per_second(path: Path, tokens: int, seq_len: int, device: str, dtype: str) -> float:
    """What a user would write: non-overlapping windows, the model's own loss."""
    model = load_model(path, device, dtype)
    texts = load_texts(TextSource("builtin", "pydoc"), part="evaluation")
    ids = tokenize(load_tokenizer(path), texts)[:tokens]
    sync(device)
    start, scored = time.time(), 0
    for begin in range(0, ids.numel() - 1, seq_len):
        window = ids[begin : begin + seq_len][None].to(device)
        if window.shape[1] < 2:
            break
        model(input_ids=window, labels=window).loss.item()
        scored += window.shape[1] - 1
    sync(device)
    return scored / (time.time() - start)


@torch.no_grad()
def prefill_and_decode(model, context: int, batch: int, new_tokens: int, device: str) -> dict:
    """Prefill `batch` random sequences of `context` tokens into a fresh cache, then decode greedily."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(device)
    cache = DynamicCache(config=model.config)
    sync(device)
    start = time.time()
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.time() - start
    kv_bytes = sum(cache_bytes_per_layer(out.cache))
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.time()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    decode = time.time() - start
    return {
        "prefill_tokens_per_second": batch * context / prefill,
        "decode_tokens_per_second": batch * new_tokens / decode,
        "kv_bytes_per_token": kv_bytes / (batch * context),
    }


def formula_bytes_per_token(model) -> float:
    _, numbers, _ = cached_numbers_per_token(model.config)
    return sum(numbers) * next(model.parameters()).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/speed"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-batched-tokens", type=int, default=16384, help="skip larger batch x context")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    source = smollm2(args.work)
    models = {"source": source}
    for variant in ("mfa", "mfa-kr"):
        for ratio in (0.5, 0.25):
            path = args.work / f"speed-{variant}-{ratio}"
            if not (path / "config.json").exists():
                options = ConvertOptions(
                    variant=variant, kv_ratio=ratio, method=PLAIN_METHOD, calibration_tokens=2048, overwrite=True
                )
                convert(source, path, options)
            models[f"{variant.upper()} {ratio}"] = path

    ids, _ = evaluation_ids(load_tokenizer(source), [TextSource("builtin", "pydoc")], args.eval_tokens)
    ours = perplexity(load_model(source, args.device, args.dtype), ids, seq_len=1024)
    plain = plain_loop_tokens_per_second(source, args.eval_tokens, 1024, args.device, args.dtype)
    evaluation = {"mfakit_eval_ppl": ours.tokens_per_second, "plain_loop": plain}
    print(evaluation, flush=True)

    rows = []
    for name, path in models.items():
        model = load_model(path, args.device, args.dtype)
        formula = formula_bytes_per_token(model)
        prefill_and_decode(model, 64, 1, 2, args.device)  # warm-up
        for context in args.contexts:
            for batch in args.batches:
                if batch * context > args.max_batched_tokens and batch > 1:
                    continue
                result = prefill_and_decode(model, context, batch, args.new_tokens, args.device)
                rows.append({"model": name, "context": context, "batch": batch, "formula": formula, **result})
                print(rows[-1], flush=True)
        del model

    machine = machine_name(args.device)
    source_rows = {(r["context"], r["batch"]): r for r in rows if r["model"] == "source"}
    lines = [
        f"SmolLM2-135M-Instruct and its conversions on {machine}, {args.dtype}. Evaluation throughput "
        f"({args.eval_tokens:,} tokens, windows of 1024): `mfakit eval ppl` {ours.tokens_per_second:,.0f} tokens/s, "
        f"plain transformers loop {plain:,.0f} tokens/s ({ours.tokens_per_second / plain:.2f}x).",
        "",
        "| model | context | batch | KV bytes/token (measured = formula) | prefill tok/s | vs source | "
        "decode tok/s | vs source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = source_rows[(r["context"], r["batch"])]
        same = "yes" if abs(r["kv_bytes_per_token"] - r["formula"]) < 1e-6 else f"no ({r['formula']:,.0f})"
        lines.append(
            f"| {r['model']} | {r['context']:,} | {r['batch']} | {r['kv_bytes_per_token']:,.0f} ({same}) | "
            f"{r['prefill_tokens_per_second']:,.0f} | {r['prefill_tokens_per_second'] / base['prefill_tokens_per_second']:.2f}x | "
            f"{r['decode_tokens_per_second']:,.1f} | {r['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f}x |"
        )
    write_report(args.out, "speed", lines, {"machine": machine, "evaluation": evaluation, "rows": rows})


if __name__ == "__main__":
    main()
