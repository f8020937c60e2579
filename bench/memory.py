"""Memory of the served push endpoint over 10,000 deliveries: flat after warm-up?

Serves :func:`celery_cloudtasks.flask.create_app` with gunicorn (one ``gthread``
worker, so one process to watch), results stored by Celery's filesystem
backend (on disk, not in the process). Posts ``--warmup`` deliveries, reads
the worker's RSS (``VmRSS`` in ``/proc/PID/status``), then ``--deliveries``
more in ``--steps`` steps, reading RSS after each. Every delivery is a
distinct task id; one in ten runs a task that raises (stored as RETRY,
answered 500, so the failure path with its traceback is exercised too).

Prints RSS after warm-up, after each step, and the growth (target < 5%).

    .venvs/dev/bin/python bench/memory.py [--deliveries 10000] [--warmup 2000] [--steps 5]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from endpoint import Deliveries, Gunicorn, make_celery, post_all

_RSS = re.compile(r"^VmRSS:\s+(\d+) kB", re.MULTILINE)


def rss_kib(pid: int) -> int:
    match = _RSS.search(Path(f"/proc/{pid}/status").read_text())
    if match is None:
        raise SystemExit(f"no VmRSS for process {pid}")
    return int(match.group(1))


def mixed_deliveries(count: int) -> Deliveries:
    """``count`` distinct deliveries: nine in ten ``bench.add``, one in ten ``bench.fail``."""
    from celery_cloudtasks.memory import InMemoryCloudTasks

    memory = InMemoryCloudTasks()
    producer = make_celery(queue_factory=memory, ignore_result=False)
    for i in range(count):
        if i % 10 == 9:
            producer.tasks["bench.fail"].delay(i)
        else:
            producer.tasks["bench.add"].delay(i, 1)
    queue = memory.queue("celery")
    return [(d.body, d.headers) for d in (queue.build_delivery(t) for t in queue.tasks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deliveries", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    deliveries = mixed_deliveries(args.warmup + args.deliveries)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        results = Path(tmp) / "results"
        results.mkdir()
        env = {"BENCH_KIND": "endpoint", "BENCH_RESULTS": f"file://{results}"}
        env["BENCH_IGNORE_RESULT"] = "0"
        with Gunicorn(env, workers=1, threads=4, max_lifetime_seconds=900) as server:
            (worker,) = server.worker_pids()
            before = rss_kib(worker)
            _, statuses = post_all(server.port, deliveries[: args.warmup], args.clients)
            baseline = rss_kib(worker)
            rows.append(("before any delivery", f"{before / 1024:.1f} MiB", ""))
            rows.append((f"after {args.warmup:,} (warm-up)", f"{baseline / 1024:.1f} MiB", ""))
            rest = deliveries[args.warmup :]
            step = max(1, len(rest) // args.steps)
            done = 0
            for start in range(0, len(rest), step):
                chunk = rest[start : start + step]
                _, got = post_all(server.port, chunk, args.clients)
                for status, count in got.items():
                    statuses[status] = statuses.get(status, 0) + count
                done += len(chunk)
                now = rss_kib(worker)
                rows.append(
                    (
                        f"after {args.warmup + done:,}",
                        f"{now / 1024:.1f} MiB",
                        f"{(now - baseline) / baseline:+.1%} vs warm-up",
                    )
                )
            if server.worker_pids() != [worker]:
                raise SystemExit("the gunicorn worker was replaced during the run")
            stored = sum(1 for _ in results.iterdir())
    growth = (now - baseline) / baseline
    failing = sum(1 for i in range(len(deliveries)) if i % 10 == 9)
    expected = {200: len(deliveries) - failing, 500: failing}
    if statuses != expected:
        raise SystemExit(f"unexpected statuses {statuses}, expected {expected}")
    rows.append(("growth after warm-up", f"{growth:+.1%}", "target < 5%"))
    print(
        f"\nmemory: RSS of one gunicorn gthread worker (4 threads) over "
        f"{args.warmup + args.deliveries:,} deliveries ({stored:,} results stored)"
    )
    width = max(len(name) for name, _, _ in rows) + 2
    print(f"{'':{width}}{'RSS':>12}  note")
    for name, value, note in rows:
        print(f"{name:{width}}{value:>12}  {note}")


if __name__ == "__main__":
    main()
