"""Where one conversion's time and memory go: run `mfakit convert ARGS` in this process with the conversion's steps
wrapped, and print per step its calls, wall time, and the resident memory at its start, its peak and its end.

    python scripts/profile_convert.py SRC OUT --variant mfa-kr --kv-ratio 0.5 --calib-tokens 2048 --overwrite

Memory is the process's resident set (VmRSS), sampled every few milliseconds by a thread (torch's matrix products
release the GIL, so the samples land inside them): tracemalloc sees none of torch's buffers. Steps nest; a step's
numbers include its children. Writes the table to stdout and, with --json PATH, the numbers to PATH.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Samples VmRSS every `interval` seconds; every open step sees the largest sample taken while it was open."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.open: list[Record] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            now = rss_bytes()
            with self.lock:
                for record in self.open:
                    record.window_peak = max(record.window_peak, now)
            time.sleep(self.interval)


@dataclass
class Record:
    path: str
    window_peak: int = 0


@dataclass
class Step:
    calls: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of all the process's threads: less sensitive than wall time to other jobs' load
    start_rss: int = 0  # at the first call
    peak_rss: int = 0  # over all calls
    end_rss: int = 0  # at the last call's end
    peak_above_start: int = 0  # the largest rise of one call above its own start
    order: int = field(default=0)


STEPS: dict[str, Step] = {}
STACK: list[str] = []
SAMPLER = Sampler()


def wrapped(name: str, fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        path = "/".join([*STACK, name])
        step = STEPS.setdefault(path, Step(order=len(STEPS)))
        start = rss_bytes()
        record = Record(path, start)
        with SAMPLER.lock:
            SAMPLER.open.append(record)
        STACK.append(name)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - t0
            step.cpu_seconds += time.process_time() - c0
            STACK.pop()
            end = rss_bytes()
            with SAMPLER.lock:
                SAMPLER.open.remove(record)
            step.calls += 1
            step.seconds += seconds
            step.start_rss = step.start_rss or start
            step.peak_rss = max(step.peak_rss, record.window_peak, end)
            step.peak_above_start = max(step.peak_above_start, max(record.window_peak, end) - start)
            step.end_rss = end

    return inner


def instrument() -> None:
    """Wrap the conversion's steps where the recipe and the math look them up (module globals)."""
    from mfakit.checkpoint import ShardedWriter
    from mfakit.convert import factorize, plan, readout, recipe

    targets = {
        recipe: [
            "convert_one_layer",
            "load_module",
            "write_module_state",
            "run_layer",
            "read_attention",
            "normalised_inputs",
            "second_moment",
            "convert_layer",
            "refit_output",
            "write_converted",
            "mfa_tensors",
            "mfa_module",
            "working_module",
            "readout_samples",
            "readout_statistics",
            "refit_from_samples_",
            "refit_from_statistics",
            "release_freed_memory",
            "start_streams",
            "finish_checkpoint",
        ],
        plan: ["convert_layer"],
        factorize: [
            "key_spectrum",
            "query_energy",
            "key_latent",
            "value_rows",
            "value_readout",
            "place_channels",
            "with_value_channels",
            "balance_",
            "nope_low_frequencies",
            "compress_mfa_kr",
            "compress_mfa",
        ],
        readout: [
            "sample_kernel",
            "choose_ridge_dual",
            "dual_readout_update",
            "choose_ridge",
            "_ridge_readout",
        ],
    }
    for module, names in targets.items():
        for name in names:
            setattr(module, name, wrapped(name, getattr(module, name)))
    for name in ("add",):
        setattr(ShardedWriter, name, wrapped(f"writer.{name}", getattr(ShardedWriter, name)))
    layer_done = recipe.ConversionRun.layer_done
    recipe.ConversionRun.layer_done = wrapped("layer_done", layer_done)


def table(base: int) -> list[str]:
    lines = [
        f"RSS in GB beyond {base / GB:.2f} GB (this process after its imports)",
        "",
        "| step | calls | wall s | CPU s | RSS at start | peak | peak above its start | RSS at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, s in sorted(STEPS.items(), key=lambda kv: kv[1].order):
        depth = path.count("/")
        name = "&nbsp;&nbsp;" * depth + path.rsplit("/", 1)[-1]
        lines.append(
            f"| {name} | {s.calls} | {s.seconds:.1f} | {s.cpu_seconds:.1f} | {(s.start_rss - base) / GB:.2f} | "
            f"{(s.peak_rss - base) / GB:.2f} | {s.peak_above_start / GB:.2f} | {(s.end_rss - base) / GB:.2f} |"
        )
    return lines


def main() -> None:
    argv = sys.argv[1:]
    json_path = None
    if "--json" in argv:
        k = argv.index("--json")
        json_path = Path(argv[k + 1])
        del argv[k : k + 2]
    from mfakit.cli import main as cli_main

    base = rss_bytes()
    instrument()
    SAMPLER.start()
    t0, c0 = time.perf_counter(), time.process_time()
    code = cli_main(["convert", *argv, "--quiet"])
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    lines = table(base)
    lines.append("")
    lines.append(
        f"total {total:.1f} s wall, {cpu:.1f} s CPU; peak RSS (VmHWM) {hwm / GB:.2f} GB, "
        f"{(hwm - base) / GB:.2f} GB beyond imports"
    )
    print("\n".join(lines))
    if json_path:
        steps = {k: vars(v) for k, v in STEPS.items()}
        data = {"base": base, "hwm": hwm, "seconds": total, "cpu_seconds": cpu, "steps": steps}
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
