"""MicroBatcher with a recording runner: batch limits, order, modalities, failures and shutdown."""

import threading
import time

import pytest
import torch

from vislora.errors import Busy
from vislora.serve.batcher import Job, MicroBatcher


class Recorder:
    """Answers each job with its own index and remembers the batches; can be held shut."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, jobs):
        self.gate.wait(30)
        self.batches.append([int(j.inputs) for j in jobs])
        for job in jobs:
            job.future.set_result(int(job.inputs))


def job(i, shadow=None, modality="image"):
    return Job(torch.tensor(i), f"a{i % 3}", shadow=shadow, modality=modality)


def test_batches_respect_the_size_limit_count_shadows_and_keep_order():
    runner = Recorder()
    runner.gate.clear()  # the first batch blocks, so the rest queue up behind it
    batcher = MicroBatcher(runner, max_batch_size=4, max_wait_s=0.0)
    batcher.start()
    jobs = [job(0)] + [job(i, shadow="s" if i % 4 == 1 else None) for i in range(1, 12)]
    futures = [batcher.submit(j) for j in jobs]
    runner.gate.set()
    assert [f.result(30) for f in futures] == list(range(12))
    batcher.close()
    flat = [i for batch in runner.batches for i in batch]
    assert flat == list(range(12))  # every job once, in submission order
    for batch in runner.batches:
        assert sum(jobs[i].size for i in batch) <= 4
    assert max(len(b) for b in runner.batches) > 1


def test_jobs_of_another_modality_wait_for_their_own_batch():
    runner = Recorder()
    runner.gate.clear()
    batcher = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.0)
    batcher.start()
    jobs = [job(0)] + [job(i, modality="text" if i % 2 else "image") for i in range(1, 9)]
    futures = [batcher.submit(j) for j in jobs]
    runner.gate.set()
    for f in futures:
        f.result(30)
    batcher.close()
    for batch in runner.batches:
        assert len({jobs[i].modality for i in batch}) == 1, runner.batches


def test_a_failing_batch_fails_each_of_its_jobs_and_the_worker_goes_on():
    calls = []

    def run(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("forward exploded")
        for j in jobs:
            j.future.set_result("ok")

    batcher = MicroBatcher(run, max_batch_size=2, max_wait_s=0.0)
    batcher.start()
    first = batcher.submit(job(0))
    with pytest.raises(RuntimeError, match="forward exploded"):
        first.result(30)
    assert batcher.submit(job(1)).result(30) == "ok"
    batcher.close()


def test_close_answers_queued_jobs_then_refuses_new_ones():
    runner = Recorder()
    runner.gate.clear()
    batcher = MicroBatcher(runner, max_batch_size=2, max_wait_s=0.0)
    batcher.start()
    futures = [batcher.submit(job(i)) for i in range(5)]
    closing = threading.Thread(target=batcher.close)
    closing.start()
    runner.gate.set()
    closing.join(30)
    assert [f.result(0) for f in futures] == list(range(5))
    assert not batcher.alive
    with pytest.raises(Busy, match="shutting down"):
        batcher.submit(job(9))


def test_a_job_cancelled_before_its_batch_starts_is_dropped():
    runner = Recorder()
    runner.gate.clear()
    batcher = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.0)
    batcher.start()
    first = batcher.submit(job(0))
    while not first.running():  # until the worker runs the first job (bounded by the test timeout)
        time.sleep(0.001)
    later = [batcher.submit(job(i)) for i in (1, 2, 3)]
    assert later[1].cancel() and not first.cancel()  # a running job cannot be cancelled
    runner.gate.set()
    assert first.result(30) == 0 and later[0].result(30) == 1 and later[2].result(30) == 3
    batcher.close()
    assert runner.batches == [[0], [1, 3]]
