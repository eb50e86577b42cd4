"""Conversion cost: wall time and peak resident memory of `mfakit convert`, each run in a fresh process, for
SmolLM2-135M-Instruct and for synthetic Llama-shaped checkpoints of random weights (hidden 4096, about 2 and 8 GB
in 8 shards, written by scripts/synthetic_checkpoint.py: the same layers, 4x as many), next to the checkpoint's
size and the peak of a process that only imports mfakit.

    python scripts/bench_scale.py --out bench-out/scale                       # CPU
    python scripts/bench_scale.py --out bench-out/scale --device cuda         # a GPU machine

Writes scale.md and scale.json into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchlib import machine_name, run_measured, smollm2, write_report


def measured(*argv: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB, stderr) of a fresh process running `mfakit ARGV`."""
    run = run_measured(list(argv))
    if run.returncode != 0:
        raise SystemExit(f"mfakit {' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return run.seconds, run.peak_rss_bytes / 1e9, run.stderr


def weight_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/work"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--gigabytes", type=float, nargs="+", default=[2.0, 8.0], help="sizes of the synthetic checkpoints"
    )
    parser.add_argument("--synthetic-calib-tokens", type=int, default=2048)
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    _, imports_gb, _ = measured()
    cases = [("SmolLM2-135M-Instruct", smollm2(args.work), [])]
    for gigabytes in [] if args.skip_synthetic else args.gigabytes:
        synthetic = args.work / f"synthetic-{gigabytes:g}gb"
        if not (synthetic / "config.json").exists():
            script = Path(__file__).with_name("synthetic_checkpoint.py")
            subprocess.run(
                [sys.executable, str(script), str(synthetic), "--gigabytes", str(gigabytes), "--overwrite"],
                check=True,
            )
        calib = ["--calib-tokens", str(args.synthetic_calib_tokens)]
        cases.append((f"synthetic Llama, {gigabytes:g} GB", synthetic, calib))
    rows = []
    for name, source, extra in cases:
        out = args.work / f"{source.name}-scale-kr"
        argv = ["convert", str(source), str(out), "--variant", "mfa-kr", "--kv-ratio", "0.5", "--overwrite"]
        seconds, peak_gb, stderr = measured(*argv, "--quiet", "--device", args.device, *extra)
        config = json.loads((source / "config.json").read_text())
        rows.append(
            {
                "model": name,
                "layers": config["num_hidden_layers"],
                "hidden": config["hidden_size"],
                "checkpoint_gb": weight_gb(source),
                "shards": len(list(source.glob("*.safetensors"))),
                "calibration_tokens": int(extra[1]) if extra else 16384,
                "seconds": seconds,
                "peak_rss_gb": peak_gb,
                "refit_skipped": "output refit skipped" in stderr,
                "refit_from_samples": "output refit from the" in stderr,
            }
        )
        print(rows[-1], flush=True)
    machine = machine_name(args.device)
    lines = [
        f"Conversion to MFA-KR at kv-ratio 0.5 (default method) on {machine}; peak RSS of a process that only "
        f"imports mfakit: {imports_gb:.2f} GB.",
        "",
        "| model | layers | hidden | checkpoint | shards | calibration tokens | wall time | peak RSS | refit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        refit = "skipped (memory limit)" if r["refit_skipped"] else "yes"
        refit += " (from samples)" if r["refit_from_samples"] else ""
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['hidden']} | {r['checkpoint_gb']:.2f} GB | {r['shards']} | "
            f"{r['calibration_tokens']:,} | {r['seconds']:.0f} s | {r['peak_rss_gb']:.2f} GB | {refit} |"
        )
    write_report(args.out, "scale", lines, {"machine": machine, "imports_peak_gb": imports_gb, "rows": rows})


if __name__ == "__main__":
    main()
