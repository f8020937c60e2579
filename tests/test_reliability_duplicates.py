"""Duplicates: the same attempt published twice is one Cloud Tasks task, never two.

A message is published again with the same attempt when a parent task is
delivered twice (its callbacks republish the same child ids), when a web request
is retried, or when the answer to a create_task is lost and the RPC retried.
Each of 1,000 messages is published twice through ``apply_async``, one by one
and racing inside ``dispatch_batch``, against :class:`InMemoryTaskQueue` and
against a stand-in of the Google service that answers ``AlreadyExists`` as
Cloud Tasks does. Then: how ``dispatch_batch`` reports a partial failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, group
from google.api_core import exceptions as gexc

from celery_cloudtasks import (
    BatchEnqueueError,
    CloudTasksDispatcher,
    EnqueueError,
    InMemoryCloudTasks,
    TaskEnvelope,
    dispatch_batch,
    idempotency_key,
    task_id_for,
)
from celery_cloudtasks.errors import PermissionDenied, TransientEnqueueError
from celery_cloudtasks.settings import TransportSettings

COUNT = 1_000
BROKER = "cloudtasks://projects/p/locations/l"
PUSH = "https://worker.example.run.app/_cloudtasks"
QUEUE_PATH = "projects/p/locations/l/queues/celery"


class CloudTasksService:
    """Answers ``create_task`` like Cloud Tasks: one task per name, AlreadyExists after.

    Thread-safe (``dispatch_batch`` calls it from many threads). ``fail`` decides,
    per task name and call number, to raise an error instead; ``lose_answer``
    creates the task but raises DEADLINE_EXCEEDED, as when the response is lost.
    """

    def __init__(
        self,
        *,
        fail: Callable[[str], Exception | None] | None = None,
        lose_answer: Callable[[str], bool] | None = None,
    ) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.already_exists = 0
        self.fail = fail
        self.lose_answer = lose_answer
        self._lost: set[str] = set()
        self._lock = threading.Lock()

    def create_task(self, *, parent: str, task: dict[str, Any], retry: Any, timeout: float) -> Any:
        def attempt() -> dict[str, Any]:
            name = task["name"]
            with self._lock:
                self.calls += 1
                error = self.fail(name) if self.fail else None
                if error is not None:
                    raise error
                if name in self.tasks:
                    self.already_exists += 1
                    raise gexc.AlreadyExists(f"Requested entity already exists: {name}")
                self.tasks[name] = task
                if self.lose_answer and self.lose_answer(name) and name not in self._lost:
                    self._lost.add(name)
                    raise gexc.DeadlineExceeded("deadline exceeded (the task was created)")
                return task

        return retry(attempt)() if retry is not None else attempt()

    def update_queue(self, *, queue: dict[str, Any], update_mask: Any, timeout: float) -> Any:
        return queue


def _app(queue_factory: Callable[[str], Any], **options: Any) -> Celery:
    app = Celery("dups", set_as_current=False, broker=BROKER)
    app.conf.broker_transport_options = {
        "push_url": PUSH,
        "queue_factory": queue_factory,
        **options,
    }
    app.conf.result_backend = "cache+memory://"
    app.conf.task_ignore_result = True

    @app.task(name="dups.work", shared=False)
    def work(i: int, pad: str = "") -> int:
        return i

    return app


def memory_app() -> tuple[Celery, InMemoryCloudTasks]:
    memory = InMemoryCloudTasks()
    return _app(memory), memory


def google_app(service: CloudTasksService, **options: Any) -> Celery:
    options = {"create_retry_deadline_seconds": 5, **options}
    settings = TransportSettings.from_options(
        {"push_url": PUSH, **options}, broker_url=BROKER, environ={}
    )
    return _app(
        lambda queue_id: CloudTasksDispatcher(settings, queue_id, client=service), **options
    )


def task_ids(prefix: str, count: int = COUNT) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(count)]


def cloud_name(task_id: str, attempt: int = 0) -> str:
    return f"{QUEUE_PATH}/tasks/{task_id_for(idempotency_key(task_id, task_id, attempt))}"


def publish_twice(app: Celery, ids: list[str], *, concurrently: bool) -> None:
    work = app.tasks["dups.work"]
    if concurrently:
        # Both copies of each message race in the same batch.
        with dispatch_batch(max_in_flight=16) as batch:
            for n, task_id in enumerate(ids):
                work.apply_async((n,), task_id=task_id)
                work.apply_async((n,), task_id=task_id)
        assert len(batch.results) == 2 * len(ids)
    else:
        for n, task_id in enumerate(ids):
            work.apply_async((n,), task_id=task_id)
        for n, task_id in enumerate(ids):
            work.apply_async((n,), task_id=task_id)


@pytest.mark.parametrize("concurrently", [False, True], ids=["one-by-one", "dispatch_batch"])
def test_in_memory_each_message_published_twice_is_one_task(concurrently: bool) -> None:
    app, memory = memory_app()
    ids = task_ids("mem")
    publish_twice(app, ids, concurrently=concurrently)
    queue = memory.queue("celery")
    assert queue.queue_depth() == COUNT
    assert sorted(t.envelope.task_id for t in queue.tasks) == ids
    assert {t.task_id for t in queue.tasks} == {task_id_for(f"{i}/{i}/0") for i in ids}
    assert sum(r.deduplicated for r in queue.results) == COUNT
    assert sum(not r.deduplicated for r in queue.results) == COUNT


@pytest.mark.parametrize("concurrently", [False, True], ids=["one-by-one", "dispatch_batch"])
def test_google_each_message_published_twice_is_one_task(concurrently: bool) -> None:
    service = CloudTasksService()
    app = google_app(service)
    ids = task_ids("ggl")
    publish_twice(app, ids, concurrently=concurrently)  # AlreadyExists never surfaces
    assert sorted(service.tasks) == sorted(cloud_name(i) for i in ids)
    assert service.calls == 2 * COUNT and service.already_exists == COUNT


def test_google_lost_answers_are_retried_into_already_exists_not_into_copies() -> None:
    # One create in ten succeeds but its answer is lost: the retry hits AlreadyExists.
    lost = {cloud_name(i) for i in task_ids("lost")[::10]}
    service = CloudTasksService(lose_answer=lambda name: name in lost)
    app = google_app(service)
    with dispatch_batch(max_in_flight=32) as batch:
        for n, task_id in enumerate(task_ids("lost")):
            app.tasks["dups.work"].apply_async((n,), task_id=task_id)
    assert len(service.tasks) == COUNT
    assert sum(r.deduplicated for r in batch.results) == len(lost)
    assert {r.task_name for r in batch.results if r.deduplicated} == lost


def test_a_new_attempt_is_a_new_task() -> None:
    # self.retry() republishes the same task id with retries + 1: that must not be deduplicated.
    service = CloudTasksService()
    app = google_app(service)
    work = app.tasks["dups.work"]
    ids = task_ids("att", 200)
    for n, task_id in enumerate(ids):
        work.apply_async((n,), task_id=task_id)
        work.apply_async((n,), task_id=task_id, retries=1)
        work.apply_async((n,), task_id=task_id, retries=1)
    expected = {cloud_name(i, attempt) for i in ids for attempt in (0, 1)}
    assert set(service.tasks) == expected and service.already_exists == len(ids)


# -- dispatch_batch: which tasks were and were not enqueued -------------------------------


def _failing(ids: set[str], error: Callable[[], Exception]) -> Callable[[str], Exception | None]:
    names = {cloud_name(i) for i in ids}
    return lambda name: error() if name in names else None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (lambda: gexc.PermissionDenied("caller lacks cloudtasks.tasks.create"), PermissionDenied),
        (lambda: gexc.InvalidArgument("bad task"), EnqueueError),
        (lambda: gexc.ServiceUnavailable("down"), TransientEnqueueError),
    ],
    ids=["permission", "invalid", "unavailable-past-budget"],
)
def test_batch_failure_lists_exactly_what_was_and_was_not_enqueued(
    error: Callable[[], Exception], expected: type[Exception]
) -> None:
    ids = task_ids("bf", 300)
    bad = set(ids[::7])
    service = CloudTasksService(fail=_failing(bad, error))
    app = google_app(service, create_retry_deadline_seconds=0.3)
    work = app.tasks["dups.work"]
    with pytest.raises(BatchEnqueueError) as info, dispatch_batch(max_in_flight=16):
        for n, task_id in enumerate(ids):
            work.apply_async((n,), task_id=task_id)
    err = info.value
    # Enqueued: exactly the tasks that exist in Cloud Tasks.
    assert sorted(err.enqueued) == sorted(service.tasks)
    assert set(err.enqueued) == {cloud_name(i) for i in ids if i not in bad}
    # Not enqueued: exactly the failing ones, by idempotency key, with the library error.
    assert set(err.failed) == {idempotency_key(i, i, 0) for i in bad}
    assert all(isinstance(e, expected) for e in err.failed.values())
    assert f"{len(bad)} of {len(ids)} tasks may not have been enqueued" in str(err)
    # Re-dispatching the whole batch once the cause is fixed is safe: no copies.
    service.fail = None
    with dispatch_batch(max_in_flight=16) as batch:
        for n, task_id in enumerate(ids):
            work.apply_async((n,), task_id=task_id)
    assert set(service.tasks) == {cloud_name(i) for i in ids}
    created = {r.task_name for r in batch.results if not r.deduplicated}
    assert created == {cloud_name(i) for i in bad}


def test_batch_failure_in_memory_payload_too_large() -> None:
    app, memory = memory_app()
    work = app.tasks["dups.work"]
    ids = task_ids("big", 200)
    big = set(ids[::10])
    with pytest.raises(BatchEnqueueError) as info, dispatch_batch():
        for n, task_id in enumerate(ids):
            work.apply_async((n, "x" * 1_100_000 if task_id in big else ""), task_id=task_id)
    queue = memory.queue("celery")
    assert sorted(info.value.enqueued) == sorted(t.task_id for t in queue.tasks)
    assert {t.envelope.task_id for t in queue.tasks} == set(ids) - big
    assert set(info.value.failed) == {idempotency_key(i, i, 0) for i in big}
    assert "over the Cloud Tasks limit" in str(next(iter(info.value.failed.values())))


def test_error_inside_the_block_still_waits_for_submitted_tasks() -> None:
    service = CloudTasksService()
    app = google_app(service)
    ids = task_ids("blk", 100)
    with pytest.raises(ZeroDivisionError), dispatch_batch():
        for n, task_id in enumerate(ids):
            app.tasks["dups.work"].apply_async((n,), task_id=task_id)
        1 / 0  # noqa: B018
    # Everything published before the error exists when the block is left.
    assert set(service.tasks) == {cloud_name(i) for i in ids}


def test_group_inside_a_batch_is_one_task_per_member_even_published_twice() -> None:
    service = CloudTasksService()
    app = google_app(service)
    work = app.tasks["dups.work"]
    sig = group(work.s(i) for i in range(500))
    ids = [r.id for r in sig.freeze().results]
    with dispatch_batch():
        sig.apply_async()
        sig.apply_async()  # same frozen ids: a duplicated group publish
    assert len(service.tasks) == 500
    bodies = [TaskEnvelope.from_json(t["http_request"]["body"]) for t in service.tasks.values()]
    assert sorted(e.task_id for e in bodies) == sorted(ids)
