"""``celery -A app cloudtasks ...`` against the real emulator: output, outcomes, exit codes.

Most runs go through click's CliRunner on Celery's own ``celery`` command (so ``-A``, the
plugin entry point and ``ctx.obj.app`` are exercised in-process); one runs
``python -m celery`` as a real subprocess, and ``serve`` is tested as a real server
process on loopback, stopped by its PID. See tests/test_admin.py for what the emulator
can and cannot show (update_queue is a no-op, delete_task is UNIMPLEMENTED).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result
from emulator import Emulator
from google.cloud import tasks_v2
from test_admin import LOCATION, PROJECT, celery_message, held, put_dead_letter, queue_path

from celery_cloudtasks import cli
from celery_cloudtasks.admin import QueueAdmin
from celery_cloudtasks.envelope import TaskEnvelope
from celery_cloudtasks.settings import TransportSettings

CELERY = (sys.executable, "-m", "celery")
SERVE_OPTIONS = ("--threads", "2", "--no-verify-oidc")
APP_MODULE = """
from celery import Celery

app = Celery("{name}", broker="cloudtasks://projects/{project}/locations/{location}")
app.conf.broker_transport_options = {options!r}
app.conf.result_backend = "cache+memory://"
app.conf.task_routes = {{"billing.*": {{"queue": "billing"}}}}


@app.task(name="shop.record", shared=False)
def record(value):
    with open({out!r}, "a") as fh:
        fh.write(str(value) + "\\n")
    return value
"""


class AppModule:
    """A tiny Celery app module written to disk, importable by name."""

    def __init__(self, directory: Path, emulator: Emulator, **options: Any) -> None:
        self.name = f"ctapp_{uuid.uuid4().hex[:10]}"
        self.prefix = f"c{uuid.uuid4().hex[:8]}-"
        self.directory = directory
        self.out = directory / f"{self.name}.out"
        self.options = {
            "push_url": "http://127.0.0.1:9/_cloudtasks",
            "emulator_host": emulator.host,
            "queue_name_prefix": self.prefix,
            "dead_letter_queue": f"{self.prefix}dead",
            "retry": {"max_attempts": 4, "min_backoff": 1, "max_backoff": 8},
            **options,
        }
        source = APP_MODULE.format(
            name=self.name,
            project=PROJECT,
            location=LOCATION,
            options=self.options,
            out=str(self.out),
        )
        (directory / f"{self.name}.py").write_text(source)

    @property
    def settings(self) -> TransportSettings:
        return TransportSettings.from_options(
            self.options, broker_url=f"cloudtasks://projects/{PROJECT}/locations/{LOCATION}"
        )

    @property
    def admin(self) -> QueueAdmin:
        return QueueAdmin(self.settings)


@pytest.fixture
def mod(tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> AppModule:
    monkeypatch.syspath_prepend(str(tmp_path))
    return AppModule(tmp_path, emulator)


def run(mod: AppModule, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        celery_main, ["-A", mod.name, "cloudtasks", *args], input=input, catch_exceptions=False
    )


def states(mod: AppModule) -> dict[str, str]:
    """States of this module's queues (other tests share the project and location)."""
    queues = mod.admin.list_queues()
    return {q.queue_id: q.state for q in queues if q.queue_id.startswith(mod.prefix)}


def test_sync_dry_run_shows_the_diff_and_changes_nothing(mod: AppModule) -> None:
    result = run(mod, "queues", "sync", "--dry-run")
    assert result.exit_code == cli.EXIT_OK, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["+", "create", f"{mod.prefix}billing", "(task_routes)"] in lines
    assert ["+", "create", f"{mod.prefix}dead", "(dead_letter_queue)"] in lines
    assert ["state=PAUSED"] in lines
    assert "max_attempts=4 min_backoff=1s max_backoff=8s max_retry_duration=3600s" in result.stdout
    assert "nothing changed" in result.stdout
    assert states(mod) == {}


