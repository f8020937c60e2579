"""CloudTasksDispatcher without network: a stand-in for the Google service answers.

The stand-in raises the same google.api_core exceptions the real client
raises; what is checked is what the dispatcher makes of them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from celery_cloudtasks import dispatcher as dispatcher_module
from celery_cloudtasks.dispatcher import CloudTasksDispatcher, translate_api_error
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.errors import (
    CloudTasksError,
    EnqueueError,
    PayloadTooLarge,
    PermissionDenied,
    QueueNotFound,
    TransientEnqueueError,
)
from celery_cloudtasks.settings import TransportSettings
from celery_cloudtasks.types import EnqueueOptions, OidcToken


class GoogleService:
    """Answers like Cloud Tasks: named tasks are unique, errors are scripted."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.errors = list(errors or [])
        self.create_calls = 0
        self.updated: list[dict[str, Any]] = []
        self.update_error: Exception | None = None

    def create_task(self, *, parent: str, task: dict[str, Any], retry: Any, timeout: float) -> Any:
        def attempt() -> dict[str, Any]:
            self.create_calls += 1
            if self.errors:
                raise self.errors.pop(0)
            if task["name"] in self.tasks:
                raise gexc.AlreadyExists("task exists")
            self.tasks[task["name"]] = task
            return task

        return retry(attempt)() if retry is not None else attempt()

    def update_queue(self, *, queue: dict[str, Any], update_mask: Any, timeout: float) -> Any:
        if self.update_error is not None:
            raise self.update_error
        self.updated.append(queue)
        return queue


def settings(**options: Any) -> TransportSettings:
    return TransportSettings.from_options(
        {
            "push_url": "https://w.run.app/_cloudtasks",
            "create_retry_deadline_seconds": 2,
            **options,
        },
        broker_url="cloudtasks://projects/p/locations/l",
        environ={},
    )


def envelope(size: int = 10) -> TaskEnvelope:
    return TaskEnvelope(
        message={
            "body": "x" * size,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"id": "id-1", "task": "t"},
            "properties": {},
        },
        queue="celery",
        published_at=1_700_000_000.0,
    )


OPTIONS = EnqueueOptions(
    idempotency_key="r/id-1/0",
    url="https://w.run.app/_cloudtasks",
    schedule_time=datetime(2030, 1, 1, tzinfo=timezone.utc),
    dispatch_deadline=timedelta(hours=2),
    oidc=OidcToken("sa@p.iam.gserviceaccount.com", "https://w.run.app"),
)


@pytest.fixture(autouse=True)
def _fresh_process_state() -> None:
    dispatcher_module._retry_applied.clear()


def test_creates_an_http_task_with_everything_set() -> None:
    service = GoogleService()
    queue = CloudTasksDispatcher(settings(), "orders", client=service)
    result = queue.enqueue(envelope(), OPTIONS)
    task = service.tasks[result.task_name]
    assert result.task_name.startswith("projects/p/locations/l/queues/orders/tasks/")
    assert not result.deduplicated and result.queue == "orders"
    http = task["http_request"]
    assert http["url"] == "https://w.run.app/_cloudtasks" and http["http_method"] == "POST"
    assert http["headers"]["Content-Type"] == "application/json"
    assert TaskEnvelope.from_json(http["body"]) == envelope()
    assert http["oidc_token"] == {
        "service_account_email": "sa@p.iam.gserviceaccount.com",
        "audience": "https://w.run.app",
    }
    assert task["schedule_time"] == OPTIONS.schedule_time
    assert task["dispatch_deadline"] == timedelta(minutes=30)  # clamped


def test_already_exists_is_a_deduplicated_success() -> None:
    service = GoogleService()
    queue = CloudTasksDispatcher(settings(), "orders", client=service)
    first = queue.enqueue(envelope(), OPTIONS)
    second = queue.enqueue(envelope(), OPTIONS)
    assert (first.deduplicated, second.deduplicated) == (False, True)
    assert first.task_name == second.task_name and len(service.tasks) == 1


