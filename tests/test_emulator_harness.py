"""The emulator harness itself: queues, tasks, HTTP delivery, fault injection, cleanup."""

from __future__ import annotations

import http.server
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from emulator import Emulator, EmulatorError
from google.api_core import exceptions as gexc
from google.cloud import tasks_v2

pytestmark = pytest.mark.emulator

PROJECT = "harness-project"
LOCATION = "europe-west1"


@dataclass(frozen=True)
class Delivery:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names: the emulator sends "X-cloudtasks-..."
    body: bytes


class PushTarget:
    """A loopback HTTP server that records every request and answers with ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                recorder.deliveries.put(
                    Delivery(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=self.rfile.read(length),
                    )
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def next_delivery(self, timeout: float = 10.0) -> Delivery:
        return self.deliveries.get(timeout=timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def push_target() -> Iterator[PushTarget]:
    target = PushTarget()
    yield target
    target.close()


def http_task(
    queue_path: str, task_id: str, url: str, body: bytes, **fields: object
) -> tasks_v2.Task:
    return tasks_v2.Task(
        # Always a full path: a bare task ID silently stops the emulator's queue.
        name=f"{queue_path}/tasks/{task_id}",
        http_request=tasks_v2.HttpRequest(
            url=url,
            http_method=tasks_v2.HttpMethod.POST,
            headers={"Content-Type": "application/json"},
            body=body,
        ),
        **fields,
    )


def test_created_task_is_listed_back(emulator: Emulator, fresh_queue_id: str) -> None:
    queue_path = emulator.create_queue(PROJECT, LOCATION, fresh_queue_id, paused=True)
    eta = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
    task = http_task(
        queue_path, "abc-1", "http://127.0.0.1:9/never", b'{"x": 1}', schedule_time=eta
    )

    emulator.client().create_task(parent=queue_path, task=task, timeout=10.0)

    [listed] = emulator.list_tasks(queue_path)
    assert listed.name == f"{queue_path}/tasks/abc-1"
    assert listed.http_request.url == "http://127.0.0.1:9/never"
    assert listed.http_request.body == b'{"x": 1}'
    assert listed.schedule_time == eta


def test_task_is_delivered_as_http_post(
    emulator: Emulator, fresh_queue_id: str, push_target: PushTarget
) -> None:
    queue_path = emulator.create_queue(PROJECT, LOCATION, fresh_queue_id)
    task = http_task(queue_path, "deliver-me", f"{push_target.url}/push?x=1", b'{"hello": "world"}')

    emulator.client().create_task(parent=queue_path, task=task, timeout=10.0)
    delivery = push_target.next_delivery()

    assert delivery.method == "POST"
    assert delivery.path == "/push?x=1"
    assert delivery.body == b'{"hello": "world"}'
    assert delivery.headers["content-type"] == "application/json"
    # Cloud Tasks sends the short queue ID; the emulator sends the full queue path.
    assert delivery.headers["x-cloudtasks-queuename"].rsplit("/", 1)[-1] == fresh_queue_id
    assert delivery.headers["x-cloudtasks-taskname"] == "deliver-me"
    assert delivery.headers["x-cloudtasks-taskretrycount"] == "0"
    assert emulator.list_tasks(queue_path) == []  # a 2xx answer completes the task


def test_max_retries_bounds_redelivery(fresh_queue_id: str) -> None:
    target = PushTarget(status=503)
    try:
        with Emulator(max_retries=2) as emu:
            queue_path = emu.create_queue(PROJECT, LOCATION, fresh_queue_id)
            task = http_task(queue_path, "always-fails", f"{target.url}/push", b"{}")
            emu.client().create_task(parent=queue_path, task=task, timeout=10.0)

            retry_counts = [
                target.next_delivery().headers["x-cloudtasks-taskretrycount"] for _ in range(3)
            ]
            time.sleep(0.5)  # the emulator retries every 0.1 s: a 4th attempt would show

            assert retry_counts == ["0", "1", "2"]
            assert target.deliveries.empty()
            assert emu.list_tasks(queue_path) == []
    finally:
        target.close()


def test_pause_freezes_the_process_and_stop_kills_it() -> None:
    emu = Emulator(quiet=True).start()
    try:
        assert emu.start_seconds is not None
        assert emu.start_seconds < 20
        parent = f"projects/{PROJECT}/locations/{LOCATION}"
        client = emu.client()

        emu.pause()
        with pytest.raises(gexc.DeadlineExceeded):
            client.list_queues(parent=parent, retry=None, timeout=0.5)
        emu.resume()
        assert list(client.list_queues(parent=parent, retry=None, timeout=5.0)) == []

        pid = emu.pid
        emu.pause()  # stop() must also end a frozen process
    finally:
        emu.stop()

    assert not emu.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_binary_fails_with_setup_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_CLOUDTASKS_EMULATOR_BIN", "/nonexistent/gcloud-tasks-emulator")

    with pytest.raises(EmulatorError, match="run scripts/setup"):
        Emulator().start()


def test_port_in_use_fails_with_log_tail() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(EmulatorError, match=f"could not bind port {port}"):
            Emulator(port=port, start_timeout_seconds=10).start()


def test_binary_that_exits_fails_with_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "gcloud-tasks-emulator"
    fake.write_text("#!/bin/sh\necho 'no such emulator today' >&2\nexit 3\n")
    fake.chmod(0o755)

    with pytest.raises(EmulatorError, match=r"status 3(.|\n)*no such emulator today"):
        Emulator(binary=str(fake)).start()
