"""One contract, two implementations: InMemoryTaskQueue and CloudTasksDispatcher (emulator).

Deduplication is not part of the emulator's behaviour (it accepts duplicate
names), so it is checked for both against services that do deduplicate:
InMemoryTaskQueue here and the Google stand-in in test_dispatcher.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from emulator import Emulator

from celery_cloudtasks import InMemoryTaskQueue, TaskQueue, task_id_for
from celery_cloudtasks.dispatcher import CloudTasksDispatcher
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.errors import PayloadTooLarge
from celery_cloudtasks.settings import TransportSettings
from celery_cloudtasks.types import EnqueueOptions

PROJECT, LOCATION = "contract", "here"
URL = "http://127.0.0.1:9/_cloudtasks"


def envelope(task_id: str, body: str = "e30=") -> TaskEnvelope:
    return TaskEnvelope(
        message={
            "body": body,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"id": task_id, "task": "t.add", "retries": 0},
            "properties": {},
        },
        queue="celery",
    )


def later(minutes: int = 60) -> datetime:
    return datetime.now(timezone.utc) + timedelta(minutes=minutes)


@pytest.fixture(params=["memory", "cloudtasks"])
def queue(request: pytest.FixtureRequest, fresh_queue_id: str) -> Iterator[TaskQueue]:
    if request.param == "memory":
        yield InMemoryTaskQueue(fresh_queue_id)
        return
    emulator: Emulator = request.getfixturevalue("emulator")
    emulator.create_queue(PROJECT, LOCATION, fresh_queue_id, paused=True)
    settings = TransportSettings.from_options(
        {"push_url": URL, "emulator_host": emulator.host},
        broker_url=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
        environ={},
    )
    yield CloudTasksDispatcher(settings, fresh_queue_id)


def test_enqueue_names_the_task_after_its_key(queue: TaskQueue) -> None:
    result = queue.enqueue(envelope("a"), EnqueueOptions("r/a/0", URL, schedule_time=later()))
    assert result.task_name.rsplit("/", 1)[-1] == task_id_for("r/a/0")
    assert result.queue == queue.queue_name
    assert not result.deduplicated
    assert result.dispatch_latency_seconds >= 0


def test_depth_counts_waiting_tasks_and_purge_empties(queue: TaskQueue) -> None:
    assert queue.queue_depth() == 0
    for i in range(5):
        queue.enqueue(envelope(f"t{i}"), EnqueueOptions(f"r/t{i}/0", URL, schedule_time=later()))
    assert queue.queue_depth() == 5
    assert queue.purge() == 5
    assert queue.queue_depth() == 0


def test_too_large_is_refused_before_anything_is_created(queue: TaskQueue) -> None:
    with pytest.raises(PayloadTooLarge):
        queue.enqueue(envelope("big", "A" * 1_100_000), EnqueueOptions("r/big/0", URL))
    assert queue.queue_depth() == 0


def test_distinct_attempts_are_distinct_tasks(queue: TaskQueue) -> None:
    names = {
        queue.enqueue(
            envelope("x"), EnqueueOptions(f"r/x/{n}", URL, schedule_time=later())
        ).task_name
        for n in range(3)
    }
    assert len(names) == 3
    assert queue.queue_depth() == 3


def test_in_memory_queue_deduplicates_within_the_window() -> None:
    queue = InMemoryTaskQueue("q")
    first = queue.enqueue(envelope("a"), EnqueueOptions("r/a/0", URL))
    again = queue.enqueue(envelope("a"), EnqueueOptions("r/a/0", URL))
    assert (first.deduplicated, again.deduplicated) == (False, True)
    assert queue.queue_depth() == 1
