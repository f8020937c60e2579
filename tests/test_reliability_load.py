"""Load: thousands of tasks through the emulator and the served endpoint, nothing lost.

Every task is published with ``apply_async`` inside ``dispatch_batch``, spread
over ten Cloud Tasks queues of the gcloud-tasks-emulator, delivered over real
HTTP to the push endpoint (a threaded werkzeug server on 127.0.0.1), and its
result stored in SQLite by Celery's database backend. One task in five fails
its first delivery with a transient error (stored as RETRY, answered 500, so
the emulator redelivers). Then:

* every task ends SUCCESS in the result backend, with its own return value;
* each was successful exactly once (one ``task_success`` per task id);
* none ran again after its success: the body ran once, or twice (fail, then
  succeed) for the failing fifth, and Cloud Tasks holds nothing any more.

Runs the issue's 5,000 tasks by default (about 45 s on a 2-core machine);
``CELERY_CLOUDTASKS_LOAD_TASKS=1000`` gives a quicker run, larger counts a longer one.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from emulator import Emulator, find_free_port
from werkzeug.serving import make_server

from celery_cloudtasks import dispatch_batch
from celery_cloudtasks.flask import create_app

pytestmark = pytest.mark.emulator

TASKS = int(os.environ.get("CELERY_CLOUDTASKS_LOAD_TASKS", "5000"))
QUEUES = 10
FAIL_EVERY = 5  # one task in five fails its first delivery
PROJECT, LOCATION = "load", "local"


class Recorder:
    """What the endpoint did, seen from inside: every body run and every task_success."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, list[int]] = defaultdict(list)  # task id -> retry counts
        self.successes: Counter[str] = Counter()

    def ran(self, task_id: str, retry_count: int) -> None:
        with self.lock:
            self.runs[task_id].append(retry_count)

    def succeeded(self, sender: Any = None, **_: Any) -> None:
        task_id = getattr(getattr(sender, "request", None), "id", None)
        if task_id is not None:
            with self.lock:
                self.successes[task_id] += 1


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    # Its own emulator: ten busy queues would slow the session's one for other tests.
    with Emulator(max_retries=50, quiet=True) as emulator:
        yield emulator


@pytest.fixture
def loaded_app(emu: Emulator, tmp_path: Path) -> Iterator[tuple[Celery, Recorder, list[str], Path]]:
    port = find_free_port()
    db_path = tmp_path / "results.sqlite"
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # readers do not block the endpoint's writes
    queue_ids = [f"l-{uuid.uuid4().hex[:10]}" for _ in range(QUEUES)]
    queue_paths = [emu.create_queue(PROJECT, LOCATION, q) for q in queue_ids]
    app = Celery(
        "load",
        set_as_current=False,
        broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
        backend=f"db+sqlite:///{db_path}",
    )
    app.conf.broker_transport_options = {
        "emulator_host": emu.host,
        "push_url": f"http://127.0.0.1:{port}/_cloudtasks",
        "apply_queue_retry_config": False,
    }
    app.conf.database_engine_options = {"connect_args": {"timeout": 60}}
    recorder = Recorder()

    @app.task(name="load.work", bind=True, shared=False)
    def work(self: Any, i: int) -> int:
        retry_count = self.request.cloudtasks["retry_count"]
        recorder.ran(self.request.id, retry_count)
        if i % FAIL_EVERY == 0 and retry_count == 0:
            raise ConnectionError(f"transient failure of task {i}")
        return i * 2

    signals.task_success.connect(recorder.succeeded, weak=False)
    server = make_server("127.0.0.1", port, create_app(app, CLOUDTASKS_VERIFY_OIDC=False))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, recorder, queue_paths, db_path
    finally:
        signals.task_success.disconnect(recorder.succeeded)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        app.close()


def stored(db_path: Path) -> dict[str, str]:
    """task id -> status, read straight from the result backend's table."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as db:
            return dict(db.execute("SELECT task_id, status FROM celery_taskmeta").fetchall())
    except sqlite3.OperationalError:  # the table is created by the first stored result
        return {}


def wait_until(condition: Callable[[], bool], *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(max(300, TASKS // 10))
def test_every_task_succeeds_exactly_once_with_transient_failures(
    emu: Emulator, loaded_app: tuple[Celery, Recorder, list[str], Path]
) -> None:
    app, recorder, queue_paths, db_path = loaded_app
    work = app.tasks["load.work"]
    queue_ids = [path.rsplit("/", 1)[1] for path in queue_paths]
    with dispatch_batch(max_in_flight=32) as batch:
        celery_ids = [work.apply_async((i,), queue=queue_ids[i % QUEUES]).id for i in range(TASKS)]
    assert len(batch.results) == TASKS and not any(r.deduplicated for r in batch.results)
    assert len({r.task_name for r in batch.results}) == TASKS

    def all_succeeded() -> bool:
        statuses = stored(db_path)
        return len(statuses) == TASKS and set(statuses.values()) == {"SUCCESS"}

    wait_until(all_succeeded, seconds=60 + TASKS / 10, what=f"{TASKS} SUCCESS results")
    # Delivered and answered 2xx: Cloud Tasks holds nothing; give it time to misbehave.
    wait_until(
        lambda: all(emu.list_tasks(path) == [] for path in queue_paths),
        seconds=60,
        what="the queues to drain",
    )
    time.sleep(1.0)  # ten emulator polling periods: any stray redelivery would show up

    statuses = stored(db_path)
    assert len(statuses) == TASKS and Counter(statuses.values()) == {"SUCCESS": TASKS}
    with recorder.lock:
        runs = dict(recorder.runs)
        successes = Counter(recorder.successes)
    assert set(runs) == set(statuses) == set(celery_ids), "a task lost, or one never published"
    assert set(successes.values()) == {1} and len(successes) == TASKS
    # Bodies: once for four in five, fail-then-succeed for the rest; nothing after success.
    by_count = Counter(len(r) for r in runs.values())
    assert by_count == {1: TASKS - TASKS // FAIL_EVERY, 2: TASKS // FAIL_EVERY}
    for task_id, retry_counts in runs.items():
        assert retry_counts[0] == 0 and retry_counts == sorted(set(retry_counts)), task_id
    # Values: a sample read back through Celery's result API, each task its own.
    for i in range(0, TASKS, max(1, TASKS // 100)):
        assert app.AsyncResult(celery_ids[i]).get(timeout=10) == i * 2
