"""One table of perplexity and KV-cache bytes for converted models against their source, and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from mfakit.checkpoint import check_checkpoint_folder
from mfakit.eval.kv import kv_report
from mfakit.eval.ppl import evaluation_ids, perplexity
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource


def compare(
    source: str | Path,
    models: list[str | Path],
    text: list[TextSource],
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    context: int = 256,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict]:
    """A row per model (the source first): perplexity, its ratio to the source's, and measured KV bytes per token.
    Every path is checked before the first model is evaluated; each model is loaded once."""
    paths = [source, *models]
    for path in paths:
        check_checkpoint_folder(path)
    rows = []
    for path in paths:
        model = load_model(path, device, dtype)
        ids, description = evaluation_ids(load_tokenizer(path), text, max_tokens)
        ppl = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
        kv = kv_report(model, context=context, batch=1)
        rows.append(
            {
                "model": str(path),
                "kind": kv.kind,
                "ppl": ppl.ppl,
                "tokens": ppl.tokens,
                "kv_bytes_per_token": kv.measured_bytes_per_token,
                "kv_formula_bytes_per_token": kv.formula_bytes_per_token,
                "eval_seconds": ppl.seconds,
                "text": description,
            }
        )
        del model
    for row in rows:
        row["ppl_ratio"] = row["ppl"] / rows[0]["ppl"]
        row["kv_ratio"] = row["kv_bytes_per_token"] / rows[0]["kv_bytes_per_token"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | kind | perplexity | vs source | KV bytes/token | KV vs source |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} | {r['kind']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f}x | "
            f"{r['kv_bytes_per_token']:,.0f} | {r['kv_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Perplexity against KV bytes per token (PNG). False when matplotlib is not installed (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        marker = {"source": "*", "mfa": "o", "mfa-kr": "s"}.get(r["kind"], "x")
        ax.scatter(r["kv_bytes_per_token"], r["ppl"], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(
            Path(r["model"]).name,
            (r["kv_bytes_per_token"], r["ppl"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "compare.md", out / "compare.json"]
    written[0].write_text(markdown_table(rows) + "\n")
    written[1].write_text(json.dumps(rows, indent=2) + "\n")
    if plot(rows, out / "compare.png"):
        written.append(out / "compare.png")
    return written
