"""Conversion cost at real model sizes: wall time, time per layer and peak resident memory of `mfakit convert`, each
run in a fresh process, for SmolLM2-135M-Instruct and for synthetic Llama-shaped checkpoints of random bf16 weights
written by scripts/synthetic_checkpoint.py: two 7B-shaped layers (hidden 4096, 32/8 heads, MLP 16384), two
70B-shaped layers (hidden 8192, 64/8 heads, MLP 28672) and, with --end-to-end, a whole 32-layer 7B-shaped model
(MLP 14336: about 14 GB; the conversion writes about 29 GB and takes about half an hour on 2 cores).

    python scripts/bench_scale.py --out bench-out/scale                       # CPU
    python scripts/bench_scale.py --out bench-out/scale --end-to-end          # and the whole 7B-shaped model
    python scripts/bench_scale.py --out bench-out/scale --device cuda         # a GPU machine

Peak memory is the process's own high-water mark, reported beyond a process that only imports mfakit and as a
share of the checkpoint; swapped-out pages are read from /proc/vmstat around each run. Writes scale.md and
scale.json into --out; each converted output is deleted after its run (they are large).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchlib import machine_name, run_measured, smollm2, write_report


@dataclass(frozen=True)
class Shape:
    """A synthetic checkpoint: its folder name and the arguments of synthetic_checkpoint.py."""

    name: str
    label: str
    args: tuple[str, ...]


SEVEN_B_LAYERS = Shape("synthetic-7b-2", "7B-shaped layers", ("--layers", "2", "--shards", "2"))
SEVENTY_B_LAYERS = Shape(
    "synthetic-70b-2",
    "70B-shaped layers",
    (
        "--layers",
        "2",
        "--hidden",
        "8192",
        "--heads",
        "64",
        "--kv-heads",
        "8",
        "--intermediate",
        "28672",
        "--shards",
        "2",
    ),
)
SEVEN_B_MODEL = Shape(
    "synthetic-7b-32", "7B-shaped model, end to end", ("--layers", "32", "--intermediate", "14336", "--shards", "8")
)


def swapped_out_pages() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("pswpout "):
            return int(line.split()[1])
    return 0


def weight_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def synthetic(work: Path, shape: Shape) -> Path:
    folder = work / shape.name
    if not (folder / "config.json").exists():
        script = Path(__file__).with_name("synthetic_checkpoint.py")
        subprocess.run([sys.executable, str(script), str(folder), *shape.args, "--overwrite"], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synthetic-calib-tokens", type=int, default=2048)
    parser.add_argument("--end-to-end", action="store_true", help="also convert the whole 32-layer 7B-shaped model")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    imports = run_measured([])
    cases = [("SmolLM2-135M-Instruct", smollm2(args.work), [])]
    shapes = [] if args.skip_synthetic else [SEVEN_B_LAYERS, SEVENTY_B_LAYERS]
    shapes += [SEVEN_B_MODEL] if args.end_to_end else []
    calib = ["--calib-tokens", str(args.synthetic_calib_tokens)]
    cases += [(shape.label, synthetic(args.work, shape), calib) for shape in shapes]
    rows = []
    for name, source, extra in cases:
        out = args.work / f"{source.name}-scale-kr"
        argv = ["convert", str(source), str(out), "--variant", "mfa-kr", "--kv-ratio", "0.5", "--overwrite"]
        swapped = swapped_out_pages()
        run = run_measured([*argv, "--quiet", "--device", args.device, *extra])
        if run.returncode != 0:
            raise SystemExit(f"mfakit {' '.join(argv)} failed:\n{run.stderr[-3000:]}")
        swapped = swapped_out_pages() - swapped
        tokens = json.loads((out / "config.json").read_text())["conversion"]["calibration_tokens"]
        shutil.rmtree(out)
        config = json.loads((source / "config.json").read_text())
        checkpoint_gb = weight_gb(source)
        rows.append(
            {
                "model": name,
                "layers": config["num_hidden_layers"],
                "hidden": config["hidden_size"],
                "heads": f"{config['num_attention_heads']}/{config['num_key_value_heads']}",
                "mlp": config["intermediate_size"],
                "checkpoint_gb": checkpoint_gb,
                "calibration_tokens": tokens,
                "seconds": run.seconds,
                "seconds_per_layer": run.seconds / config["num_hidden_layers"],
                "peak_rss_gb": run.peak_rss_bytes / 1e9,
                "peak_beyond_imports_gb": (run.peak_rss_bytes - imports.peak_rss_bytes) / 1e9,
                "peak_share_of_checkpoint": run.peak_rss_bytes / 1e9 / checkpoint_gb,
                "swapped_out_pages": swapped,
                "refit": "skipped" if "output refit skipped" in run.stderr else "yes",
                "refit_from_samples": "output refit from the" in run.stderr,
            }
        )
        print(rows[-1], flush=True)
    machine = machine_name(args.device)
    lines = [
        f"Conversion to MFA-KR at kv-ratio 0.5 (default method, output refit included) on {machine}; peak RSS of a "
        f"process that only imports mfakit: {imports.peak_rss_bytes / 1e9:.2f} GB.",
        "",
        "| model | layers | hidden | heads | MLP | checkpoint | calibration tokens | wall time | per layer | peak RSS "
        "| beyond imports | peak / checkpoint | swapped out | refit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        refit = r["refit"] + (" (from samples)" if r["refit_from_samples"] else "")
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['hidden']} | {r['heads']} | {r['mlp']} | "
            f"{r['checkpoint_gb']:.2f} GB | {r['calibration_tokens']:,} | {r['seconds']:.0f} s | "
            f"{r['seconds_per_layer']:.0f} s | {r['peak_rss_gb']:.2f} GB | {r['peak_beyond_imports_gb']:.2f} GB | "
            f"{100 * r['peak_share_of_checkpoint']:.0f}% | {r['swapped_out_pages']} pages | {refit} |"
        )
    data = {"machine": machine, "imports_peak_gb": imports.peak_rss_bytes / 1e9, "rows": rows}
    write_report(args.out, "scale", lines, data)


if __name__ == "__main__":
    main()
