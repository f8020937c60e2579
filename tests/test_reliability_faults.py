"""Faults: a frozen Cloud Tasks, and an endpoint process killed mid-execution.

* The emulator is frozen with SIGSTOP while tasks are being published:
  ``apply_async`` (one by one, or in ``dispatch_batch``) either succeeds once it
  thaws within the retry budget, or raises a clear error after a bounded time.
  It never hangs, and never reports success for a task that Cloud Tasks does
  not hold (checked by listing the queue). A publish that failed may still
  have been created (its request reached the service before the answer was
  lost): that is what idempotent names are for.
* The push endpoint runs under gunicorn; the worker process executing a task
  is killed with SIGKILL: Cloud Tasks redelivers, the respawned worker runs the
  task to SUCCESS in the (SQLite) result backend.

These tests use their own emulator (freezing the session's one would stall
other tests) and wait with bounded polling loops; no timing is asserted
beyond "returned at all within a generous bound".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from emulator import Emulator, find_free_port

from celery_cloudtasks import (
    BatchEnqueueError,
    TransientEnqueueError,
    dispatch_batch,
    idempotency_key,
    task_id_for,
)

pytestmark = pytest.mark.emulator

PROJECT, LOCATION = "faults", "local"
BROKER = f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}"
PER_CALL_TIMEOUT_SECONDS = 1.0
#: Never-hangs bound: far above budget + per-call timeout, far below pytest's timeout.
HANG_SECONDS = 60.0


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    # Failed deliveries are retried every 0.1 s; bound them (about a minute of retrying).
    with Emulator(max_retries=600, quiet=True) as emulator:
        yield emulator


@pytest.fixture
def frozen_safely(emu: Emulator) -> Iterator[Emulator]:
    """The emulator, guaranteed to be thawed after the test whatever happens."""
    try:
        yield emu
    finally:
        if emu.running:
            emu.resume()


def publishing_app(emu: Emulator, *, budget_seconds: float) -> Celery:
    app = Celery("faults", set_as_current=False, broker=BROKER)
    app.conf.broker_transport_options = {
        "push_url": "http://127.0.0.1:9/_cloudtasks",
        "emulator_host": emu.host,
        "apply_queue_retry_config": False,
        "create_timeout_seconds": PER_CALL_TIMEOUT_SECONDS,
        "create_retry_deadline_seconds": budget_seconds,
    }
    app.conf.result_backend = "cache+memory://"
    app.conf.task_ignore_result = True

    @app.task(name="faults.noop", shared=False)
    def noop(i: int) -> int:
        return i

    return app


def fresh_paused_queue(emu: Emulator) -> tuple[str, str]:
    queue_id = f"f-{uuid.uuid4().hex[:10]}"
    return queue_id, emu.create_queue(PROJECT, LOCATION, queue_id, paused=True)


def cloud_name(path: str, task_id: str) -> str:
    return f"{path}/tasks/{task_id_for(idempotency_key(task_id, task_id, 0))}"


def held_names(emu: Emulator, path: str) -> list[str]:
    return [task.name for task in emu.list_tasks(path)]


def run_bounded(target: Callable[[], None]) -> None:
    """Run ``target`` in a thread; fail the test if it is still running after HANG_SECONDS."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert not thread.is_alive(), f"publishing still blocked after {HANG_SECONDS:.0f} s"
    if errors:
        raise errors[0]


