"""Timing shared by the benchmarks: medians of runs taken in turns, so a shared machine's drift hits all alike."""

from __future__ import annotations

import statistics
import time

import torch


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
