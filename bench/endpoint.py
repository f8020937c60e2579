"""Deliveries/s through the push endpoint vs a bare Flask route calling the same function.

Both answer the same prepared Cloud Tasks deliveries (the JSON envelope as
body, the ``X-CloudTasks-*`` headers), OIDC off:

* ``push endpoint``: :func:`celery_cloudtasks.flask.create_app`: envelope
  parsing, safe decoding, a Celery worker ``Request``, the tracer, signals,
  state bookkeeping; the task ignores its result (same work as the bare route);
* ``push endpoint + result``: the same, storing the result in
  ``cache+memory://``;
* ``bare route``: a hand-written Flask view that parses the envelope, decodes
  the JSON body and calls the task's function (``task.run``).

Measured in-process with Flask's test client (no sockets: the framework cost
only), then served by gunicorn (``gthread`` workers) over loopback HTTP with
keep-alive client connections. Target: endpoint / bare >= 0.5.

    .venvs/dev/bin/python bench/endpoint.py [--deliveries 2000] [--rounds 5]
        [--http-deliveries 2000] [--workers 2] [--threads 4] [--clients 4]

This module is also the served app of bench/e2e.py and bench/memory.py:
``gunicorn --chdir bench 'endpoint:wsgi_from_env()'`` with ``BENCH_KIND``
(``endpoint`` or ``bare``), ``BENCH_RESULTS`` (result backend URL),
``BENCH_EMULATOR`` (emulator host for links), ``BENCH_IGNORE_RESULT`` and
``BENCH_COUNT_FILE`` (bare route: one byte appended per delivery).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BROKER = "cloudtasks://projects/bench/locations/local"
PATH = "/_cloudtasks"


# -- the apps (imported by gunicorn workers: keep this part free of benchmark machinery) --


def make_celery(
    *,
    results: str = "cache+memory://",
    ignore_result: bool = True,
    emulator_host: str | None = None,
    push_url: str = "http://127.0.0.1:9/_cloudtasks",
    queue_factory: Any = None,
) -> Any:
    """The Celery app both sides use; ``bench.add`` is the measured task."""
    from celery import Celery

    import celery_cloudtasks  # noqa: F401  (registers the transport)

    app = Celery("bench", broker=BROKER, backend=results, set_as_current=False)
    options: dict[str, Any] = {"push_url": push_url, "apply_queue_retry_config": False}
    if emulator_host:
        options["emulator_host"] = emulator_host
    if queue_factory is not None:
        options["queue_factory"] = queue_factory
    app.conf.broker_transport_options = options
    app.conf.task_ignore_result = ignore_result
    if results.startswith("db+sqlite"):
        app.conf.database_engine_options = {"connect_args": {"timeout": 30}}

    @app.task(name="bench.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="bench.fail", shared=False)
    def fail(i: int) -> None:
        raise ValueError(f"transient failure {i}")

    return app


def bare_app(celery_app: Any, count_file: str | None = None) -> Any:
    """A hand-written push route calling the task's function: the lower bound of any endpoint.

    With ``count_file``, each answered delivery appends one byte to it (``O_APPEND``:
    atomic across worker processes), so a benchmark can count deliveries by its size.
    """
    from flask import Flask, jsonify, request

    app = Flask("bare")
    function = celery_app.tasks["bench.add"].run
    counter = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if count_file else None

    @app.post(PATH)
    def push() -> Any:
        envelope = json.loads(request.get_data())
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["message"]["body"]))
        result = function(*args, **kwargs)
        if counter is not None:
            os.write(counter, b".")
        return jsonify(outcome="succeeded", result=result)

    return app


def endpoint_app(celery_app: Any) -> Any:
    from celery_cloudtasks.flask import create_app

    logging_off()
    return create_app(celery_app, CLOUDTASKS_VERIFY_OIDC=False)


def logging_off() -> None:
    """Silence the "OIDC verification is OFF" warning benchmarks would print for every app."""
    import logging

    logging.getLogger("celery_cloudtasks.endpoint").setLevel(logging.ERROR)


def wsgi_from_env() -> Any:
    """Gunicorn factory: ``endpoint:wsgi_from_env()`` (see the module docstring)."""
    celery_app = make_celery(
        results=os.environ.get("BENCH_RESULTS", "cache+memory://"),
        ignore_result=os.environ.get("BENCH_IGNORE_RESULT", "1") == "1",
        emulator_host=os.environ.get("BENCH_EMULATOR") or None,
    )
    if os.environ.get("BENCH_KIND", "endpoint") == "bare":
        return bare_app(celery_app, os.environ.get("BENCH_COUNT_FILE") or None)
    return endpoint_app(celery_app)


# -- serving and delivering over HTTP --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gunicorn:
    """``gunicorn 'endpoint:wsgi_from_env()'`` on 127.0.0.1 (a context manager).

    Stopped by PID (SIGTERM to the master, then SIGKILL to the process group it
    leads, which this object created). ``max_lifetime_seconds`` bounds a forgotten
    server: gunicorn's master is told to exit by a timer thread.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 2,
        threads: int = 4,
        max_lifetime_seconds: float = 900.0,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.workers, self.threads = workers, threads
        self.max_lifetime_seconds = max_lifetime_seconds
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def __enter__(self) -> Gunicorn:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
                "--worker-class",
                "gthread",
                "--keep-alive",
                "30",
                "--timeout",
                "120",
                "--chdir",
                str(BENCH_DIR),
                "--log-level",
                "warning",
                "endpoint:wsgi_from_env()",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        self._timer = threading.Timer(self.max_lifetime_seconds, self.stop)
        self._timer.daemon = True
        self._timer.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/ready-probe")
                connection.getresponse().read()
                connection.close()
                return
            time.sleep(0.1)
        raise RuntimeError("gunicorn did not start in time")

    def worker_pids(self) -> list[int]:
        """PIDs of the master's children (its workers), from /proc."""
        assert self.process is not None
        pid = self.process.pid
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
            return [int(p) for p in text.split()]
        return []

    def stop(self) -> None:
        process, self.process = self.process, None
        if self._timer is not None:
            self._timer.cancel()
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the group this object started
            process.wait(timeout=5)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def post_all(
    port: int, deliveries: Sequence[tuple[bytes, dict[str, str]]], clients: int
) -> tuple[float, dict[int, int]]:
    """POST every delivery over ``clients`` keep-alive connections; (seconds, status counts)."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    chunks = [deliveries[i::clients] for i in range(clients)]

    def client(chunk: Sequence[tuple[bytes, dict[str, str]]]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: dict[int, int] = {}
        for body, headers in chunk:
            connection.request("POST", PATH, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            mine[response.status] = mine.get(response.status, 0) + 1
        connection.close()
        with lock:
            for status, count in mine.items():
                statuses[status] = statuses.get(status, 0) + count

    threads = [threading.Thread(target=client, args=(chunk,)) for chunk in chunks]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return time.perf_counter() - started, statuses


# -- the benchmark ------------------------------------------------------------------------


Deliveries = list[tuple[bytes, dict[str, str]]]


def prepared_deliveries(count: int, *, ignore_result: bool = True) -> Deliveries:
    """``count`` distinct deliveries of ``bench.add``, as Cloud Tasks would make them.

    (Celery writes ``ignore_result`` into each message: the producer decides whether
    the endpoint stores a result.)
    """
    from celery_cloudtasks.memory import InMemoryCloudTasks

    memory = InMemoryCloudTasks()
    producer = make_celery(queue_factory=memory, ignore_result=ignore_result)
    for i in range(count):
        producer.tasks["bench.add"].delay(i, 1)
    queue = memory.queue("celery")
    out = []
    for task in queue.tasks:
        delivery = queue.build_delivery(task)
        out.append((delivery.body, delivery.headers))
    return out


def in_process(
    deliveries: Deliveries, with_results: Deliveries, rounds: int
) -> list[tuple[str, str, str]]:
    from celery_cloudtasks.memory import InMemoryCloudTasks

    memory = InMemoryCloudTasks()
    inputs = {"push endpoint + result": with_results}
    contenders = {
        "push endpoint": endpoint_app(make_celery(queue_factory=memory)).test_client(),
        "push endpoint + result": endpoint_app(
            make_celery(queue_factory=memory, ignore_result=False)
        ).test_client(),
        "bare route": bare_app(make_celery(queue_factory=memory)).test_client(),
    }

    def run(name: str) -> float:
        client, todo = contenders[name], inputs.get(name, deliveries)
        started = time.perf_counter()
        for body, headers in todo:
            response = client.post(PATH, data=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"unexpected {response.status_code}: {response.data[:200]!r}")
        return len(todo) / (time.perf_counter() - started)

    for name in contenders:
        run(name)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name in contenders:
            rates[name].append(run(name))
    return rate_rows("test client", rates)


def rate_rows(label: str, rates: dict[str, list[float]]) -> list[tuple[str, str, str]]:
    bare = statistics.median(rates["bare route"])
    rows = []
    for name, values in rates.items():
        value = statistics.median(values)
        note = f"{1e6 / value:.0f} us per delivery"
        if name != "bare route":
            note += f"; {value / bare:.2f} of bare" + (
                " (target >= 0.5)" if name == "push endpoint" else ""
            )
        rows.append((f"{label}: {name}", f"{value:,.0f}/s", note))
    return rows


def served(
    deliveries: Deliveries,
    with_results: Deliveries,
    rounds: int,
    *,
    workers: int,
    threads: int,
    clients: int,
) -> list[tuple[str, str, str]]:
    kinds = {
        "push endpoint": {"BENCH_KIND": "endpoint"},
        "push endpoint + result": {"BENCH_KIND": "endpoint", "BENCH_IGNORE_RESULT": "0"},
        "bare route": {"BENCH_KIND": "bare"},
    }
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(Gunicorn(env, workers=workers, threads=threads))
            for name, env in kinds.items()
        }
        inputs = {"push endpoint + result": with_results}
        for server in servers.values():  # warm-up: every worker imports and builds its tracer
            post_all(server.port, deliveries[:200], clients)
        for _ in range(rounds):
            for name, server in servers.items():
                todo = inputs.get(name, deliveries)
                seconds, statuses = post_all(server.port, todo, clients)
                if statuses != {200: len(todo)}:
                    raise SystemExit(f"{name}: unexpected statuses {statuses}")
                rates[name].append(len(todo) / seconds)
    label = f"gunicorn {workers}x{threads} gthread, {clients} clients"
    return rate_rows(label, rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--http-deliveries", type=int, default=2000)
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    sys.path.insert(0, str(BENCH_DIR))
    from _common import print_table

    most = max(args.deliveries, args.http_deliveries)
    deliveries = prepared_deliveries(most)
    with_results = prepared_deliveries(most, ignore_result=False)
    rows = in_process(deliveries[: args.deliveries], with_results[: args.deliveries], args.rounds)
    rows += served(
        deliveries[: args.http_deliveries],
        with_results[: args.http_deliveries],
        args.http_rounds,
        workers=args.workers,
        threads=args.threads,
        clients=args.clients,
    )
    print_table(
        f"endpoint: {args.deliveries} deliveries x {args.rounds} rounds (test client), "
        f"{args.http_deliveries} x {args.http_rounds} (HTTP); median deliveries/s",
        rows,
    )


if __name__ == "__main__":
    main()
