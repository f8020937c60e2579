"""The one-command demo: the shop's order pipeline on a local Cloud Tasks emulator.

Starts a Cloud Tasks API emulator and the push endpoint (gunicorn, as on Cloud
Run), creates the queues, dispatches orders for two tenants (chains with
retries and redeliveries, a chord per tenant, tasks that always fail), shows
progress live, and ends with a summary: tasks per queue and state, retries,
dead letters, dispatch latency percentiles. Exit status 0 when every order was
confirmed, every report compiled and every failing task dead-lettered.
Every process it starts is stopped, by PID, on the way out.

    scripts/demo                    # 120 orders per tenant
    scripts/demo --orders 10        # a quick run
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TENANTS = ("acme", "globex")
PROJECT, LOCATION = "local-project", "local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_binary() -> str:
    configured = os.environ.get("CELERY_CLOUDTASKS_EMULATOR_BIN")
    local = ROOT / ".venvs" / "emulator" / "bin" / "gcloud-tasks-emulator"
    for candidate in (configured, str(local)):
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("the Cloud Tasks emulator is not installed: run scripts/setup (or scripts/demo)")


@contextmanager
def process(args: list[str], *, log: Path, env: dict[str, str], name: str) -> Iterator[Any]:
    """Start a process in its own group; stop exactly it (and its children) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def http_up(url: str) -> bool:
    """True once anything answers HTTP at ``url`` (a 405 for GET counts)."""
    try:
        urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback
    except urllib.error.HTTPError:
        return True
    return True


def wait_until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not up yet
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not start within {timeout:.0f} s")


