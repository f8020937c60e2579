"""Sequential apply_async vs dispatch_batch, 1,000 tasks, with and without added latency.

Cloud Tasks answers a create_task in tens of milliseconds; published one RPC
at a time, a group of 1,000 tasks takes tens of seconds. ``dispatch_batch``
keeps ``max_in_flight`` RPCs in flight. Both ways publish into the same
gcloud-tasks-emulator, once reached through :class:`LatencyProxy` adding 20 ms
per direction (like a nearby Google region) and once directly over loopback.
Each run uses a fresh paused queue (no deliveries compete for the CPU) and is
checked afterwards: the queue must hold exactly ``--tasks`` tasks.

Contenders, interleaved in rounds:

* ``sequential``: ``noop.apply_async(...)`` in a loop;
* ``batch loop``: the same loop inside ``with dispatch_batch(max_in_flight=N):``;
* ``batch group``: ``group(noop.s(i) ...).apply_async()`` inside ``dispatch_batch``.

Prints the median seconds per 1,000 tasks and the speed-up over sequential
(target with the proxy: >= 10x).

    .venvs/dev/bin/python bench/dispatch.py [--tasks 1000] [--rounds 3] [--in-flight 32]
        [--delay-ms 20] [--skip-direct]

Runs for about 3 minutes with the defaults (sequential through the proxy is
~45 s per round).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

from _common import Emulator, median, print_table
from latency_proxy import LatencyProxy

PROJECT, LOCATION = "bench", "local"
URL = "http://127.0.0.1:9/_cloudtasks"


def make_app(host: str) -> Any:
    from celery import Celery

    import celery_cloudtasks  # noqa: F401  (registers the transport)

    app = Celery(
        f"bench-{uuid.uuid4().hex[:6]}",
        set_as_current=False,
        broker=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}",
    )
    app.conf.broker_transport_options = {
        "push_url": URL,
        "emulator_host": host,
        # Applied once per queue per process in real use; every round here uses a new
        # queue, so leave it out of the measurement.
        "apply_queue_retry_config": False,
    }
    app.conf.result_backend = "cache+memory://"
    app.conf.task_ignore_result = True
    return app


def contenders(
    app: Any, emulator: Emulator, tasks: int, in_flight: int
) -> dict[str, Callable[[], float]]:
    from celery import group

    from celery_cloudtasks import dispatch_batch

    @app.task(name="bench.noop", shared=False)
    def noop(i: int) -> int:
        return i

    def fresh_queue() -> tuple[str, str]:
        queue_id = f"d-{uuid.uuid4().hex[:10]}"
        return queue_id, emulator.create_queue(PROJECT, LOCATION, queue_id, paused=True)

    def timed(publish: Callable[[str], None]) -> float:
        queue_id, path = fresh_queue()
        started = time.perf_counter()
        publish(queue_id)
        seconds = time.perf_counter() - started
        found = len(emulator.list_tasks(path))
        if found != tasks:
            raise SystemExit(f"queue {queue_id} holds {found} tasks, expected {tasks}")
        return seconds

    def sequential(queue: str) -> None:
        for i in range(tasks):
            noop.apply_async((i,), queue=queue)

    def batch_loop(queue: str) -> None:
        with dispatch_batch(max_in_flight=in_flight):
            for i in range(tasks):
                noop.apply_async((i,), queue=queue)

    def batch_group(queue: str) -> None:
        with dispatch_batch(max_in_flight=in_flight):
            group(noop.s(i) for i in range(tasks)).apply_async(queue=queue)

    return {
        "sequential": lambda: timed(sequential),
        "batch loop": lambda: timed(batch_loop),
        "batch group": lambda: timed(batch_group),
    }


def measure(
    label: str, runs: dict[str, Callable[[], float]], rounds: int, tasks: int, in_flight: int
) -> list[tuple[str, str, str]]:
    for run in runs.values():  # warm-up: connections, tracers, code paths
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            seconds[name].append(run())
    base = median(seconds["sequential"])
    rows = []
    for name, values in seconds.items():
        value = median(values)
        note = f"{tasks / value:,.0f} tasks/s"
        if name != "sequential":
            note += f"; {base / value:.1f}x sequential"
            if label.startswith("proxy"):
                note += " (target >= 10x)"
            note += f"; max_in_flight={in_flight}"
        rows.append((f"{label}: {name}", f"{value:.2f} s", note))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--skip-direct", action="store_true")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []
    with Emulator(quiet=True) as emulator:
        lifetime = 60.0 + args.rounds * args.tasks * (args.delay_ms * 4 / 1000 + 0.01)
        with LatencyProxy(
            emulator.host,
            delay_seconds=args.delay_ms / 1000,
            max_lifetime_seconds=lifetime,
        ) as proxy:
            app = make_app(proxy.host)
            label = f"proxy +{args.delay_ms:g} ms/direction"
            runs = contenders(app, emulator, args.tasks, args.in_flight)
            rows += measure(label, runs, args.rounds, args.tasks, args.in_flight)
        if not args.skip_direct:
            app = make_app(emulator.host)
            runs = contenders(app, emulator, args.tasks, args.in_flight)
            rows += measure("direct loopback", runs, args.rounds, args.tasks, args.in_flight)
    print_table(
        f"dispatch: {args.tasks} tasks, median of {args.rounds} interleaved rounds "
        "(seconds per run; lower is better)",
        rows,
    )


if __name__ == "__main__":
    main()
