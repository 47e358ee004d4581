"""The scheduler: one thread owns the model and runs continuous batching. Requests wait in a bounded queue,
join the running `DecodeBatch` between decoding steps when there is room, and leave it when they finish or
their client goes away; tokens travel from the scheduler thread to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

from chatforge.engine import DecodeBatch, Group, SamplingParams, TokenEvent
from chatforge.serve.metrics import Metrics

log = logging.getLogger("chatforge.serve")


class QueueFull(Exception):
    pass


# --- the scheduler: one thread owns the model ----------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One request's work: prompts (token ids), n samples each; its events go to `queue` in `loop`."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stop_ids: list[int]
    stop_strings: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    group: Group | None = None

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def send(self, item) -> None:
        """Hand events (a list), an exception or None (done) to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Scheduler:
    """Admits waiting jobs into the running batch between decoding steps, steps it, routes the tokens."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, metrics: Metrics):
        self.batch, self.tokenizer, self.metrics = DecodeBatch(model), tokenizer, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="chatforge-scheduler", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: free the job's rows at the next step."""
        job.cancelled = True
        with self.wake:
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit beside the running rows (one that is alone fits whatever its size)."""
        with self.wake:
            while not self.stopped and not self.waiting and not self.running:
                self.wake.wait()
            admitted, rows = [], len(self.batch)
            while self.waiting:
                job = self.waiting[0]
                if not job.cancelled and rows + job.rows > self.max_batch and (rows or admitted):
                    break
                self.waiting.popleft()
                if not job.cancelled:
                    admitted.append(job)
                    rows += job.rows
            return admitted

    def _loop(self) -> None:
        while not self.stopped:
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - the running requests fail, the server goes on
                log.exception("the scheduler failed; its running requests get an error")
                for job in self.running:
                    job.send(e)
                self.running = []
                self.batch = DecodeBatch(self.batch.model)

    def _iteration(self) -> None:
        """Free the slots of cancelled jobs, admit waiting ones, make one token for every running row."""
        for job in [j for j in self.running if j.cancelled]:
            self.batch.cancel(job.group)
            self.running.remove(job)
            with self.metrics.lock:
                self.metrics.cancelled += 1
        for job in self._admit():
            try:
                job.group = self.batch.add(job.prompts, job.params, n=job.n, stop_ids=job.stop_ids,
                                           stop_strings=job.stop_strings, tokenizer=self.tokenizer)
                self.running.append(job)
            except Exception as e:  # noqa: BLE001 - that request fails, the others go on
                log.exception("prefill failed")
                job.send(e)
        if not self.running:
            return
        events = self.batch.step()
        with self.metrics.lock:
            self.metrics.generated_tokens += len(events)
        by_group: dict[int, list[TokenEvent]] = collections.defaultdict(list)
        for group, event in events:
            by_group[id(group)].append(event)
        deliveries = collections.defaultdict(list)  # one wake-up of each event loop per step, not one per job
        for job in list(self.running):
            if by_group.get(id(job.group)):
                deliveries[job.loop].append((job.queue, by_group[id(job.group)]))
            if not job.group.rows:
                deliveries[job.loop].append((job.queue, None))
                self.running.remove(job)
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)


