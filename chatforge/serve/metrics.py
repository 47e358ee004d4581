"""Prometheus metrics: request counts, latency and time-to-first-token histograms, queue and batch sizes.
"""

from __future__ import annotations

import collections
import threading


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts, self.sum, self.count = [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                      f"{self.name}_count {self.count}"]


class Metrics:
    SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.prompt_tokens = self.completion_tokens = 0  # of answered requests
        self.generated_tokens = self.cancelled = 0  # every token made, answered or not; requests cancelled
        self.latency = Histogram("chatforge_request_seconds", "time from request to last token", self.SECONDS)
        self.first_token = Histogram("chatforge_time_to_first_token_seconds", "time from request to first token", self.SECONDS)
        self.lock = threading.Lock()

    def render(self, queue_depth: int, running: int) -> str:
        with self.lock:
            out = ["# HELP chatforge_requests_total API requests answered, by endpoint and status",
                   "# TYPE chatforge_requests_total counter"]
            out += [f'chatforge_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP chatforge_prompt_tokens_total prompt tokens read", "# TYPE chatforge_prompt_tokens_total counter",
                    f"chatforge_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP chatforge_completion_tokens_total tokens generated", "# TYPE chatforge_completion_tokens_total counter",
                    f"chatforge_completion_tokens_total {self.completion_tokens}",
                    "# HELP chatforge_generated_tokens_total tokens generated, including for requests cancelled",
                    "# TYPE chatforge_generated_tokens_total counter", f"chatforge_generated_tokens_total {self.generated_tokens}",
                    "# HELP chatforge_cancelled_requests_total requests whose client went away before the end",
                    "# TYPE chatforge_cancelled_requests_total counter", f"chatforge_cancelled_requests_total {self.cancelled}",
                    "# HELP chatforge_queue_depth requests waiting for room in the batch", "# TYPE chatforge_queue_depth gauge",
                    f"chatforge_queue_depth {queue_depth}",
                    "# HELP chatforge_running_sequences sequences decoding now", "# TYPE chatforge_running_sequences gauge",
                    f"chatforge_running_sequences {running}"]
            out += self.latency.lines() + self.first_token.lines()
        return "\n".join(out) + "\n"

