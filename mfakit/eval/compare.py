"""One table of converted models against their source: perplexity on each evaluation text (a domain), its ratio to
the source's, the geometric mean of the ratios over the domains, and measured KV-cache bytes; and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mfakit.checkpoint import check_checkpoint_folder
from mfakit.eval.kv import kv_report
from mfakit.eval.ppl import evaluation_ids, perplexity
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource


def domain_names(texts: list[TextSource]) -> list[str]:
    """A short, unique column name per evaluation text: the file's stem, the dataset's or built-in corpus's name."""
    names: list[str] = []
    for text in texts:
        base = Path(text.name).stem if text.kind == "file" else text.name.split(":")[0]
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(
    source: str | Path,
    models: list[str | Path],
    texts: list[TextSource],
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    context: int = 256,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict]:
    """A row per model (the source first): perplexity on each text (each a domain, at most `max_tokens` of it),
    the ratio to the source's per domain and their geometric mean, and measured KV bytes per token. Every path is
    checked before the first model is evaluated; each model is loaded once."""
    paths = [source, *models]
    for path in paths:
        check_checkpoint_folder(path)
    names = domain_names(texts)
    rows = []
    for path in paths:
        model = load_model(path, device, dtype)
        tokenizer = load_tokenizer(path)
        domains = {}
        for name, text in zip(names, texts, strict=True):
            ids, description = evaluation_ids(tokenizer, [text], max_tokens)
            result = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size)
            domains[name] = {"ppl": result.ppl, "tokens": result.tokens, "seconds": result.seconds, "text": description}
        kv = kv_report(model, context=context, batch=1)
        rows.append(
            {
                "model": str(path),
                "kind": kv.kind,
                "domains": domains,
                "kv_bytes_per_token": kv.measured_bytes_per_token,
                "kv_formula_bytes_per_token": kv.formula_bytes_per_token,
            }
        )
        del model
    for row in rows:
        for name, domain in row["domains"].items():
            domain["ppl_ratio"] = domain["ppl"] / rows[0]["domains"][name]["ppl"]
        row["ppl_ratio"] = geometric_mean([d["ppl_ratio"] for d in row["domains"].values()])
        row["kv_ratio"] = row["kv_bytes_per_token"] / rows[0]["kv_bytes_per_token"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Per domain: the source's perplexity in its row, every other model's ratio to it; then the geometric mean of
    the ratios (when there are several domains) and the KV bytes."""
    names = list(rows[0]["domains"])
    mean = ["geo-mean"] if len(names) > 1 else []
    lines = [
        "| model | kind | " + " | ".join([*names, *mean]) + " | KV bytes/token | KV vs source |",
        "|---|---|" + "---:|" * (len(names) + len(mean)) + "---:|---:|",
    ]
    for i, r in enumerate(rows):
        cells = [
            f"{d['ppl']:.3f}" if i == 0 else f"{d['ppl_ratio']:.3f}x ({d['ppl']:.2f})" for d in r["domains"].values()
        ]
        cells += [f"{r['ppl_ratio']:.3f}x"] if mean else []
        lines.append(
            f"| {Path(r['model']).name} | {r['kind']} | {' | '.join(cells)} | "
            f"{r['kv_bytes_per_token']:,.0f} | {r['kv_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Perplexity ratio to the source (geometric mean over the domains) against KV bytes per token (PNG). False
    when matplotlib is not installed (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        marker = {"source": "*", "mfa": "o", "mfa-kr": "s"}.get(r["kind"], "x")
        ax.scatter(r["kv_bytes_per_token"], r["ppl_ratio"], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(
            Path(r["model"]).name,
            (r["kv_bytes_per_token"], r["ppl_ratio"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("perplexity / source's" + (" (geometric mean over domains)" if len(rows[0]["domains"]) > 1 else ""))
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