def test_sync_creates_queues_then_reports_in_sync(mod: AppModule) -> None:
    result = run(
        mod, "queues", "sync", "--max-dispatches-per-second", "12", "--queue", "tenant-acme"
    )
    assert result.exit_code == cli.EXIT_OK, result.output
    assert "applied: 4 created, 0 updated" in result.stdout
    assert states(mod) == {
        f"{mod.prefix}billing": "RUNNING",
        f"{mod.prefix}celery": "RUNNING",
        f"{mod.prefix}tenant-acme": "RUNNING",
        f"{mod.prefix}dead": "PAUSED",
    }
    described = run(mod, "queues", "describe", f"{mod.prefix}tenant-acme")
    assert described.exit_code == cli.EXIT_OK
    lines = dict(line.split(None, 1) for line in described.stdout.splitlines() if " " in line)
    assert lines["max_attempts"].strip() == "4"
    assert lines["max_backoff"].strip() == "8s"
    assert lines["max_dispatches_per_second"].strip() == "12"
    assert lines["depth"].strip() == "(estimate)           0"

    again = run(
        mod, "queues", "sync", "--max-dispatches-per-second", "12", "--queue", "tenant-acme"
    )
    assert "in sync: nothing to do" in again.stdout

    changed = run(mod, "queues", "sync", "--max-dispatches-per-second", "20")
    assert changed.exit_code == cli.EXIT_OK
    assert ["~", "update", f"{mod.prefix}billing", "(task_routes)"] in [
        line.split() for line in changed.stdout.splitlines()
    ]
    assert "max_dispatches_per_second: 12 -> 20" in changed.stdout
    assert "applied: 0 created, 2 updated" in changed.stdout  # sent; the emulator ignores it


def test_list_shows_a_table(mod: AppModule) -> None:
    run(mod, "queues", "sync")
    result = run(mod, "queues", "list", "--depth")
    assert result.exit_code == cli.EXIT_OK
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "QUEUE", "STATE", "ATTEMPTS", "MIN", "BACKOFF", "MAX", "BACKOFF", "RATE/S",
        "CONCURRENT", "DEPTH",
    ]  # fmt: skip
    mine = [row.split() for row in rows if row.startswith(mod.prefix)]  # others share the location
    assert [row[:3] for row in mine] == [
        [f"{mod.prefix}billing", "RUNNING", "4"],
        [f"{mod.prefix}celery", "RUNNING", "4"],
        [f"{mod.prefix}dead", "PAUSED", "-"],
    ]
    assert all(row[-1] == "0" for row in mine)


def test_pause_resume_purge(mod: AppModule, emulator: Emulator) -> None:
    run(mod, "queues", "sync")
    queue_id = f"{mod.prefix}celery"
    paused = run(mod, "queues", "pause", queue_id)
    assert (paused.exit_code, paused.stdout.strip()) == (0, f"{queue_id}: PAUSED")
    assert "state" in run(mod, "queues", "describe", queue_id).stdout
    assert states(mod)[queue_id] == "PAUSED"
    for n in range(2):
        task = tasks_v2.Task(
            name=f"{queue_path(queue_id)}/tasks/t{n}",
            http_request=tasks_v2.HttpRequest(url="http://127.0.0.1:9/"),
        )
        emulator.client().create_task(parent=queue_path(queue_id), task=task)

    declined = run(mod, "queues", "purge", queue_id, input="n\n")
    assert declined.exit_code == cli.EXIT_ERROR
    assert len(emulator.list_tasks(queue_path(queue_id))) == 2

    purged = run(mod, "queues", "purge", queue_id, input="y\n")
    assert purged.exit_code == cli.EXIT_OK
    assert "purged (2 tasks counted before)" in purged.stdout
    assert emulator.list_tasks(queue_path(queue_id)) == []

    resumed = run(mod, "queues", "resume", queue_id)
    assert resumed.stdout.strip() == f"{queue_id}: RUNNING"


@pytest.mark.parametrize(
    "args",
    [
        ("queues", "describe", "no-such-queue"),
        ("queues", "pause", "no-such-queue"),
        ("queues", "resume", "no-such-queue"),
        ("queues", "purge", "no-such-queue", "--yes"),
    ],
)
def test_missing_queue_exits_3_and_says_so(mod: AppModule, args: tuple[str, ...]) -> None:
    result = run(mod, *args)
    assert result.exit_code == cli.EXIT_NOT_FOUND
    assert "queue 'no-such-queue' does not exist" in result.stderr
    assert "queues sync" in result.stderr


