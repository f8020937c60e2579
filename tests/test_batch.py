"""dispatch_batch: bounded concurrency, a lone enqueue inline, errors of the body win."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery, group

from celery_cloudtasks import InMemoryTaskQueue, dispatch_batch
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.types import EnqueueOptions, EnqueueResult


class SlowQueue(InMemoryTaskQueue):
    """An in-memory queue whose enqueue takes a while and records concurrency and threads."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.in_flight = 0
        self.most_in_flight = 0
        self.threads: set[str] = set()
        self._count_lock = threading.Lock()

    def enqueue(self, envelope: TaskEnvelope, options: EnqueueOptions) -> EnqueueResult:
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.01)
            return super().enqueue(envelope, options)
        finally:
            with self._count_lock:
                self.in_flight -= 1


def make_app() -> tuple[Celery, dict[str, SlowQueue]]:
    queues: dict[str, SlowQueue] = {}

    def factory(queue_id: str) -> SlowQueue:
        return queues.setdefault(queue_id, SlowQueue(queue_id))

    app = Celery("batched", broker="cloudtasks://projects/p/locations/l")
    app.conf.broker_transport_options = {
        "push_url": "http://h/_cloudtasks",
        "queue_factory": factory,
    }

    @app.task(name="add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    return app, queues


def test_group_in_a_batch_runs_bounded_concurrent_rpcs_and_all_exist_after() -> None:
    app, queues = make_app()
    add: Any = app.tasks["add"]
    with dispatch_batch(max_in_flight=4) as batch:
        group(add.s(i, i) for i in range(40)).apply_async()
        assert queues["celery"].queue_depth() < 40  # still in flight inside the block
    assert queues["celery"].queue_depth() == 40
    assert len(batch.results) == 40
    assert 1 < queues["celery"].most_in_flight <= 4


def test_a_lone_enqueue_runs_inline_without_a_thread() -> None:
    app, queues = make_app()
    with dispatch_batch():
        app.tasks["add"].delay(1, 2)
    assert queues["celery"].threads == {threading.current_thread().name}
    assert queues["celery"].queue_depth() == 1


def test_an_error_in_the_block_wins_but_what_was_published_is_still_enqueued() -> None:
    app, queues = make_app()
    with pytest.raises(ZeroDivisionError), dispatch_batch():
        for i in range(3):
            app.tasks["add"].delay(i, i)
        _ = 1 / 0
    assert queues["celery"].queue_depth() == 3


def test_nested_batches_join_the_outer_one() -> None:
    app, _queues = make_app()
    with dispatch_batch() as outer:
        with dispatch_batch() as inner:
            assert inner is outer
            app.tasks["add"].delay(1, 1)
        app.tasks["add"].delay(2, 2)
    assert len(outer.results) == 2
