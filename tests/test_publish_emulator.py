"""apply_async through the transport into the real Cloud Tasks emulator (gRPC).

Queues are created paused, so every published task stays listable: the test
reads back exactly what Cloud Tasks holds (name, URL, schedule, OIDC-free body).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery, chain, chord, group
from emulator import Emulator

from celery_cloudtasks import TenantRouter, task_id_for
from celery_cloudtasks.envelope import TaskEnvelope

PROJECT, LOCATION = "example.com:shop", "europe-west1"
PUSH = "http://127.0.0.1:9/_cloudtasks"


@pytest.fixture
def setup(emulator: Emulator) -> tuple[Celery, Emulator, str]:
    prefix = f"p{uuid.uuid4().hex[:8]}-"
    app = Celery("shop", broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}")
    app.conf.broker_transport_options = {
        "push_url": PUSH,
        "emulator_host": emulator.host,
        "queue_name_prefix": prefix,
    }
    app.conf.result_backend = "cache+memory://"

    @app.task(name="shop.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="shop.tsum", shared=False)
    def tsum(values: list[int]) -> int:
        return sum(values)

    for queue in ("celery", "tenant-acme", "tenant-globex"):
        emulator.create_queue(PROJECT, LOCATION, prefix + queue, paused=True)
    return app, emulator, prefix


def held(emulator: Emulator, queue_id: str) -> list[tuple[Any, TaskEnvelope]]:
    path = f"projects/{PROJECT}/locations/{LOCATION}/queues/{queue_id}"
    return [(t, TaskEnvelope.from_json(t.http_request.body)) for t in emulator.list_tasks(path)]


def args_of(envelope: TaskEnvelope) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope.message["body"]))
    return list(args)


def test_delay_lands_as_a_named_http_task(setup: tuple[Celery, Emulator, str]) -> None:
    app, emulator, prefix = setup
    result = app.tasks["shop.add"].delay(2, 3)
    [(task, envelope)] = held(emulator, prefix + "celery")
    assert task.name == (
        f"projects/{PROJECT}/locations/{LOCATION}/queues/{prefix}celery/tasks/"
        + task_id_for(f"{result.id}/{result.id}/0")
    )
    assert task.http_request.url == PUSH
    assert task.http_request.headers["Content-Type"] == "application/json"
    assert envelope.task_id == result.id and envelope.task_name == "shop.add"
    assert args_of(envelope) == [2, 3]


def test_countdown_sets_schedule_time(setup: tuple[Celery, Emulator, str]) -> None:
    app, emulator, prefix = setup
    before = datetime.now(timezone.utc)
    app.tasks["shop.add"].apply_async((1, 1), countdown=600)
    [(task, _)] = held(emulator, prefix + "celery")
    scheduled = task.schedule_time
    assert before + timedelta(seconds=598) < scheduled < before + timedelta(seconds=603)


def test_send_task_chain_group_and_chord_members(setup: tuple[Celery, Emulator, str]) -> None:
    app, emulator, prefix = setup
    add, tsum = app.tasks["shop.add"], app.tasks["shop.tsum"]
    sent = app.send_task("shop.add", (7, 8))
    first = chain(add.s(1, 2), add.s(3)).apply_async().parent
    grouped = group(add.s(i, 0) for i in range(4)).apply_async()
    chorded = chord((add.s(i, 1) for i in range(3)), tsum.s()).apply_async()
    envelopes = {e.task_id: e for _, e in held(emulator, prefix + "celery")}
    expected = {sent.id, first.id, *(r.id for r in grouped.results)}
    assert expected <= set(envelopes)
    assert len(envelopes) == 1 + 1 + 4 + 3
    chord_members = [e for e in envelopes.values() if e.task_id not in expected]
    assert sorted(args_of(e)[0] for e in chord_members) == [0, 1, 2]
    assert len({e.message["headers"]["group"] for e in chord_members}) == 1
    assert chord_members[0].message["headers"]["group"] is not None
    embed = json.loads(base64.b64decode(chord_members[0].message["body"]))[2]
    assert embed["chord"]["options"]["task_id"] == chorded.id
    assert args_of(envelopes[sent.id]) == [7, 8]


def test_tenant_routing_lands_in_tenant_queues(setup: tuple[Celery, Emulator, str]) -> None:
    app, emulator, prefix = setup
    app.conf.task_routes = (TenantRouter(),)
    add = app.tasks["shop.add"]
    add.apply_async((1, 1), headers={"tenant": "acme"})
    add.apply_async((2, 2), headers={"tenant": "globex"})
    add.apply_async((3, 3), kwargs={}, headers={"tenant": "globex"})
    assert [args_of(e) for _, e in held(emulator, prefix + "tenant-acme")] == [[1, 1]]
    assert sorted(args_of(e) for _, e in held(emulator, prefix + "tenant-globex")) == [
        [2, 2],
        [3, 3],
    ]
    assert held(emulator, prefix + "celery") == []


def test_queue_depth_through_kombu(setup: tuple[Celery, Emulator, str]) -> None:
    app, _emulator, _prefix = setup
    for i in range(3):
        app.tasks["shop.add"].delay(i, i)
    with app.connection_for_write() as conn:
        assert conn.default_channel.queue_declare("celery", passive=True).message_count == 3