class LatencyRecorder:
    """A dispatch metrics hook: keeps every dispatch latency for the summary."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()

    def dispatched(self, queue: str, outcome: str, latency_seconds: float) -> None:
        self.outcomes[outcome] += 1
        if outcome != "failed":
            self.latencies.append(latency_seconds)

    def delivered(self, task: str, outcome: str, duration_seconds: float) -> None:
        return None

    def dead_lettered(self, queue: str, task: str) -> None:
        return None


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def make_orders(tenant: str, count: int) -> list[dict[str, Any]]:
    base = 1000 if tenant == "acme" else 5000
    return [
        {
            "id": base + i,
            "items": [
                {"sku": f"sku-{i % 13}", "qty": 1 + i % 3, "price_cents": 199 + 10 * (i % 17)}
            ],
        }
        for i in range(count)
    ]


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=120, help="orders per tenant")
    parser.add_argument("--failing", type=int, default=3, help="always-failing tasks per tenant")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for work")
    parser.add_argument("--plain", action="store_true", help="no live table (for logs and CI)")
    args = parser.parse_args()
    for signum in (signal.SIGTERM, signal.SIGHUP):  # closing the terminal still cleans up
        signal.signal(signum, _exit_on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="shop-demo-"))
    api_port, web_port = free_port(), free_port()
    prefix = "shop-"
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CLOUD_TASKS_EMULATOR_HOST": f"127.0.0.1:{api_port}",
        "SHOP_PUSH_URL": f"http://127.0.0.1:{web_port}/_cloudtasks",
        "SHOP_RESULT_BACKEND": f"db+sqlite:///{workdir / 'results.sqlite'}",
        "SHOP_VERIFY_OIDC": "0",  # the emulator sends no OIDC tokens; Cloud Run does
        "SHOP_MAX_ATTEMPTS": "3",
    }
    os.environ.update({k: env[k] for k in env if k.startswith(("SHOP_", "CLOUD_TASKS_"))})
    sys.path.insert(0, str(HERE))

    with ExitStack() as stack:
        emulator = stack.enter_context(
            process(
                [emulator_binary(), "start", "--port", str(api_port), "--max-retries", "2", "-q"],
                log=workdir / "emulator.log",
                env=env,
                name="emulator",
            )
        )
        from celery_cloudtasks.dispatcher import make_client

        client = make_client(env["CLOUD_TASKS_EMULATOR_HOST"])
        parent = f"projects/{PROJECT}/locations/{LOCATION}"
        wait_until(lambda: client.list_queues(parent=parent, timeout=2) is not None, "emulator")
        print(f"Cloud Tasks emulator (pid {emulator.pid}) on 127.0.0.1:{api_port}")

        from shop import app
        from shop.tasks import daily_report, order_pipeline, sync_legacy_erp

        recorder = LatencyRecorder()
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "metrics": recorder,
        }
        queue_ids = [f"{prefix}tenant-{t}{s}" for t in TENANTS for s in ("", "-high")]
        queue_ids += [f"{prefix}reports", f"{prefix}celery"]
        for queue_id in [*queue_ids, "shop-dead-letters"]:
            client.create_queue(
                parent=parent, queue={"name": f"{parent}/queues/{queue_id}"}, timeout=5
            )
        client.pause_queue(name=f"{parent}/queues/shop-dead-letters", timeout=5)

        web = stack.enter_context(
            process(
                [
                    str(Path(sys.executable).with_name("gunicorn")),
                    "--bind",
                    f"127.0.0.1:{web_port}",
                    "--workers",
                    "1",
                    "--worker-class",
                    "gthread",
                    "--threads",
                    "8",
                    "--log-level",
                    "warning",
                    "wsgi:app",
                ],
                log=workdir / "endpoint.log",
                env=env,
                name="endpoint",
            )
        )
        wait_until(lambda: http_up(f"http://127.0.0.1:{web_port}/_cloudtasks"), "push endpoint")
        print(f"push endpoint (gunicorn, pid {web.pid}) on 127.0.0.1:{web_port}\n")
        return run_workload(
            app,
            args,
            recorder,
            client,
            parent,
            web_port,
            order_pipeline,
            daily_report,
            sync_legacy_erp,
            queue_ids,
        )
    return 1


def run_workload(
    app: Any,
    args: Any,
    recorder: LatencyRecorder,
    client: Any,
    parent: str,
    web_port: int,
    order_pipeline: Any,
    daily_report: Any,
    sync_legacy_erp: Any,
    queue_ids: list[str],
) -> int:
    from celery_cloudtasks import dispatch_batch

    tracked: dict[str, tuple[str, Any]] = {}  # kind/tenant -> results
    started = time.monotonic()
    with dispatch_batch(max_in_flight=16):
        for tenant in TENANTS:
            orders = make_orders(tenant, args.orders)
            for order in orders:
                tracked[f"order {order['id']}"] = (
                    f"{tenant}: orders",
                    order_pipeline(order, tenant).apply_async(),
                )
            tracked[f"report {tenant}"] = (
                f"{tenant}: report",
                daily_report(orders, tenant).apply_async(),
            )
            for i in range(args.failing):
                result = sync_legacy_erp.apply_async((i,), kwargs={"tenant_id": tenant})
                tracked[f"erp {tenant} {i}"] = (f"{tenant}: legacy ERP", result)
    dispatched_in = time.monotonic() - started
    total_dispatches = sum(recorder.outcomes.values())
    print(
        f"dispatched {total_dispatches} tasks in {dispatched_in:.1f} s "
        f"({len(tracked)} pipelines, reports and failing syncs)"
    )

    expected_dead = args.failing * len(TENANTS)

    def snapshot() -> Counter[tuple[str, str]]:
        counts: Counter[tuple[str, str]] = Counter()
        for group_name, result in tracked.values():
            counts[(group_name, result.state)] += 1
        return counts

    def dead_letters() -> int:
        return len(list(client.list_tasks(parent=f"{parent}/queues/shop-dead-letters", timeout=5)))

    def done(counts: Counter[tuple[str, str]], dead: int) -> bool:
        finished = sum(n for (_g, state), n in counts.items() if state in ("SUCCESS", "FAILURE"))
        return finished == len(tracked) and dead >= expected_dead

    deadline = time.monotonic() + args.timeout
    counts, dead = snapshot(), dead_letters()
    live = None if args.plain else _live_table()
    try:
        while not done(counts, dead) and time.monotonic() < deadline:
            if live is not None:
                live.update(_render(counts, dead, time.monotonic() - started))
            else:
                ok = sum(n for (_g, s), n in counts.items() if s == "SUCCESS")
                print(
                    f"  {time.monotonic() - started:5.1f} s  {ok}/{len(tracked)} succeeded, "
                    f"{dead} dead letters",
                    flush=True,
                )
            time.sleep(0.5 if live is not None else 2.0)
            counts, dead = snapshot(), dead_letters()
    finally:
        if live is not None:
            live.update(_render(counts, dead, time.monotonic() - started))
            live.stop()
    elapsed = time.monotonic() - started
    metrics = _scrape(web_port)
    ok = print_summary(
        counts, dead, expected_dead, recorder, metrics, elapsed, client, parent, queue_ids
    )
    return 0 if ok else 1


def _live_table() -> Any:
    from rich.live import Live

    live = Live(refresh_per_second=4, transient=False)
    live.start()
    return live


def _render(counts: Counter[tuple[str, str]], dead: int, elapsed: float) -> Any:
    from rich.table import Table

    total = sum(counts.values())
    finished = sum(n for (_g, s), n in counts.items() if s in ("SUCCESS", "FAILURE"))
    width = 30
    filled = round(width * finished / total) if total else 0
    bar = "#" * filled + "-" * (width - filled)
    table = Table(
        title=f"shop demo, {elapsed:.1f} s",
        caption=f"[{bar}] {finished}/{total} finished, {dead} dead letters",
    )
    order = ["PENDING", "RETRY", "STARTED", "SUCCESS", "FAILURE"]
    states = sorted({s for _g, s in counts} | {"PENDING", "SUCCESS", "FAILURE"}, key=order.index)
    table.add_column("group")
    for state in states:
        table.add_column(state, justify="right")
    for group_name in sorted({g for g, _s in counts}):
        table.add_row(group_name, *(str(counts.get((group_name, s), 0)) for s in states))
    return table


def _scrape(port: int) -> dict[str, float]:
    """Sum the endpoint's Prometheus counters by metric name and outcome label."""
    totals: Counter[str] = Counter()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    for line in text.splitlines():
        if line.startswith("celery_cloudtasks_deliveries_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            totals[f"deliveries {outcome}"] += float(value)
        elif line.startswith("celery_cloudtasks_dead_letters_total{"):
            totals["dead letters"] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


def print_summary(
    counts: Counter[tuple[str, str]],
    dead: int,
    expected_dead: int,
    recorder: LatencyRecorder,
    metrics: dict[str, float],
    elapsed: float,
    client: Any,
    parent: str,
    queue_ids: list[str],
) -> bool:
    print("\n== summary ==")
    print(f"{'group':<22}{'state':<10}{'count':>7}")
    for (group_name, state), n in sorted(counts.items()):
        print(f"{group_name:<22}{state:<10}{n:>7}")
    print(f"\n{'Cloud Tasks queue':<34}{'waiting':>8}")
    for queue_id in queue_ids:
        waiting = len(list(client.list_tasks(parent=f"{parent}/queues/{queue_id}", timeout=5)))
        print(f"{queue_id:<34}{waiting:>8}")
    print(f"{'shop-dead-letters (paused)':<34}{dead:>8}")
    print("\nendpoint deliveries by outcome (Prometheus):")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<30}{value:>8.0f}")
    lat = [v * 1000 for v in recorder.latencies]
    print(
        f"\ndispatches: {sum(recorder.outcomes.values())} "
        f"({dict(recorder.outcomes)}); latency ms p50 {percentile(lat, 50):.1f}, "
        f"p90 {percentile(lat, 90):.1f}, p99 {percentile(lat, 99):.1f}, "
        f"max {max(lat, default=0):.1f}"
    )
    succeeded = sum(n for (g, s), n in counts.items() if s == "SUCCESS" and "ERP" not in g)
    wanted = sum(n for (g, _s), n in counts.items() if "ERP" not in g)
    failed_as_designed = sum(n for (g, s), n in counts.items() if s == "FAILURE" and "ERP" in g)
    ok = succeeded == wanted and failed_as_designed == expected_dead and dead == expected_dead
    print(
        f"\n{succeeded}/{wanted} pipelines and reports succeeded, "
        f"{failed_as_designed}/{expected_dead} failing syncs dead-lettered, "
        f"{elapsed:.1f} s: {'OK' if ok else 'INCOMPLETE'}"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
