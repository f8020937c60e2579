"""apply_async through the cloudtasks transport vs raw CloudTasksClient.create_task.

Both talk to the same gcloud-tasks-emulator over loopback gRPC, interleaved in
rounds, each into a fresh paused queue (deliveries do not compete for the CPU).
Measured with 1 producer thread (every call pays Celery's own ~170 us of
apply_async work on top of the RPC) and with several producer threads (a web
app serving concurrent requests), where the emulator is the bottleneck.
Prints median tasks/s and the ratio (target >= 0.85).

A second table shows where the gap comes from, one producer thread, per task
(us = 1e6 / rate of each contender, all interleaved in the same rounds):

* ``apply_async over memory://``: Celery's own publishing cost, no RPC at all;
* ``apply_async, cloudtasks:// into a no-op queue``: Celery plus this library's
  transport and publisher (envelope, name, options), no RPC;
* ``CloudTasksDispatcher.enqueue``: the dispatcher with a prepared envelope,
  against raw ``create_task`` with an equivalent task dict;
* ``create_task below the GAPIC wrapper``: the client's transport stub wrapped
  with ``grpc_helpers.wrap_errors`` (what the dispatcher could call instead).

    .venvs/dev/bin/python bench/publish.py [--tasks 400] [--rounds 5] [--threads 8]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import Emulator, median, print_table, rate_rounds

PROJECT, LOCATION = "bench", "local"
URL = "http://127.0.0.1:9/_cloudtasks"


def spread(threads: int, count: int, one: Callable[[int], object]) -> None:
    if threads == 1:
        for i in range(count):
            one(i)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, range(count)):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    from celery import Celery

    import celery_cloudtasks  # noqa: F401  (registers the transport)
    from celery_cloudtasks.dispatcher import make_client
    from celery_cloudtasks.envelope import TaskEnvelope

    rows: list[tuple[str, str, str]] = []
    with Emulator(quiet=True) as emulator:
        app = Celery("bench", broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}")
        app.conf.broker_transport_options = {"push_url": URL, "emulator_host": emulator.host}
        app.conf.result_backend = "cache+memory://"
        app.conf.broker_pool_limit = args.threads + 2

        @app.task(name="bench.noop", shared=False, ignore_result=True)
        def noop(i: int) -> int:
            return i

        raw_client = make_client(emulator.host)  # the same shared client the transport uses
        noop.apply_async((0,), queue="warm")
        body = TaskEnvelope(
            message={
                "body": "W1swXSwge30sIHt9XQ==",
                "content-type": "application/json",
                "content-encoding": "utf-8",
                "headers": {"id": "x", "task": "bench.noop"},
                "properties": {},
            },
            queue="celery",
        ).to_json()

        def via_transport(threads: int) -> int:
            queue = f"t-{uuid.uuid4().hex[:10]}"
            emulator.create_queue(PROJECT, LOCATION, queue, paused=True)
            spread(threads, args.tasks, lambda i: noop.apply_async((i,), queue=queue))
            return args.tasks

        def raw(threads: int) -> int:
            queue = emulator.create_queue(
                PROJECT, LOCATION, f"r-{uuid.uuid4().hex[:10]}", paused=True
            )

            def one(_i: int) -> object:
                return raw_client.create_task(
                    parent=queue,
                    task={
                        "name": f"{queue}/tasks/{uuid.uuid4().hex}",
                        "http_request": {
                            "url": URL,
                            "http_method": "POST",
                            "headers": {"Content-Type": "application/json"},
                            "body": body,
                        },
                    },
                    timeout=20,
                )

            spread(threads, args.tasks, one)
            return args.tasks

        for threads in (1, args.threads):
            via_transport(threads)  # warm-up
            raw(threads)
            rates = rate_rounds(
                {
                    "transport": lambda t=threads: via_transport(t),
                    "raw": lambda t=threads: raw(t),
                },
                args.rounds,
            )
            ours, theirs = median(rates["transport"]), median(rates["raw"])
            rows += [
                (f"apply_async, {threads} thread(s)", f"{ours:,.0f}/s", ""),
                (f"raw create_task, {threads} thread(s)", f"{theirs:,.0f}/s", ""),
                (f"ratio, {threads} thread(s)", f"{ours / theirs:.2f}", "target >= 0.85"),
            ]
        breakdown = breakdown_rows(emulator, app, noop, raw_client, args.tasks, args.rounds)
    print_table(
        f"publish: {args.tasks} tasks x {args.rounds} rounds, emulator over loopback gRPC", rows
    )
    print_table("where the time goes: 1 producer thread, median per task", breakdown)


class _NoopQueue:
    """A TaskQueue that accepts everything at once: isolates the publishing path."""

    queue_name = "noop"

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id

    def enqueue(self, envelope: Any, options: Any) -> Any:
        from celery_cloudtasks.types import EnqueueResult

        return EnqueueResult("noop", self.queue_id, False, 0.0)

    def queue_depth(self) -> int:
        return 0


def breakdown_rows(
    emulator: Emulator, app: Any, noop: Any, raw_client: Any, tasks: int, rounds: int
) -> list[tuple[str, str, str]]:
    from celery import Celery
    from google.api_core import grpc_helpers
    from google.api_core.gapic_v1 import routing_header
    from google.cloud.tasks_v2.types import cloudtasks

    from celery_cloudtasks.dispatcher import CloudTasksDispatcher
    from celery_cloudtasks.publisher import Publisher

    def celery_app(broker: str, **options: Any) -> Any:
        other = Celery(f"bench-{broker[:6]}", broker=broker, set_as_current=False)
        other.conf.broker_transport_options = options
        other.conf.result_backend = "cache+memory://"

        @other.task(name="bench.noop", shared=False, ignore_result=True)
        def same_noop(i: int) -> int:
            return i

        return same_noop

    memory_noop = celery_app("memory://")
    null_noop = celery_app(
        f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
        push_url=URL,
        queue_factory=_NoopQueue,
    )
    publisher: Publisher = app.connection_for_write().transport.publisher
    settings = publisher.settings
    stub = grpc_helpers.wrap_errors(raw_client.transport.create_task)

    def prepared(queue_id: str) -> list[Any]:
        out = []
        for i in range(tasks):
            message = {
                "body": "W1swXSwge30sIHt9XQ==",
                "content-type": "application/json",
                "content-encoding": "utf-8",
                "headers": {"id": f"{uuid.uuid4()}", "task": "bench.noop", "retries": 0},
                "properties": {"body_encoding": "base64", "n": i},
            }
            out.append(publisher.prepare(queue_id, message))
        return out

    def fresh() -> tuple[str, str]:
        queue_id = f"b-{uuid.uuid4().hex[:10]}"
        return queue_id, emulator.create_queue(PROJECT, LOCATION, queue_id, paused=True)

    def memory_run() -> int:
        for i in range(tasks):
            memory_noop.apply_async((i,))
        return tasks

    def null_run() -> int:
        for i in range(tasks):
            null_noop.apply_async((i,))
        return tasks

    # The RPC contenders time only their loop (preparing inputs is outside the clock).
    def timed_rpc(kind: str) -> float:
        queue_id, path = fresh()
        items = prepared(queue_id)
        dispatcher = CloudTasksDispatcher(settings, queue_id, client=raw_client)
        task_dicts = [dispatcher.build_task(p.envelope, p.options) for p in items]
        metadata = (routing_header.to_grpc_metadata((("parent", path),)),)
        started = time.perf_counter()
        if kind == "dispatcher":
            for p in items:
                dispatcher.enqueue(p.envelope, p.options)
        elif kind == "raw":
            for task in task_dicts:
                raw_client.create_task(parent=path, task=task, timeout=20)
        else:
            for task in task_dicts:
                request = cloudtasks.CreateTaskRequest(parent=path, task=task)
                stub(request, timeout=20, metadata=metadata)
        seconds = time.perf_counter() - started
        if len(emulator.list_tasks(path)) != tasks:
            raise SystemExit(f"{kind}: queue {queue_id} does not hold {tasks} tasks")
        return tasks / seconds

    runs: dict[str, Callable[[], float]] = {
        "memory": lambda: tasks / _seconds(memory_run),
        "null": lambda: tasks / _seconds(null_run),
        "dispatcher": lambda: timed_rpc("dispatcher"),
        "raw": lambda: timed_rpc("raw"),
        "stub": lambda: timed_rpc("stub"),
    }
    for run in runs.values():  # warm-up
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(run())
    us = {name: 1e6 / median(values) for name, values in rates.items()}
    return [
        ("apply_async over memory://", f"{us['memory']:.0f} us", "Celery alone, no RPC"),
        (
            "apply_async, cloudtasks:// no-op queue",
            f"{us['null']:.0f} us",
            f"transport + publisher add {us['null'] - us['memory']:+.0f} us",
        ),
        ("raw create_task (GAPIC client)", f"{us['raw']:.0f} us", "same task dicts"),
        (
            "CloudTasksDispatcher.enqueue",
            f"{us['dispatcher']:.0f} us",
            f"dispatcher adds {us['dispatcher'] - us['raw']:+.0f} us over raw",
        ),
        (
            "create_task below the GAPIC wrapper",
            f"{us['stub']:.0f} us",
            f"transport stub + wrap_errors: {us['stub'] - us['raw']:+.0f} us vs raw",
        ),
    ]


def _seconds(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