def test_transient_errors_are_retried_and_a_lost_answer_still_counts_once() -> None:
    service = GoogleService([gexc.ServiceUnavailable("down"), gexc.DeadlineExceeded("slow")])
    queue = CloudTasksDispatcher(settings(), "orders", client=service)
    assert not queue.enqueue(envelope(), OPTIONS).deduplicated
    assert service.create_calls == 3 and len(service.tasks) == 1


def test_transient_errors_past_the_budget_raise_a_clear_error() -> None:
    service = GoogleService([gexc.ServiceUnavailable("down")] * 1000)
    queue = CloudTasksDispatcher(
        settings(create_retry_deadline_seconds=0.5), "orders", client=service
    )
    with pytest.raises(TransientEnqueueError, match="unavailable") as info:
        queue.enqueue(envelope(), OPTIONS)
    assert info.value.task_name is not None and service.tasks == {}


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (gexc.PermissionDenied("no"), PermissionDenied, "roles/cloudtasks.enqueuer"),
        (gexc.NotFound("gone"), QueueNotFound, "does not exist"),
        (gexc.FailedPrecondition("Queue x does not exist."), QueueNotFound, "queues sync"),
        (gexc.InvalidArgument("bad url"), EnqueueError, "InvalidArgument: bad url"),
        (gexc.ResourceExhausted("quota"), TransientEnqueueError, "quota"),
        (gexc.Unauthenticated("who"), EnqueueError, "Unauthenticated"),
    ],
)
def test_api_errors_map_to_library_errors(
    error: Exception, expected: type[Exception], text: str
) -> None:
    queue = CloudTasksDispatcher(settings(), "orders", client=GoogleService([error]))
    with pytest.raises(expected, match=text) as info:
        queue.enqueue(envelope(), OPTIONS)
    assert isinstance(info.value, CloudTasksError)
    assert info.value.__cause__ is error


def test_translation_is_total() -> None:
    for error in [gexc.Aborted("a"), gexc.InternalServerError("b"), gexc.Unknown("c")]:
        translated = translate_api_error(error, task_name="t", queue="q")
        assert isinstance(translated, EnqueueError) and translated.task_name == "t"


def test_payload_too_large_makes_no_rpc() -> None:
    service = GoogleService()
    queue = CloudTasksDispatcher(settings(), "orders", client=service)
    with pytest.raises(PayloadTooLarge):
        queue.enqueue(envelope(size=1_000_000), OPTIONS)
    assert service.create_calls == 0 and service.updated == []


def test_retry_config_applied_once_per_queue_with_a_field_mask() -> None:
    service = GoogleService()
    retry = {"max_attempts": 7, "min_backoff": 2, "max_backoff": 60, "max_retry_duration": 600}
    for _ in range(3):
        CloudTasksDispatcher(settings(retry=retry), "orders", client=service).enqueue(
            envelope(), OPTIONS
        )
    assert len(service.updated) == 1
    applied = service.updated[0]
    assert applied["name"] == "projects/p/locations/l/queues/orders"
    assert applied["retry_config"]["max_attempts"] == 7
    assert applied["retry_config"]["min_backoff"] == timedelta(seconds=2)


def test_retry_config_can_be_left_to_infrastructure_as_code() -> None:
    service = GoogleService()
    queue = CloudTasksDispatcher(settings(apply_queue_retry_config=False), "q", client=service)
    queue.enqueue(envelope(), OPTIONS)
    assert service.updated == [] and len(service.tasks) == 1


def test_permission_denied_on_update_warns_and_publishing_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = GoogleService()
    service.update_error = gexc.PermissionDenied("cloudtasks.queues.update denied")
    queue = CloudTasksDispatcher(settings(), "orders", client=service)
    with caplog.at_level(logging.WARNING):
        result = queue.enqueue(envelope(), OPTIONS)
    assert result.task_name in service.tasks
    assert "cloudtasks.queues.update" in caplog.text


def test_missing_gcp_extra_is_a_clear_configuration_error() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("google.cloud.tasks"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from celery_cloudtasks.dispatcher import make_client
from celery_cloudtasks.errors import ConfigurationError
try:
    make_client("127.0.0.1:1")
except ConfigurationError as exc:
    print("ERR", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "ERR" in out and "celery-cloudtasks[gcp]" in out
