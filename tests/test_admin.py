"""QueueAdmin and DeadLetterAdmin against the real Cloud Tasks emulator; errors scripted.

What the emulator lets us assert (gcloud-tasks-emulator 0.6.2): ``create_queue`` stores the
queue exactly as sent, so retry config and rate limits given at creation are read back;
``update_queue`` answers OK and changes nothing, so updates are asserted as planned and
sent, not as stored; ``delete_task`` is UNIMPLEMENTED, so replayed dead letters stay put;
missing queues answer UNKNOWN, which DeadLetterAdmin must still report as QueueNotFound. IAM is
not emulated: permission errors are scripted with the google.api_core exceptions.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from emulator import Emulator
from google.api_core import exceptions as gexc
from google.cloud import tasks_v2

from celery_cloudtasks import TenantRouter
from celery_cloudtasks.admin import desired_queues
from celery_cloudtasks.deadletter import REPLAYS_HEADER
from celery_cloudtasks.dispatcher import CloudTasksDispatcher
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.errors import ConfigurationError, PermissionDenied, QueueNotFound
from celery_cloudtasks.naming import task_id_for
from celery_cloudtasks.replay import DeadLetterAdmin
from celery_cloudtasks.settings import TransportSettings
from celery_cloudtasks.types import EnqueueOptions

PROJECT, LOCATION = "admin-proj", "europe-west1"
PUSH = "http://127.0.0.1:9/_cloudtasks"
RETRY = {"max_attempts": 7, "min_backoff": 2, "max_backoff": 40, "max_retry_duration": 600}


def transport_options(emulator: Emulator, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "push_url": PUSH,
        "emulator_host": emulator.host,
        "queue_name_prefix": prefix,
        "dead_letter_queue": f"{prefix}dead",
        "retry": RETRY,
        **extra,
    }


def make_app(emulator: Emulator, prefix: str, **extra: Any) -> Celery:
    app = Celery(
        "adminapp",
        broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
        set_as_current=False,
    )
    app.conf.broker_transport_options = transport_options(emulator, prefix, **extra)
    app.conf.task_routes = {"billing.*": {"queue": "billing"}}
    return app


def queue_path(queue_id: str) -> str:
    return f"projects/{PROJECT}/locations/{LOCATION}/queues/{queue_id}"


def celery_message(task_id: str, args: list[Any], *, replays: int | None = None) -> dict[str, Any]:
    """A Celery protocol-2 message as the transport stores it in an envelope."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": "shop.add",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "retries": 0,
        "eta": None,
        "expires": None,
    }
    if replays is not None:
        headers[REPLAYS_HEADER] = replays
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return {
        "body": body,
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": headers,
        "properties": {"body_encoding": "base64", "delivery_tag": task_id, "priority": 0},
    }


def put_dead_letter(
    settings: TransportSettings,
    original_queue_id: str,
    *,
    args: list[Any] | None = None,
    replays_header: int | None = None,
) -> TaskEnvelope:
    """Enqueue a dead letter (as the endpoint stores one) into the dead-letter queue."""
    task_id = str(uuid.uuid4())
    info = {
        "reason": "final attempt (5): failure",
        "exception_type": "ValueError",
        "exception_message": "card declined",
        "traceback": 'Traceback (most recent call last):\n  File "shop.py"\nValueError: declined\n',
        "attempts": 5,
        "original_queue": "celery",
        "cloudtasks_queue": queue_path(original_queue_id),  # the emulator sends the full path
        "cloudtasks_task_name": "abc",
        "task_id": task_id,
        "task_name": "shop.add",
        "replays": 0,
    }
    envelope = TaskEnvelope(
        message=celery_message(task_id, args or [2, 3], replays=replays_header),
        queue="celery",
        dead_letter=info,
    )
    assert settings.dead_letter_queue
    CloudTasksDispatcher(settings, settings.dead_letter_queue).enqueue(
        envelope, EnqueueOptions(idempotency_key=f"dead-letter/{task_id}/0", url=PUSH)
    )
    return envelope


def held(emulator: Emulator, queue_id: str) -> list[tuple[str, TaskEnvelope]]:
    return [
        (t.name, TaskEnvelope.from_json(t.http_request.body))
        for t in emulator.list_tasks(queue_path(queue_id))
    ]


@pytest.fixture
def prefix() -> str:
    return f"a{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def app(emulator: Emulator, prefix: str) -> Celery:
    return make_app(emulator, prefix)


@pytest.fixture
def admin(app: Celery) -> DeadLetterAdmin:
    return DeadLetterAdmin(TransportSettings.from_celery(app))


