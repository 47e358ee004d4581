"""What the benchmarks share: medians of runs taken in turns (so a shared machine's drift hits all alike),
and the JSON report with the run's setting."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from chatforge.config import save_json


def seconds(fn) -> float:
    """Wall time of one call (the GPU's queued work included)."""
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function: one untimed warm-up call each (allocator, first-call costs), then
    `repeats` rounds of a, b, a, b, ..."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def write_report(out: str | Path, rows: list[dict], **setting) -> None:
    """bench/results/NAME.json: the setting (preset, sizes ...), torch's version and threads, the time, the rows."""
    report = {**setting, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_json(report, out)
    print(f"-> {out}")
