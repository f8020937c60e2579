"""Tasks/s from apply_async to stored SUCCESS, next to the emulator's ceiling with a bare handler.

One run: publish ``--tasks`` ``bench.add`` tasks with ``apply_async`` inside
``dispatch_batch``, spread over ``--queues`` fresh Cloud Tasks queues of the
gcloud-tasks-emulator (it delivers each queue from one thread, one request at
a time, as fast as it can); the clock stops when the last result is stored.

* ``celery-cloudtasks, SQLite``: deliveries go to the push endpoint served by
  gunicorn, results are stored by Celery's database backend in SQLite (WAL, on
  /dev/shm when it exists); done when every task id has a SUCCESS row. Celery's
  database backend costs about 3 ms of CPU per stored result here (SQLAlchemy
  compiles its statements each time), so this row mostly measures it.
* ``celery-cloudtasks, file://``: the same endpoint with Celery's filesystem
  result backend (one file per result, same directory); done when every task
  has its result file, each checked to say SUCCESS at the end.
* ``bare handler``: the same publishing, the same emulator and server setup,
  but deliveries go to a bare Flask route that decodes the body and calls the
  function (no Celery execution, nothing stored); done when it has answered
  every delivery. This is the emulator's own ceiling in this run.

Contenders alternate over ``--rounds`` rounds; prints median tasks/s and the
ratio (target >= 0.8).

    .venvs/dev/bin/python bench/e2e.py [--tasks 2000] [--rounds 3] [--queues 8]
        [--workers 2] [--threads 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Emulator, median, print_table
from endpoint import Gunicorn, make_celery

PROJECT, LOCATION = "bench", "local"


def sqlite_url(path: Path) -> str:
    """Create the results database in WAL mode (readers never block the endpoint's writes)."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
    return f"db+sqlite:///{path}"


def result_files(directory: Path) -> int:
    return sum(1 for entry in os.scandir(directory) if entry.name.startswith("celery-task-meta-"))


def all_files_succeeded(directory: Path) -> bool:
    for entry in os.scandir(directory):
        if json.loads(Path(entry.path).read_bytes())["status"] != "SUCCESS":
            return False
    return True


def count_successes(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            row = db.execute("SELECT COUNT(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            return int(row.fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


def wait_for(done: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queues", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    from celery_cloudtasks import dispatch_batch

    timeout = 120 + args.tasks / 20
    # tmpfs: the disk's fsync latency is not what this benchmark is about.
    shm = Path("/dev/shm")  # noqa: S108
    scratch = str(shm) if shm.is_dir() else None
    with (
        tempfile.TemporaryDirectory(prefix="bench-e2e-", dir=scratch) as tmp,
        Emulator(quiet=True) as emu,
    ):
        db_path = Path(tmp) / "results.sqlite"
        files_dir = Path(tmp) / "results"
        files_dir.mkdir()
        count_path = Path(tmp) / "bare.count"
        count_path.touch()
        lifetime = 300 + args.rounds * 3 * timeout
        backends = {"celery-cloudtasks, SQLite": sqlite_url(db_path)}
        backends["celery-cloudtasks, file://"] = f"file://{files_dir}"
        servers = {
            name: Gunicorn(
                {
                    "BENCH_KIND": "endpoint",
                    "BENCH_RESULTS": url,
                    "BENCH_IGNORE_RESULT": "0",
                    "BENCH_EMULATOR": emu.host,
                },
                workers=args.workers,
                threads=args.threads,
                max_lifetime_seconds=lifetime,
            )
            for name, url in backends.items()
        }
        servers["bare handler"] = Gunicorn(
            {"BENCH_KIND": "bare", "BENCH_COUNT_FILE": str(count_path)},
            workers=args.workers,
            threads=args.threads,
            max_lifetime_seconds=lifetime,
        )
        done_checks: dict[str, Callable[[int], bool]] = {
            "celery-cloudtasks, SQLite": lambda target: count_successes(db_path) >= target,
            "celery-cloudtasks, file://": lambda target: result_files(files_dir) >= target,
            "bare handler": lambda target: count_path.stat().st_size >= target,
        }
        with contextlib.ExitStack() as stack:
            for server in servers.values():
                stack.enter_context(server)
            producers = {
                name: make_celery(
                    results=backends.get(name, "cache+memory://"),
                    ignore_result=name == "bare handler",
                    emulator_host=emu.host,
                    push_url=server.url,
                )
                for name, server in servers.items()
            }
            completed = dict.fromkeys(servers, 0)

            def run(name: str, tasks: int) -> float:
                producer: Any = producers[name]
                queues = []
                for _ in range(args.queues):
                    queue_id = f"e-{uuid.uuid4().hex[:10]}"
                    emu.create_queue(PROJECT, LOCATION, queue_id)
                    queues.append(queue_id)
                add = producer.tasks["bench.add"]
                target = completed[name] + tasks
                started = time.perf_counter()
                with dispatch_batch(max_in_flight=32):
                    for i in range(tasks):
                        add.apply_async((i, 1), queue=queues[i % len(queues)])
                wait_for(lambda: done_checks[name](target), timeout, f"{name} results")
                seconds = time.perf_counter() - started
                completed[name] = target
                return tasks / seconds

            for name in servers:  # warm-up: workers import, tracers, connections
                run(name, min(200, args.tasks))
            rates: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name in servers:
                    rates[name].append(run(name, args.tasks))
            if count_successes(db_path) != completed["celery-cloudtasks, SQLite"]:
                raise SystemExit("SQLite: SUCCESS rows do not match the tasks published")
            if result_files(files_dir) != completed["celery-cloudtasks, file://"]:
                raise SystemExit("file://: result files do not match the tasks published")
            if not all_files_succeeded(files_dir):
                raise SystemExit("file://: a stored result is not SUCCESS")

    ceiling = median(rates["bare handler"])
    rows = []
    for name, values in rates.items():
        value = median(values)
        note = "apply_async -> emulator -> bare route (the ceiling)"
        if name != "bare handler":
            note = f"{value / ceiling:.2f} of the ceiling (target >= 0.8)"
        rows.append((name, f"{value:,.0f}/s", note))
    print_table(
        f"e2e: {args.tasks} tasks x {args.rounds} rounds, {args.queues} queues, gunicorn "
        f"{args.workers}x{args.threads} gthread; median tasks/s",
        rows,
    )


if __name__ == "__main__":
    main()