def test_usage_and_configuration_errors_exit_2(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    no_dlq = AppModule(tmp_path, emulator, dead_letter_queue=None)
    result = run(no_dlq, "dead-letters", "list")
    assert result.exit_code == cli.EXIT_USAGE
    assert "dead_letter_queue" in result.stderr
    assert run(no_dlq, "queues", "describe").exit_code == cli.EXIT_USAGE
    other = AppModule(tmp_path, emulator)
    source = (tmp_path / f"{other.name}.py").read_text()
    (tmp_path / f"{other.name}.py").write_text(source.replace("cloudtasks://", "memory://x/"))
    result = run(other, "queues", "list")
    assert result.exit_code == cli.EXIT_USAGE
    assert "does not use Cloud Tasks" in result.stderr


def test_permission_denied_exits_4_naming_the_permission(
    mod: AppModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.api_core import exceptions as gexc
    from test_admin import RefusingClient

    from celery_cloudtasks import admin as admin_module

    refusing = RefusingClient(gexc.PermissionDenied("denied"))
    monkeypatch.setattr(admin_module, "make_client", lambda host: refusing)
    result = run(mod, "queues", "pause", "q")
    assert result.exit_code == cli.EXIT_PERMISSION
    assert "cloudtasks.queues.pause" in result.stderr


def test_dead_letters_list_replay_purge(mod: AppModule, emulator: Emulator) -> None:
    run(mod, "queues", "sync")
    original = f"{mod.prefix}celery"
    run(mod, "queues", "pause", original)
    dead = put_dead_letter(mod.settings, original)

    listed = run(mod, "dead-letters", "list", "--traceback")
    assert listed.exit_code == cli.EXIT_OK
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:5] == ["CELERY", "ID", "TASK", "QUEUE", "ATTEMPTS"]
    assert row.split()[:6] == [dead.task_id, "shop.add", original, "5", "0", "final"]
    assert f"{dead.task_id}: ValueError: card declined" in listed.stdout
    assert 'File "shop.py"' in listed.stdout
    assert "1 dead letter(s)" in listed.stdout

    replayed = run(mod, "dead-letters", "replay")
    # Replayed, but the emulator cannot delete the dead letter: done in part.
    assert replayed.exit_code == cli.EXIT_INCOMPLETE
    assert "1 replayed, 0 failed, 1 replayed but still in the dead-letter queue" in replayed.stdout
    assert "delete_task is not implemented" in replayed.stderr
    [(_, envelope)] = held(emulator, original)
    assert envelope.task_id == dead.task_id and envelope.dead_letter is None

    declined = run(mod, "dead-letters", "purge", input="n\n")
    assert declined.exit_code == cli.EXIT_ERROR
    purged = run(mod, "dead-letters", "purge", "--yes")
    assert purged.exit_code == cli.EXIT_OK
    assert "purged (1 dead letters counted before)" in purged.stdout
    assert emulator.list_tasks(queue_path(f"{mod.prefix}dead")) == []


def subprocess_env(mod: AppModule) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("http_proxy", "HTTP_PROXY")}
    env["PYTHONPATH"] = str(mod.directory)
    return env


def test_entry_point_in_a_real_process(mod: AppModule) -> None:
    run(mod, "queues", "sync")
    done = subprocess.run(
        [*CELERY, "-A", mod.name, "cloudtasks", "queues", "list"],
        cwd=mod.directory,
        env=subprocess_env(mod),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"{mod.prefix}dead" in done.stdout and "PAUSED" in done.stdout

    missing = subprocess.run(
        [*CELERY, "-A", mod.name, "cloudtasks", "queues", "pause", "gone"],
        cwd=mod.directory,
        env=subprocess_env(mod),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == cli.EXIT_NOT_FOUND


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early: {process.communicate()[1]!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve did not listen in time")


def test_serve_runs_a_delivered_task(mod: AppModule, free_port: int) -> None:
    process = subprocess.Popen(
        [*CELERY, "-A", mod.name, "cloudtasks", "serve", *SERVE_OPTIONS, "--port", str(free_port)],
        cwd=mod.directory,
        env=subprocess_env(mod),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(free_port, process)
        message = celery_message("serve-1", [41])
        message["headers"]["task"] = "shop.record"
        body = TaskEnvelope(message=message, queue="celery").to_json()
        request = urllib.request.Request(
            f"http://127.0.0.1:{free_port}/_cloudtasks",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "X-CloudTasks-QueueName": f"{mod.prefix}celery",
                "X-CloudTasks-TaskName": "serve-1",
                "X-CloudTasks-TaskRetryCount": "0",
            },
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"outcome": "succeeded", "task_id": "serve-1"}
        assert mod.out.read_text() == "41\n"
    finally:
        process.send_signal(signal.SIGTERM)  # only the server this test started, by PID
        try:
            _, err = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate(timeout=5)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert "(waitress, 2 threads)" in stderr
    assert "OIDC verification of Cloud Tasks push requests is OFF" in stderr
    assert "delivery shop.record[serve-1] attempt 1: succeeded" in stderr  # INFO logging is on
