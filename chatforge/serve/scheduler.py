"""The scheduler: one thread owns the model and runs continuous batching. Requests wait in a bounded queue,
join the running `DecodeBatch` between decoding steps when there is room, and leave it when they finish or
their client goes away; tokens travel from the scheduler thread to each request's asyncio queue.

A beam-search request cannot share the batch's steps (its beams are reordered at every step), so it runs
its own `BeamSearch` per prompt, in the same thread, one step of each search per step of the batch: the
model is only ever used by this thread, and streams go on while a search runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field

from chatforge.engine import BeamSearch, DecodeBatch, PromptGroup, SamplingParams, TokenEvent, beam_events
from chatforge.serve.metrics import Metrics

log = logging.getLogger("chatforge.serve")


class QueueFull(Exception):
    pass


# --- the scheduler: one thread owns the model ----------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One request's work: prompts (token ids), n samples (or the n best beams) each; its events go to
    `queue` in `loop`."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stop_ids: list[int]
    stop_strings: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    group: PromptGroup | None = None  # its rows in the batch, once admitted
    searches: list[BeamSearch] = field(default_factory=list)  # or its beam searches, one per prompt

    @property
    def rows(self) -> int:
        """The sequences it decodes at once."""
        return len(self.prompts) * max(self.n, self.params.num_beams)

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
            admitted, rows = [], len(self.batch) + sum(job.rows for job in self.running if job.searches)
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
        """Free the slots of cancelled jobs, admit waiting ones, make one token for every running row and
        one step of every beam search."""
        for job in [j for j in self.running if j.cancelled]:
            if job.group is not None:
                self.batch.cancel(job.group)
            self.running.remove(job)
            with self.metrics.lock:
                self.metrics.cancelled += 1
        for job in self._admit():
            try:
                self._start(job)
                self.running.append(job)
            except Exception as e:  # noqa: BLE001 - that request fails, the others go on
                log.exception("prefill failed")
                job.send(e)
        if not self.running:
            return
        by_group: dict[int, list[TokenEvent]] = collections.defaultdict(list)
        for group, event in self.batch.step() if len(self.batch) else []:
            by_group[id(group)].append(event)
        deliveries = collections.defaultdict(list)  # one wake-up of each event loop per step, not one per job
        generated = 0
        for job in list(self.running):
            if job.searches:
                events = self._step_searches(job)
            else:
                events = by_group.get(id(job.group), [])
            if events:
                deliveries[job.loop].append((job.queue, events))
                generated += len(events)
            if not (job.group.rows if job.group is not None else job.searches):
                deliveries[job.loop].append((job.queue, None))
                self.running.remove(job)
        with self.metrics.lock:
            self.metrics.generated_tokens += generated
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _start(self, job: Job) -> None:
        """Prefill a job's prompts: into the batch, or into a beam search each."""
        if job.params.num_beams == 1:
            job.group = self.batch.add(job.prompts, job.params, n=job.n, stop_ids=job.stop_ids,
                                       stop_strings=job.stop_strings, tokenizer=self.tokenizer)
            return
        job.searches = [BeamSearch(self.batch.model, prompt, job.params.num_beams, job.params.max_new_tokens,
                                   stop_ids=job.stop_ids, length_penalty=job.params.length_penalty,
                                   stop_strings=job.stop_strings, tokenizer=self.tokenizer)
                        for prompt in job.prompts]

    def _step_searches(self, job: Job) -> list[TokenEvent]:
        """One step of each of the job's beam searches; once all are over, the n best beams of each
        prompt as its samples' events (and the job has no searches left)."""
        over = [search.step() for search in job.searches]  # every search steps, none waits for another
        if not all(over):
            return []
        events = [e for p, search in enumerate(job.searches) for e in beam_events(p, search.best()[:job.n])]
        job.searches = []
        return events


