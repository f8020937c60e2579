"""apply_async through the cloudtasks transport vs raw CloudTasksClient.create_task.

Both talk to the same gcloud-tasks-emulator over loopback gRPC, interleaved in
rounds, each into a fresh paused queue (deliveries do not compete for the CPU).
Measured with 1 producer thread (every call pays Celery's own ~170 us of
apply_async work on top of the RPC) and with several producer threads (a web
app serving concurrent requests), where the emulator is the bottleneck.
Prints median tasks/s and the ratio (target >= 0.85).

    .venvs/dev/bin/python bench/publish.py [--tasks 400] [--rounds 5] [--threads 8]
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
    print_table(
        f"publish: {args.tasks} tasks x {args.rounds} rounds, emulator over loopback gRPC", rows
    )


if __name__ == "__main__":
    main()
