"""QK-norm conversions, exact path against the folded approximation, on tiny QK-norm models that learned something:
each family's tiny checkpoint (tests/conftest.py) trained 300 steps on the built-in calibration text, converted to
MFA-KR at several budgets both ways, and scored by the KL divergence to its source on held-out text. No real
QK-norm checkpoint ships in a package these machines can install, so this stands in for one.

    python scripts/bench_qk_norm.py --out bench-out/qk-norm          # about 15 minutes on 2 cores

Writes qk-norm.md and qk-norm.json into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchlib import machine_name, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mfakit.convert import ConvertOptions, convert  # noqa: E402
from mfakit.finetune import finetune  # noqa: E402
from tests.conftest import (  # noqa: E402
    VOCAB,
    build_family,
    language_model_training,
    sample_ids,
    train_bpe_tokenizer,
)
from tests.test_methods import kl_to_source  # noqa: E402

FAMILIES = ("qwen3", "olmo2", "gemma3_text")
RATIOS = (1.0, 0.5, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/qk-norm"))
    parser.add_argument("--work", type=Path, default=Path("bench-out/work/qk-norm"))
    args = parser.parse_args()
    tokenizer = train_bpe_tokenizer(VOCAB)
    ids = sample_ids(tokenizer, n=128, batch=8)
    rows = []
    for kind in FAMILIES:
        trained = args.work / f"{kind}-trained"
        if not (trained / "config.json").exists():
            source = build_family(kind, args.work / kind, tokenizer)
            finetune(source, trained, language_model_training(steps=300, batch_size=8, warmup=20))
        for ratio in RATIOS:
            kl = {}
            for approximate in (False, True):
                out = args.work / f"{kind}-{ratio}-{approximate}"
                options = ConvertOptions(
                    variant="mfa-kr",
                    kv_ratio=ratio,
                    approximate_qk_norm=approximate,
                    calibration_tokens=4096,
                    calibration_seq_len=128,
                    overwrite=True,
                    progress=False,
                )
                convert(trained, out, options)
                kl["fold" if approximate else "exact"] = kl_to_source(out, trained, ids)
            rows.append({"family": kind, "kv_ratio": ratio, **kl})
            print(rows[-1], flush=True)
    machine = f"{machine_name()}, torch {torch.__version__}"
    lines = [
        f"Tiny QK-norm models (2 layers, hidden 64) trained 300 steps; MFA-KR; KL divergence to the source in nats "
        f"per token on 8 x 128 held-out tokens (lower is better). Machine: {machine}.",
        "",
        "| family | KV ratio | exact path | folded (--approximate-qk-norm) |",
        "|---|---:|---:|---:|",
        *(f"| {r['family']} | {r['kv_ratio']} | {r['exact']:.2e} | {r['fold']:.2e} |" for r in rows),
    ]
    write_report(args.out, "qk-norm", lines, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