def wait_until(condition: Callable[[], bool], *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- the emulator frozen while publishing ----------------------------------------------


def test_freeze_shorter_than_the_budget_every_publish_succeeds_after_thaw(
    frozen_safely: Emulator,
) -> None:
    emu = frozen_safely
    app = publishing_app(emu, budget_seconds=20.0)
    queue_id, path = fresh_paused_queue(emu)
    ids = [f"thaw-{i:03d}" for i in range(200)]
    succeeded: list[str] = []

    def publish() -> None:
        for n, task_id in enumerate(ids):
            app.tasks["faults.noop"].apply_async((n,), task_id=task_id, queue=queue_id)
            succeeded.append(task_id)

    def freeze_midway() -> None:
        wait_until(lambda: len(succeeded) >= 50, seconds=30, what="50 publishes")
        emu.pause()
        time.sleep(3 * PER_CALL_TIMEOUT_SECONDS)  # several per-call timeouts pass while frozen
        emu.resume()

    freezer = threading.Thread(target=freeze_midway, daemon=True)
    freezer.start()
    run_bounded(publish)
    freezer.join(HANG_SECONDS)
    assert not freezer.is_alive()
    assert succeeded == ids
    # Every reported success is held by Cloud Tasks. (The emulator does not deduplicate,
    # so a create retried after a lost answer may be held twice under the same name;
    # Cloud Tasks would answer AlreadyExists.)
    assert set(held_names(emu, path)) == {cloud_name(path, i) for i in ids}


def test_freeze_longer_than_the_budget_raises_a_clear_error_then_recovers(
    frozen_safely: Emulator,
) -> None:
    emu = frozen_safely
    app = publishing_app(emu, budget_seconds=2.0)
    queue_id, path = fresh_paused_queue(emu)
    noop = app.tasks["faults.noop"]
    noop.apply_async((0,), task_id="before", queue=queue_id)
    raised: list[BaseException] = []

    def publish_while_frozen() -> None:
        try:
            noop.apply_async((1,), task_id="frozen", queue=queue_id)
        except TransientEnqueueError as exc:
            raised.append(exc)

    emu.pause()
    try:
        run_bounded(publish_while_frozen)
    finally:
        emu.resume()
    assert len(raised) == 1, "apply_async reported success while Cloud Tasks was frozen"
    error = raised[0]
    assert "unavailable" in str(error) and queue_id in str(error)
    assert error.task_name == cloud_name(path, "frozen")
    # Publishing works again once Cloud Tasks answers; re-publishing the failed task is safe.
    noop.apply_async((2,), task_id="after", queue=queue_id)
    noop.apply_async((1,), task_id="frozen", queue=queue_id)
    held = set(held_names(emu, path))
    assert {cloud_name(path, i) for i in ("before", "frozen", "after")} == held


def test_freeze_during_dispatch_batch_reports_exactly_what_exists(
    frozen_safely: Emulator,
) -> None:
    emu = frozen_safely
    app = publishing_app(emu, budget_seconds=2.0)
    queue_id, path = fresh_paused_queue(emu)
    ids = [f"batch-{i:03d}" for i in range(140)]
    outcome: dict[str, Any] = {}

    def publish() -> None:
        try:
            with dispatch_batch(max_in_flight=16) as batch:
                for n, task_id in enumerate(ids):
                    app.tasks["faults.noop"].apply_async((n,), task_id=task_id, queue=queue_id)
                    if n == 99:
                        # Freeze once some have landed: up to 16 RPCs in flight, 40 to go.
                        wait_until(
                            lambda: len(held_names(emu, path)) >= 50, seconds=30, what="50 tasks"
                        )
                        emu.pause()
            outcome["results"] = batch.results
        except BatchEnqueueError as exc:
            outcome["error"] = exc

    try:
        run_bounded(publish)
    finally:
        emu.resume()
    held = set(held_names(emu, path))
    error: BatchEnqueueError | None = outcome.get("error")
    assert error is not None, "the whole batch cannot have succeeded while frozen for good"
    # Reported enqueued => held by Cloud Tasks; every task is reported one way or the other.
    assert set(error.enqueued) <= held
    failed_keys = set(error.failed)
    enqueued = set(error.enqueued)
    assert len(enqueued) + len(failed_keys) == len(ids)
    assert failed_keys == {
        idempotency_key(i, i, 0) for i in ids if cloud_name(path, i) not in enqueued
    }
    assert all(isinstance(e, TransientEnqueueError) for e in error.failed.values())
    # At most 16 RPCs were in flight when 50 had landed: most of those were answered.
    assert len(enqueued) >= 30


# -- the endpoint killed mid-execution ---------------------------------------------------

APP_SOURCE = '''
"""Endpoint app for the kill test (written by test_reliability_faults.py)."""
import os
import pathlib
import time

from celery import Celery

import celery_cloudtasks  # noqa: F401
from celery_cloudtasks.flask import create_app

app = Celery("killed", broker="{broker}", backend=os.environ["RESULTS_URL"])
app.conf.broker_transport_options = {{
    "push_url": os.environ["PUSH_URL"],
    "emulator_host": os.environ["EMULATOR_HOST"],
    "apply_queue_retry_config": False,
}}


@app.task(name="killed.slow", bind=True)
def slow(self, marker):
    path = pathlib.Path(marker)
    with path.open("a") as log:
        log.write(f"{{os.getpid()}} {{self.request.cloudtasks['retry_count']}}\\n")
    if len(path.read_text().splitlines()) == 1:
        time.sleep(60)  # the first attempt is killed here
    return "completed"


wsgi = create_app(app, CLOUDTASKS_VERIFY_OIDC=False)
'''


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def gunicorn_endpoint(tmp_path: Path, emu: Emulator) -> Iterator[tuple[str, str]]:
    """Serve the kill-test app with gunicorn on loopback; yields (push URL, results URL)."""
    port = find_free_port()
    push_url = f"http://127.0.0.1:{port}/_cloudtasks"
    results_url = f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    (tmp_path / "killed_app.py").write_text(textwrap.dedent(APP_SOURCE.format(broker=BROKER)))
    env = {
        **os.environ,
        "RESULTS_URL": results_url,
        "PUSH_URL": push_url,
        "EMULATOR_HOST": emu.host,
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "2",
            "--timeout",
            "120",
            "--chdir",
            str(tmp_path),
            "killed_app:wsgi",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _listening(port), seconds=60, what="gunicorn to listen")
        yield push_url, results_url
    finally:
        if process.poll() is None:
            process.terminate()  # the master stops its worker
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group we started
                process.wait(timeout=5)
        log.close()


def test_endpoint_killed_mid_execution_the_task_is_redelivered_and_completes(
    emu: Emulator, gunicorn_endpoint: tuple[str, str], tmp_path: Path
) -> None:
    push_url, results_url = gunicorn_endpoint
    queue_id = f"k-{uuid.uuid4().hex[:10]}"
    emu.create_queue(PROJECT, LOCATION, queue_id)
    app = Celery("killer", set_as_current=False, broker=BROKER, backend=results_url)
    app.conf.broker_transport_options = {
        "push_url": push_url,
        "emulator_host": emu.host,
        "apply_queue_retry_config": False,
    }
    marker = tmp_path / "attempts.log"
    result = app.send_task("killed.slow", args=(str(marker),), queue=queue_id)

    def attempts() -> list[tuple[int, int]]:
        if not marker.exists():
            return []
        lines = [line.split() for line in marker.read_text().splitlines() if line.strip()]
        return [(int(pid), int(retry)) for pid, retry in lines]

    wait_until(lambda: len(attempts()) >= 1, seconds=60, what="the first attempt to start")
    first_pid, first_retry = attempts()[0]
    os.kill(first_pid, signal.SIGKILL)  # the gunicorn worker we started, mid-task

    wait_until(lambda: result.state == "SUCCESS", seconds=90, what="SUCCESS after redelivery")
    assert result.get(timeout=5) == "completed"
    runs = attempts()
    assert len(runs) == 2, runs
    (_, _), (second_pid, second_retry) = runs
    # Another process ran it, on a later delivery (the emulator's retry count counts every
    # failed dispatch, including connection errors while the worker was respawned).
    assert second_pid != first_pid and second_retry > first_retry
    # Delivered, answered 2xx: Cloud Tasks no longer holds it.
    path = f"projects/{PROJECT}/locations/{LOCATION}/queues/{queue_id}"
    wait_until(lambda: emu.list_tasks(path) == [], seconds=30, what="the queue to drain")
    app.close()