def test_desired_queues_follow_the_configuration(app: Celery, prefix: str) -> None:
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "priority_queues": {5: "high"},
        "queue_map": {"legacy.q": "legacy-q"},
    }
    app.conf.task_routes = [
        TenantRouter(allowed=["globex"], default_queue="shared"),
        {"billing.*": {"queue": "billing"}},
    ]
    settings = TransportSettings.from_celery(app)
    wanted = {d.queue_id: d for d in desired_queues(app, settings, extra=["tenant-acme"])}
    assert set(wanted) == {
        f"{prefix}celery",
        f"{prefix}celery-high",
        f"{prefix}billing",
        f"{prefix}billing-high",
        f"{prefix}tenant-acme",
        f"{prefix}tenant-acme-high",
        f"{prefix}tenant-globex",
        f"{prefix}tenant-globex-high",
        f"{prefix}shared",
        f"{prefix}shared-high",
        "legacy-q",
        "legacy-q-high",
        f"{prefix}dead",
    }
    assert wanted[f"{prefix}dead"].paused and wanted[f"{prefix}dead"].retry is None
    assert wanted[f"{prefix}billing"].retry == settings.retry
    assert wanted[f"{prefix}tenant-acme"].source == "--queue"


def test_sync_creates_queues_with_retry_rates_and_a_paused_dead_letter_queue(
    admin: DeadLetterAdmin, prefix: str, app: Celery
) -> None:
    desired = desired_queues(
        app, admin.settings, max_dispatches_per_second=7.5, max_concurrent_dispatches=20
    )
    plan = admin.plan_sync(desired)
    assert {c.action for c in plan.changes} == {"create"}
    assert not [q for q in admin.list_queues() if q.queue_id.startswith(prefix)]  # nothing made

    admin.apply_sync(plan)

    billing = admin.describe(f"{prefix}billing")
    assert billing.state == "RUNNING" and billing.depth == 0
    assert billing.settings["max_attempts"] == 7
    assert billing.settings["min_backoff"] == timedelta(seconds=2)
    assert billing.settings["max_backoff"] == timedelta(seconds=40)
    assert billing.settings["max_retry_duration"] == timedelta(seconds=600)
    assert billing.settings["max_dispatches_per_second"] == 7.5
    assert billing.settings["max_concurrent_dispatches"] == 20
    assert admin.describe(f"{prefix}dead").state == "PAUSED"
    again = admin.plan_sync(desired)
    assert again.pending == ()


def test_sync_plans_updates_and_pauses_a_running_dead_letter_queue(
    admin: DeadLetterAdmin, emulator: Emulator, prefix: str, app: Celery
) -> None:
    emulator.create_queue(PROJECT, LOCATION, f"{prefix}dead")  # RUNNING: must become PAUSED
    admin.apply_sync(admin.plan_sync(desired_queues(app, admin.settings)))
    desired = desired_queues(app, admin.settings, max_dispatches_per_second=3)
    plan = admin.plan_sync(desired)
    [billing] = [c for c in plan.changes if c.desired.queue_id == f"{prefix}billing"]
    assert billing.action == "update"
    assert [(c.field, c.old, c.new) for c in billing.changes] == [
        ("max_dispatches_per_second", None, 3.0)
    ]
    assert admin.describe(f"{prefix}dead").state == "PAUSED"
    # update_queue is accepted; the emulator does not store it (documented no-op).
    assert len(admin.apply_sync(plan)) == len(plan.pending)


def test_retry_policy_unmanaged_when_apply_queue_retry_config_is_false(
    emulator: Emulator, prefix: str
) -> None:
    app = make_app(emulator, prefix, apply_queue_retry_config=False)
    settings = TransportSettings.from_celery(app)
    plan = DeadLetterAdmin(settings).plan_sync(desired_queues(app, settings))
    fields = {c.field for change in plan.changes for c in change.changes}
    assert fields == {"state"}  # only the dead-letter queue's PAUSED state


def test_pause_resume_and_purge(admin: DeadLetterAdmin, emulator: Emulator, prefix: str) -> None:
    queue_id = f"{prefix}work"
    emulator.create_queue(PROJECT, LOCATION, queue_id, paused=True)
    assert admin.resume(queue_id).state == "RUNNING"
    assert admin.pause(queue_id).state == "PAUSED"
    queue = CloudTasksDispatcher(admin.settings, queue_id)
    for n in range(3):
        queue.enqueue(
            TaskEnvelope(message=celery_message(f"t{n}", [n]), queue="work"),
            EnqueueOptions(idempotency_key=f"r/t{n}/0", url=PUSH),
        )
    assert admin.describe(queue_id).depth == 3
    assert admin.purge(queue_id) == 3
    assert emulator.list_tasks(queue_path(queue_id)) == []


@pytest.mark.parametrize("operation", ["describe", "pause", "resume", "purge"])
def test_missing_queue_is_queue_not_found(admin: DeadLetterAdmin, operation: str) -> None:
    with pytest.raises(QueueNotFound, match="'nope-queue' does not exist"):
        getattr(admin, operation)("nope-queue")


