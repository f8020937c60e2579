"""End to end over real HTTP: the Cloud Tasks emulator delivers to the push endpoint.

The endpoint is served on 127.0.0.1 by a werkzeug server thread; producer and
endpoint share a real result backend (Celery's database backend on SQLite).
The emulator does not apply queue retry configs (it retries every 0.1 s), so
the endpoint's own final-attempt rule (3 attempts, no duration) decides when a
failing task is dead-lettered.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, states
from emulator import Emulator
from werkzeug.serving import make_server

from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.flask import create_app

PROJECT, LOCATION = "e2e-project", "us-central1"
RETRY = {"max_attempts": 3, "min_backoff": 1, "max_backoff": 1, "max_retry_duration": 0}

pytestmark = pytest.mark.emulator


class Served:
    """A WSGI app on 127.0.0.1 in a thread (stopped by :meth:`close`)."""

    def __init__(self, wsgi: Any, port: int) -> None:
        self.server = make_server("127.0.0.1", port, wsgi, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class E2E:
    def __init__(self, app: Celery, emulator: Emulator, dead_letter_path: str) -> None:
        self.app, self.emulator, self.dead_letter_path = app, emulator, dead_letter_path
        self.calls: dict[str, int] = {}

    def dead_letters(self) -> list[TaskEnvelope]:
        tasks = self.emulator.list_tasks(self.dead_letter_path)
        return [TaskEnvelope.from_json(t.http_request.body) for t in tasks]

    def wait_dead_letters(self, count: int, timeout: float = 20.0) -> list[TaskEnvelope]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.dead_letters()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"expected {count} dead letters, found {self.dead_letters()}")


@pytest.fixture
def e2e(emulator: Emulator, free_port: int, tmp_path: Path) -> Iterator[E2E]:
    queue_id, dead_id = f"e2e-{uuid.uuid4().hex[:10]}", f"dl-{uuid.uuid4().hex[:10]}"
    emulator.create_queue(PROJECT, LOCATION, queue_id)
    dead_path = emulator.create_queue(PROJECT, LOCATION, dead_id, paused=True)
    app = Celery(
        "e2e",
        set_as_current=False,
        broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
        backend=f"db+sqlite:///{tmp_path / 'results.sqlite'}",
        broker_transport_options={
            "emulator_host": emulator.host,
            "push_url": f"http://127.0.0.1:{free_port}/_cloudtasks",
            "queue_map": {"celery": queue_id},
            "dead_letter_queue": dead_id,
            "retry": RETRY,
            "apply_queue_retry_config": False,
        },
        result_extended=True,
    )
    env = E2E(app, emulator, dead_path)
    _define_tasks(app, env.calls)
    served = Served(create_app(app, CLOUDTASKS_VERIFY_OIDC=False), free_port)
    try:
        yield env
    finally:
        served.close()
        app.close()


def _define_tasks(app: Celery, calls: dict[str, int]) -> None:
    def count(key: str) -> int:
        calls[key] = calls.get(key, 0) + 1
        return calls[key]

    @app.task(shared=False, name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="until_third", bind=True, max_retries=5)
    def until_third(self: Any) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0.2)
        return self.request.retries

    @app.task(shared=False, name="fails_once")
    def fails_once(key: str) -> str:
        if count(key) == 1:
            raise ConnectionError("first delivery fails")
        return "recovered"

    @app.task(shared=False, name="always_fails")
    def always_fails() -> None:
        raise RuntimeError("broken for good")


def test_delay_get(e2e: E2E) -> None:
    assert e2e.app.tasks["add"].delay(2, 3).get(timeout=20) == 5


def test_countdown(e2e: E2E) -> None:
    started = time.monotonic()
    result = e2e.app.tasks["add"].apply_async((1, 1), countdown=2)
    assert result.get(timeout=20) == 2
    assert time.monotonic() - started >= 1.5


def test_chain_group_chord(e2e: E2E) -> None:
    add, tsum = e2e.app.tasks["add"], e2e.app.tasks["tsum"]
    c = chain(add.s(1, 2), add.s(3), add.s(4)).delay()
    g = group(add.s(i, i) for i in range(5)).delay()
    ch = chord((add.s(i, 10) for i in range(3)), tsum.s()).delay()  # celery.chord_unlock polls
    assert c.get(timeout=30) == 10
    assert g.get(timeout=30) == [0, 2, 4, 6, 8]
    assert ch.get(timeout=30) == 33


def test_self_retry_until_success(e2e: E2E) -> None:
    assert e2e.app.tasks["until_third"].delay().get(timeout=30) == 2


def test_failure_then_success_on_redelivery(e2e: E2E) -> None:
    result = e2e.app.tasks["fails_once"].delay("redelivery")
    assert result.get(timeout=20) == "recovered"
    assert e2e.calls["redelivery"] == 2


def test_final_failure_is_dead_lettered(e2e: E2E) -> None:
    result = e2e.app.tasks["always_fails"].delay()
    [dead] = e2e.wait_dead_letters(1)
    assert dead.task_id == result.id
    assert dead.dead_letter is not None and dead.dead_letter["attempts"] == 3
    assert dead.dead_letter["exception_type"] == "RuntimeError"
    assert result.state == states.FAILURE


def test_expired_task_is_revoked(e2e: E2E) -> None:
    result = e2e.app.tasks["add"].apply_async((1, 1), countdown=1.5, expires=0.5)
    with pytest.raises(Exception) as raised:
        result.get(timeout=20)
    assert result.state == states.REVOKED, raised.value


def test_unknown_task_is_dead_lettered(e2e: E2E) -> None:
    result = e2e.app.send_task("not.deployed.yet", args=(1,))
    [dead] = e2e.wait_dead_letters(1)
    assert dead.task_id == result.id
    assert "unknown_task" in dead.dead_letter["reason"]
    assert result.state == states.PENDING
