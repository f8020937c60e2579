"""The kombu transport over InMemoryTaskQueue: what apply_async turns into."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group

import celery_cloudtasks
from celery_cloudtasks import (
    ConfigurationError,
    InMemoryCloudTasks,
    PayloadTooLarge,
    RoutingError,
    TenantRouter,
    UnsupportedOperation,
    task_id_for,
)
from celery_cloudtasks.memory import InMemoryTask

PUSH = "https://worker.example.run.app/_cloudtasks"


def make_app(**options: Any) -> tuple[Celery, InMemoryCloudTasks]:
    memory = InMemoryCloudTasks()
    app = Celery("shop", broker="cloudtasks://projects/example.com:shop/locations/europe-west1")
    app.conf.broker_transport_options = {"push_url": PUSH, "queue_factory": memory, **options}
    app.conf.result_backend = "cache+memory://"

    @app.task(name="shop.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="shop.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    return app, memory


def decoded(task: InMemoryTask) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    message = task.envelope.message
    assert message["content-type"] == "application/json"
    assert message["properties"]["body_encoding"] == "base64"
    args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
    return args, kwargs, embed


def only_task(memory: InMemoryCloudTasks, queue: str = "celery") -> InMemoryTask:
    tasks = memory.queue(queue).tasks
    assert len(tasks) == 1, tasks
    return tasks[0]


def test_delay_creates_one_named_task_with_the_celery_message() -> None:
    app, memory = make_app()
    result = app.tasks["shop.add"].delay(2, 3)
    task = only_task(memory)
    assert task.task_id == task_id_for(f"{result.id}/{result.id}/0")
    assert task.options.url == PUSH
    assert task.options.schedule_time is None
    assert decoded(task)[:2] == ([2, 3], {})
    headers = task.envelope.message["headers"]
    assert (headers["task"], headers["id"], headers["retries"]) == ("shop.add", result.id, 0)
    assert task.envelope.queue == "celery"
    assert json.loads(task.body)["message"]["headers"]["id"] == result.id


def test_countdown_eta_expires_and_time_limit() -> None:
    app, memory = make_app()
    before = datetime.now(timezone.utc)
    app.tasks["shop.add"].apply_async((1, 1), countdown=90, expires=600, time_limit=45)
    task = only_task(memory)
    schedule = task.options.schedule_time
    assert schedule is not None
    assert before + timedelta(seconds=89) < schedule < before + timedelta(seconds=92)
    assert task.envelope.scheduled_at == pytest.approx(schedule.timestamp())
    assert task.options.dispatch_deadline == timedelta(seconds=45)
    assert task.envelope.message["headers"]["expires"] is not None


def test_eta_beyond_thirty_days_is_scheduled_at_the_horizon_and_keeps_the_real_eta() -> None:
    app, memory = make_app()
    eta = datetime.now(timezone.utc) + timedelta(days=45)
    app.tasks["shop.add"].apply_async((1, 1), eta=eta)
    task = only_task(memory)
    assert task.options.schedule_time is not None
    assert task.options.schedule_time < datetime.now(timezone.utc) + timedelta(days=30)
    real = datetime.fromisoformat(task.envelope.message["headers"]["eta"])
    assert abs((real - eta).total_seconds()) < 1


def test_same_attempt_twice_is_one_task_and_a_retry_is_another() -> None:
    app, memory = make_app()
    app.send_task("shop.add", (1, 2), task_id="fixed-id")
    app.send_task("shop.add", (1, 2), task_id="fixed-id")
    queue = memory.queue("celery")
    assert queue.queue_depth() == 1
    assert [r.deduplicated for r in queue.results] == [False, True]
    app.send_task("shop.add", (1, 2), task_id="fixed-id", retries=1)
    assert queue.queue_depth() == 2
    assert {t.envelope.retries for t in queue.tasks} == {0, 1}


def test_send_task_by_name_and_queue_mapping() -> None:
    app, memory = make_app(queue_map={"emails": "mail-v2"}, queue_name_prefix="shop-")
    app.send_task("shop.add", (1, 2), queue="emails")
    app.send_task("unknown.elsewhere", (), queue="bulk_jobs")
    assert decoded(only_task(memory, "mail-v2"))[0] == [1, 2]
    assert only_task(memory, "shop-bulk-jobs").envelope.task_name == "unknown.elsewhere"


def test_task_routes_route_by_task_type() -> None:
    app, memory = make_app()
    app.conf.task_routes = {"shop.tsum": {"queue": "reports"}}
    app.tasks["shop.tsum"].delay([1, 2])
    assert only_task(memory, "reports").envelope.task_name == "shop.tsum"


def test_priority_queues() -> None:
    app, memory = make_app(priority_queues={5: "high", 9: "urgent"})
    add = app.tasks["shop.add"]
    add.apply_async((1, 1), priority=0)
    add.apply_async((1, 1), priority=6)
    add.apply_async((1, 1), priority=9)
    assert [q for q, queue in memory.queues.items() if queue.queue_depth()] == [
        "celery",
        "celery-high",
        "celery-urgent",
    ]
    urgent = only_task(memory, "celery-urgent")
    assert urgent.envelope.message["properties"]["priority"] == 9


def test_tenant_router() -> None:
    app, memory = make_app()
    app.conf.task_routes = (TenantRouter(allowed={"acme", "globex"}),)
    add = app.tasks["shop.add"]
    add.apply_async((1, 2), headers={"tenant": "acme"})
    app.tasks["shop.tsum"].apply_async(([1],), kwargs={}, headers={"tenant": "globex"})
    app.send_task("shop.add", kwargs={"a": 1, "b": 2, "tenant_id": "globex"})
    assert memory.queue("tenant-acme").queue_depth() == 1
    assert memory.queue("tenant-globex").queue_depth() == 2
    for bad in ["../etc", "Acme", "", "x" * 41, "initech"]:
        with pytest.raises(RoutingError):
            add.apply_async((1, 2), headers={"tenant": bad})
    assert sum(q.queue_depth() for q in memory.queues.values()) == 3  # nothing else published


def test_per_call_options() -> None:
    app, memory = make_app()
    add = app.tasks["shop.add"]
    add.apply_async(
        (1, 2),
        cloudtasks_queue="direct-queue",
        cloudtasks_url="https://other.run.app/_cloudtasks/add",
        cloudtasks_dispatch_deadline=120,
    )
    task = only_task(memory, "direct-queue")
    assert task.options.url == "https://other.run.app/_cloudtasks/add"
    assert task.options.dispatch_deadline == timedelta(seconds=120)
    assert not any(k.startswith("cloudtasks_") for k in task.envelope.message["properties"])
    with pytest.raises(ConfigurationError, match="cloudtasks_queu"):
        add.apply_async((1, 2), cloudtasks_queu="typo")
    assert sum(q.queue_depth() for q in memory.queues.values()) == 1


def test_oidc_token_settings_are_attached() -> None:
    app, memory = make_app(
        oidc_service_account_email="tasks@shop.iam.gserviceaccount.com",
        oidc_audience="https://worker.example.run.app",
    )
    app.tasks["shop.add"].delay(1, 2)
    oidc = only_task(memory).options.oidc
    assert oidc is not None
    assert oidc.service_account_email == "tasks@shop.iam.gserviceaccount.com"
    assert oidc.audience == "https://worker.example.run.app"


def test_canvas_chain_group_chord_publish_what_celery_publishes() -> None:
    app, memory = make_app()
    add, tsum = app.tasks["shop.add"], app.tasks["shop.tsum"]
    chained = chain(add.s(1, 2), add.s(10), add.s(100)).apply_async()
    only = only_task(memory)
    assert only.envelope.task_id == chained.parent.parent.id  # only the first step
    assert only.envelope.message["headers"]["root_id"] == chained.parent.parent.id
    memory.queue("celery").purge()
    grouped = group(add.s(i, i) for i in range(5)).apply_async()
    members = {t.envelope.task_id for t in memory.queue("celery").tasks}
    assert members == {r.id for r in grouped.results}
    group_ids = {t.envelope.message["headers"]["group"] for t in memory.queue("celery").tasks}
    assert group_ids == {grouped.id}
    memory.queue("celery").purge()
    chorded = chord((add.s(i, i) for i in range(3)), tsum.s()).apply_async()
    header_tasks = memory.queue("celery").tasks
    assert len(header_tasks) == 3
    embed = decoded(header_tasks[0])[2]
    assert embed["chord"]["options"]["task_id"] == chorded.id


def test_payload_too_large_fails_before_any_enqueue() -> None:
    app, memory = make_app()
    with pytest.raises(PayloadTooLarge, match="by reference"):
        app.tasks["shop.tsum"].delay(["x" * 1000] * 1000)
    assert memory.queue("celery").queue_depth() == 0
    assert memory.queue("celery").results == []


def test_remote_control_fails_fast_instead_of_hanging() -> None:
    app, _ = make_app()
    started = time.monotonic()
    with pytest.raises(UnsupportedOperation, match="remote control"):
        app.control.inspect(timeout=5).ping()
    with pytest.raises(UnsupportedOperation, match="remote control"):
        app.control.revoke("some-id")
    assert time.monotonic() - started < 3


def test_rpc_results_fail_fast() -> None:
    app, _ = make_app()
    app.conf.result_backend = "rpc://"
    result = app.tasks["shop.add"].delay(1, 2)
    started = time.monotonic()
    with pytest.raises(UnsupportedOperation, match="send-only"):
        result.get(timeout=5)
    assert time.monotonic() - started < 3


def test_events_are_discarded_with_a_warning_but_tasks_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, memory = make_app()
    app.conf.task_send_sent_event = True
    app.tasks["shop.add"].delay(1, 2)
    assert memory.queue("celery").queue_depth() == 1
    assert "cannot travel over Cloud Tasks" in caplog.text


def test_task_message_to_an_unbound_exchange_is_refused() -> None:
    from kombu import Exchange

    app, memory = make_app()
    with app.producer_or_acquire() as producer:
        producer.channel.exchange_declare("orphans", "topic")
        with pytest.raises(RoutingError, match="would be dropped"):
            producer.publish(
                {},
                exchange=Exchange("orphans", "topic"),
                routing_key="nowhere",
                headers={"id": "x", "task": "t"},
            )
    assert memory.all_tasks() == []


def test_queue_size_and_purge_through_kombu() -> None:
    app, memory = make_app()
    for i in range(3):
        app.tasks["shop.add"].delay(i, i)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.queue_declare("celery", passive=True).message_count == 3
        assert channel.queue_purge("celery") == 3
    assert memory.queue("celery").queue_depth() == 0


def test_transport_is_registered_and_usable_by_path() -> None:
    from kombu.transport import TRANSPORT_ALIASES

    assert TRANSPORT_ALIASES["cloudtasks"] == "celery_cloudtasks.transport:Transport"
    memory = InMemoryCloudTasks()
    app = Celery("x")
    app.conf.broker_transport = "celery_cloudtasks.transport:Transport"
    app.conf.broker_transport_options = {
        "push_url": PUSH,
        "queue_factory": memory,
        "project": "p",
        "location": "l",
    }
    app.send_task("a.b", ())
    assert memory.queue("celery").queue_depth() == 1


def test_unknown_option_is_a_configuration_error() -> None:
    app, _ = make_app(push_ulr="typo")
    with pytest.raises(ConfigurationError, match="push_ulr"):
        app.send_task("a.b", ())


def test_celery_worker_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "wapp.py").write_text(
        textwrap.dedent(
            """
            import celery_cloudtasks
            from celery import Celery
            app = Celery("w", broker="cloudtasks://projects/p/locations/l")
            app.conf.broker_transport_options = {
                "push_url": "http://127.0.0.1:9/_cloudtasks",
                "queue_factory": celery_cloudtasks.InMemoryCloudTasks(),
            }
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "wapp", "worker", "--pool", "solo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "send-only" in proc.stdout + proc.stderr


def test_import_does_not_load_google_or_flask() -> None:
    code = (
        "import sys, celery_cloudtasks;"
        "bad=[m for m in sys.modules if m.startswith(('google', 'grpc', 'flask'))];"
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert celery_cloudtasks.__version__
