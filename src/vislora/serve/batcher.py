"""Micro-batching: one worker thread gathers queued jobs into batches and hands each batch to a runner.

A batch starts with the oldest job and takes more until it holds `max_batch_size` samples or the oldest job
has waited `max_wait_s`. Only jobs of one modality share a batch (images today; a text tower adds "text"); a
job that does not fit is held for the next batch, so order is kept per modality.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from vislora.errors import Busy

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Job:
    """One request waiting for the model: its input, the adapters computing it, and where its result goes."""

    inputs: torch.Tensor  # one sample, e.g. (3, H, W) pixels
    adapter: str | None  # None = the base model
    shadow: str | None = None  # also computed, compared, never returned
    rollout: str | None = None  # the rollout the request named, if any
    modality: str = "image"
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # names the answer in feedback

    @property
    def size(self) -> int:
        """Samples this job adds to a batch (its shadow copy included)."""
        return 1 if self.shadow is None else 2


class MicroBatcher:
    """Feeds `run(jobs)` from a bounded queue on one worker thread; `run` must resolve every job's future.
    A job whose future was cancelled before its batch started is dropped."""

    def __init__(self, run: Callable[[list[Job]], None], max_batch_size: int = 16, max_wait_s: float = 0.005,
                 max_queue: int = 1024, name: str = "vislora-batcher") -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._held: collections.deque[Job] = collections.deque()  # taken from the queue, not fitting the last batch
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closing(self) -> bool:
        """close() was called: no job is taken any more (the queued ones are still run)."""
        return self._closed

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch."""
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job) -> Future:
        if self._closed:
            raise Busy("the server is shutting down; retry on another replica")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting (batching.max_queue); retry shortly "
                       "or raise the limit") from None
        return job.future

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        stopping = False
        while True:
            if self._held:
                first = self._held.popleft()
            elif stopping:
                break
            else:
                first = self._queue.get()
            if first is _STOP:
                stopping = True
                continue
            batch, saw_stop = self._gather(first, read_queue=not stopping)
            stopping = stopping or saw_stop
            self._run(batch)
        self._fail(self._drain_rest())  # submitted while closing: refused, not dropped silently

    def _gather(self, first: Job, read_queue: bool) -> tuple[list[Job], bool]:
        """`first` plus the jobs that join it before the batch is full or `first` has waited long enough; and
        whether the stop mark was read."""
        batch, size = [first], first.size
        deadline = first.enqueued + self.max_wait_s
        held, skipped = list(self._held), []
        self._held.clear()
        stop = False
        while size < self.max_batch_size:
            if held:
                job = held.pop(0)
            elif not read_queue or stop:
                break
            else:
                remaining = deadline - time.perf_counter()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if job is _STOP:
                stop = True
            elif job.modality != first.modality:
                skipped.append(job)
            elif size + job.size > self.max_batch_size:  # it opens the next batch: no later job overtakes it
                skipped.append(job)
                break
            else:
                batch.append(job)
                size += job.size
        self._held.extend([*skipped, *held])
        return batch, stop

    def _run(self, batch: list[Job]) -> None:
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drops cancelled jobs
        if not batch:
            return
        try:
            self.run(batch)
        except Exception as exc:  # the runner failed as a whole: every job of the batch learns why
            logger.exception("a batch of %d jobs failed", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _drain_rest(self) -> list[Job]:
        rest = []
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                return [j for j in rest if j is not _STOP]

    @staticmethod
    def _fail(jobs: list[Job]) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(Busy("the server shut down before this request ran; retry"))