def test_dead_letters_list_and_replay_into_the_original_queue(
    admin: DeadLetterAdmin, emulator: Emulator, prefix: str, app: Celery
) -> None:
    admin.apply_sync(admin.plan_sync(desired_queues(app, admin.settings)))
    original = f"{prefix}celery"
    admin.pause(original)  # keep replays listable
    dead = put_dead_letter(admin.settings, original, args=[4, 5])
    [letter] = admin.list_dead_letters()
    assert letter.envelope is not None and letter.envelope.task_id == dead.task_id
    assert letter.info["exception_type"] == "ValueError" and letter.replays == 0

    report = admin.replay_dead_letters()

    assert [pair[0].task_name for pair in report.replayed] == [letter.task_name]
    assert report.not_deleted == (letter.task_name,)
    assert report.delete_error is not None and "not implemented" in report.delete_error
    assert not report.complete
    [(name, replayed)] = held(emulator, original)
    key = f"{dead.task_id}/{dead.task_id}/0/replay/1"
    assert name == f"{queue_path(original)}/tasks/{task_id_for(key)}"
    assert replayed.dead_letter is None
    assert replayed.headers[REPLAYS_HEADER] == 1
    assert replayed.task_id == dead.task_id and replayed.message["body"] == dead.message["body"]
    assert replayed.queue == "celery"


def test_a_replay_that_died_again_gets_the_next_replay_name(
    admin: DeadLetterAdmin, emulator: Emulator, prefix: str, app: Celery
) -> None:
    admin.apply_sync(admin.plan_sync(desired_queues(app, admin.settings)))
    original = f"{prefix}celery"
    admin.pause(original)
    dead = put_dead_letter(admin.settings, original, replays_header=1)
    report = admin.replay_dead_letters(only={dead.task_id})
    assert len(report.replayed) == 1
    [(name, replayed)] = held(emulator, original)
    assert name.endswith(task_id_for(f"{dead.task_id}/{dead.task_id}/0/replay/2"))
    assert replayed.headers[REPLAYS_HEADER] == 2


def test_undecodable_dead_letters_are_listed_but_not_replayed(
    admin: DeadLetterAdmin, emulator: Emulator, prefix: str
) -> None:
    dlq = f"{prefix}dead"
    emulator.create_queue(PROJECT, LOCATION, dlq, paused=True)
    junk = tasks_v2.Task(
        name=f"{queue_path(dlq)}/tasks/junk1",
        http_request=tasks_v2.HttpRequest(
            url=PUSH, body=b'{"v": 1, "dead_letter": {"reason": "x"}}'
        ),
    )
    emulator.client().create_task(parent=queue_path(dlq), task=junk)
    [letter] = admin.list_dead_letters()
    assert letter.envelope is None and letter.info == {"reason": "x"}
    report = admin.replay_dead_letters()
    assert report.replayed == () and len(report.failed) == 1
    assert admin.purge_dead_letters() == 1
    assert admin.list_dead_letters() == []


def test_dead_letter_commands_need_a_dead_letter_queue(emulator: Emulator, prefix: str) -> None:
    app = make_app(emulator, prefix, dead_letter_queue=None)
    with pytest.raises(ConfigurationError, match="dead_letter_queue"):
        DeadLetterAdmin(TransportSettings.from_celery(app)).list_dead_letters()


# -- the real API's answers, scripted ---------------------------------------------------


class RefusingClient:
    """Answers every call with one google.api_core error, as Cloud Tasks would."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return call


@pytest.mark.parametrize(
    ("operation", "permission"),
    [
        ("list_queues", "cloudtasks.queues.list"),
        ("pause", "cloudtasks.queues.pause"),
        ("resume", "cloudtasks.queues.resume"),
        ("list_dead_letters", "cloudtasks.tasks.fullView"),
    ],
)
def test_permission_denied_names_the_iam_permission(operation: str, permission: str) -> None:
    settings = TransportSettings(project="p", location="l", dead_letter_queue="dead")
    admin = DeadLetterAdmin(
        settings, client=RefusingClient(gexc.PermissionDenied("caller lacks it"))
    )
    args = ("q",) if operation in ("pause", "resume") else ()
    with pytest.raises(PermissionDenied, match=permission) as caught:
        getattr(admin, operation)(*args)
    assert "caller lacks it" in str(caught.value)


def test_not_found_from_the_real_api_is_queue_not_found() -> None:
    settings = TransportSettings(project="p", location="l")
    admin = DeadLetterAdmin(settings, client=RefusingClient(gexc.NotFound("Queue does not exist.")))
    with pytest.raises(QueueNotFound, match="projects/p/locations/l/queues/q"):
        admin.pause("q")
