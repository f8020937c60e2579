"""``celery -A proj cloudtasks ...``: serve the push endpoint, administer Cloud Tasks queues.

A Celery CLI plugin (entry point ``celery.commands``); the app comes from ``-A``,
settings from its broker URL and ``broker_transport_options``::

    serve [--host 127.0.0.1] [--port 8080|$PORT] [--threads 8] [--no-verify-oidc] [-l INFO]
    queues list [--depth]
    queues describe QUEUE_ID
    queues sync [--dry-run] [--queue CELERY_QUEUE ...]
                [--max-dispatches-per-second X] [--max-concurrent-dispatches N]
    queues pause|resume QUEUE_ID
    queues purge QUEUE_ID [--yes]
    dead-letters list [--limit 50] [--traceback]
    dead-letters replay [--limit N] [--task ID ...]
    dead-letters purge [--yes]

``QUEUE_ID`` is a Cloud Tasks queue ID as ``queues list`` shows it. ``serve`` runs
:func:`celery_cloudtasks.flask.create_app` on waitress (a production WSGI server, one
process, ``--threads`` threads; on SIGTERM it stops accepting and waits up to 5 s for
running tasks, whose deliveries Cloud Tasks retries otherwise); without waitress it
falls back to Werkzeug's threaded development server and says so. In a container
pass ``--host 0.0.0.0``; the port defaults to ``$PORT`` (Cloud Run) or 8080.

Exit codes, for scripts:

== ================= ======================================================
0  EXIT_OK           done
1  EXIT_ERROR        failed (API error, server unavailable, confirmation declined)
2  EXIT_USAGE        bad command line or configuration: nothing was attempted
3  EXIT_NOT_FOUND    the queue does not exist
4  EXIT_PERMISSION   the caller lacks an IAM permission (named in the message)
5  EXIT_INCOMPLETE   done in part: some dead letters not replayed or not deleted
== ================= ======================================================
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from .admin import QueueInfo, SyncPlan, desired_queues
from .errors import CloudTasksError, ConfigurationError, PermissionDenied, QueueNotFound
from .replay import DeadLetter, DeadLetterAdmin
from .settings import TransportSettings

__all__ = [
    "EXIT_ERROR",
    "EXIT_INCOMPLETE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "cloudtasks",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_INCOMPLETE = 5

P = ParamSpec("P")
R = TypeVar("R")


def _handled(command: Callable[P, R]) -> Callable[P, R]:
    """Turn library errors into a one-line message on stderr and a documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except QueueNotFound as exc:
            _fail(exc, EXIT_NOT_FOUND)
        except PermissionDenied as exc:
            _fail(exc, EXIT_PERMISSION)
        except ConfigurationError as exc:
            _fail(exc, EXIT_USAGE)
        except CloudTasksError as exc:
            _fail(exc, EXIT_ERROR)

    return wrapper


def _fail(exc: Exception, code: int) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    raise click.exceptions.Exit(code)


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("run as `celery -A yourapp cloudtasks ...`")
    return app


def _admin(ctx: click.Context) -> DeadLetterAdmin:
    app = _app(ctx)
    url = app.conf.broker_url
    options = app.conf.broker_transport_options or {}
    if not (isinstance(url, str) and url.startswith("cloudtasks://")) and "project" not in options:
        raise ConfigurationError(
            f"the app {app.main!r} does not use Cloud Tasks (broker {url!r}): set "
            "broker_url='cloudtasks://projects/PROJECT/locations/LOCATION'"
        )
    return DeadLetterAdmin(TransportSettings.from_celery(app))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


@click.group()
def cloudtasks() -> None:
    """Google Cloud Tasks: the push endpoint and queue administration."""


# -- serve -----------------------------------------------------------------------------


@cloudtasks.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, envvar="PORT", show_default=True
)
@click.option("--threads", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option(
    "--no-verify-oidc",
    is_flag=True,
    help="Accept push requests without an OIDC token (local tests only).",
)
@click.option(
    "-l",
    "--loglevel",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Set up logging as `celery worker` does (honours the setup_logging signal).",
)
@click.pass_context
@_handled
def serve(
    ctx: click.Context, host: str, port: int, threads: int, no_verify_oidc: bool, loglevel: str
) -> None:
    """Serve the Cloud Tasks push endpoint (POST /_cloudtasks)."""
    from .flask import create_app

    app = _app(ctx)
    app.log.setup(loglevel=loglevel.upper())
    config = {"CLOUDTASKS_VERIFY_OIDC": False} if no_verify_oidc else {}
    try:
        wsgi = create_app(app, **config)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (--no-verify-oidc for local tests)") from exc
    try:
        import waitress
    except ImportError:
        click.echo(
            "warning: waitress is not installed; using Werkzeug's development server, "
            "which is not meant for production (pip install waitress)",
            err=True,
        )
        from werkzeug.serving import run_simple

        run_simple(host, port, wsgi, threaded=True)
        return
    server = waitress.create_server(wsgi, host=host, port=port, threads=threads)
    # On SystemExit waitress stops accepting and waits up to 5 s for running requests.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    click.echo(
        f"serving the Cloud Tasks push endpoint on http://{host}:{server.effective_port}"
        f"/_cloudtasks (waitress, {threads} threads)",
        err=True,
    )
    server.run()


# -- queues ----------------------------------------------------------------------------


@cloudtasks.group()
def queues() -> None:
    """List, inspect, sync, pause, resume and purge Cloud Tasks queues."""


_QUEUE_COLUMNS = ("max_attempts", "min_backoff", "max_backoff", "max_dispatches_per_second")


@queues.command("list")
@click.option("--depth", is_flag=True, help="Also count tasks per queue (a call per queue).")
@click.pass_context
@_handled
def list_queues(ctx: click.Context, depth: bool) -> None:
    """Queues of the project and location of the broker URL."""
    admin = _admin(ctx)
    infos = admin.list_queues()
    if depth:
        infos = [admin.describe(info.queue_id) for info in infos]
    headers = ["QUEUE", "STATE", "ATTEMPTS", "MIN BACKOFF", "MAX BACKOFF", "RATE/S", "CONCURRENT"]
    rows = [
        [i.queue_id, i.state, *(i.settings[k] for k in _QUEUE_COLUMNS)]
        + [i.settings["max_concurrent_dispatches"]]
        + ([i.depth] if depth else [])
        for i in infos
    ]
    click.echo(_table(headers + (["DEPTH"] if depth else []), rows))
    if not infos:
        click.echo(f"(no queues in {admin.settings.parent})")


@queues.command()
@click.argument("queue_id")
@click.pass_context
@_handled
def describe(ctx: click.Context, queue_id: str) -> None:
    """Settings, state and depth estimate of a queue."""
    info = _admin(ctx).describe(queue_id)
    _show(info)


def _show(info: QueueInfo) -> None:
    rows = [("queue", info.path), ("state", info.state)]
    rows += [(k, _cell(v)) for k, v in info.settings.items()]
    if info.depth is not None:
        rows.append(("depth (estimate)", str(info.depth)))
    width = max(len(k) for k, _ in rows)
    click.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


@queues.command()
@click.option("--dry-run", is_flag=True, help="Show the changes, make none.")
@click.option(
    "--queue",
    "extra",
    multiple=True,
    help="A Celery queue to manage too (e.g. per-tenant queues chosen by a router).",
)
@click.option(
    "--max-dispatches-per-second",
    type=click.FloatRange(0, 500, min_open=True),
    help="Rate limit of every queue except the dead-letter queue (default: leave as is).",
)
@click.option(
    "--max-concurrent-dispatches",
    type=click.IntRange(1, 5000),
    help="Concurrency limit of every queue except the dead-letter queue (default: leave as is).",
)
@click.pass_context
@_handled
def sync(
    ctx: click.Context,
    dry_run: bool,
    extra: tuple[str, ...],
    max_dispatches_per_second: float | None,
    max_concurrent_dispatches: int | None,
) -> None:
    """Create missing queues; bring retry and rate settings in line with the configuration."""
    admin = _admin(ctx)
    desired = desired_queues(
        _app(ctx),
        admin.settings,
        extra=extra,
        max_dispatches_per_second=max_dispatches_per_second,
        max_concurrent_dispatches=max_concurrent_dispatches,
    )
    plan = admin.plan_sync(desired)
    click.echo(_plan_text(plan))
    if not admin.settings.apply_queue_retry_config:
        click.echo("note: retry policies are not managed (apply_queue_retry_config=False)")
    if not plan.pending:
        click.echo("in sync: nothing to do")
    elif dry_run:
        click.echo(f"dry run: {len(plan.pending)} queue(s) would change; nothing changed")
    else:
        done = admin.apply_sync(plan)
        created = sum(1 for c in done if c.action == "create")
        click.echo(f"applied: {created} created, {len(done) - created} updated")


def _plan_text(plan: SyncPlan) -> str:
    """``+ create`` with the settings, ``~ update`` with ``field: old -> new`` lines, ``= ok``."""
    marks = {"create": "+ create", "update": "~ update", "unchanged": "= ok    "}
    width = max((len(c.desired.queue_id) for c in plan.changes), default=0)
    lines = []
    for change in plan.changes:
        queue_id = change.desired.queue_id.ljust(width)
        lines.append(f"{marks[change.action]}  {queue_id}  ({change.desired.source})")
        if change.action == "create" and change.changes:
            lines.append("      " + " ".join(f"{c.field}={_cell(c.new)}" for c in change.changes))
        elif change.action == "update":
            lines += [f"      {c.field}: {_cell(c.old)} -> {_cell(c.new)}" for c in change.changes]
    return "\n".join(lines)


@queues.command()
@click.argument("queue_id")
@click.pass_context
@_handled
def pause(ctx: click.Context, queue_id: str) -> None:
    """Stop deliveries from a queue (tasks are kept)."""
    info = _admin(ctx).pause(queue_id)
    click.echo(f"{info.queue_id}: {info.state}")


@queues.command()
@click.argument("queue_id")
@click.pass_context
@_handled
def resume(ctx: click.Context, queue_id: str) -> None:
    """Restart deliveries from a paused queue."""
    info = _admin(ctx).resume(queue_id)
    click.echo(f"{info.queue_id}: {info.state}")


@queues.command()
@click.argument("queue_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_handled
def purge(ctx: click.Context, queue_id: str, yes: bool) -> None:
    """Delete every task of a queue."""
    admin = _admin(ctx)
    if not yes:
        click.confirm(f"Delete every task of {admin.settings.queue_path(queue_id)}?", abort=True)
    click.echo(f"{queue_id}: purged ({admin.purge(queue_id)} tasks counted before)")


# -- dead letters ----------------------------------------------------------------------


@cloudtasks.group("dead-letters")
def dead_letters() -> None:
    """Inspect, replay and purge the dead-letter queue (``dead_letter_queue``)."""


@dead_letters.command("list")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--traceback", "show_traceback", is_flag=True, help="Print each traceback.")
@click.pass_context
@_handled
def list_dead_letters(ctx: click.Context, limit: int, show_traceback: bool) -> None:
    """Dead-lettered tasks with their failure."""
    letters = _admin(ctx).list_dead_letters(limit)
    headers = ["CELERY ID", "TASK", "QUEUE", "ATTEMPTS", "REPLAYS", "REASON", "DEAD LETTER"]
    click.echo(_table(headers, [_letter_row(letter) for letter in letters]))
    for letter in letters:
        info = letter.info
        if info.get("exception_type") or letter.error:
            error = letter.error or f"{info.get('exception_type')}: {info.get('exception_message')}"
            click.echo(f"\n{_letter_id(letter)}: {error}")
        if show_traceback and info.get("traceback"):
            click.echo(str(info["traceback"]).rstrip())
    click.echo(
        f"\n{len(letters)} dead letter(s)" + (" (limit reached)" if len(letters) == limit else "")
    )


def _letter_row(letter: DeadLetter) -> list[Any]:
    info, env = letter.info, letter.envelope
    queue = str(info.get("cloudtasks_queue") or info.get("original_queue") or "").rsplit("/", 1)[-1]
    return [
        env.task_id if env else None,
        env.task_name if env else "(not a task)",
        queue or None,
        info.get("attempts"),
        letter.replays,
        str(info.get("reason") or "")[:60] or None,
        letter.short_name,
    ]


def _letter_id(letter: DeadLetter) -> str:
    return letter.envelope.task_id if letter.envelope else letter.short_name


@dead_letters.command()
@click.option("--limit", type=click.IntRange(1), default=None, help="Replay at most N.")
@click.option("--task", "only", multiple=True, help="Dead-letter task ID or Celery task ID.")
@click.pass_context
@_handled
def replay(ctx: click.Context, limit: int | None, only: tuple[str, ...]) -> None:
    """Re-enqueue dead letters into their original queues as new attempts."""
    report = _admin(ctx).replay_dead_letters(limit=limit, only=set(only) or None)
    rows = [
        [
            _letter_id(letter),
            letter.envelope.task_name if letter.envelope else None,
            result.queue,
            result.task_name.rsplit("/", 1)[-1],
        ]
        for letter, result in report.replayed
    ]
    click.echo(_table(["CELERY ID", "TASK", "QUEUE", "NEW CLOUD TASKS TASK"], rows))
    for letter, why in report.failed:
        click.echo(f"not replayed: {_letter_id(letter)}: {why}", err=True)
    if report.delete_error:
        click.echo(f"warning: {report.delete_error}", err=True)
    click.echo(
        f"{len(report.replayed)} replayed, {len(report.failed)} failed, "
        f"{len(report.not_deleted)} replayed but still in the dead-letter queue"
    )
    if not report.complete:
        raise click.exceptions.Exit(EXIT_INCOMPLETE)


@dead_letters.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_handled
def purge_dead_letters(ctx: click.Context, yes: bool) -> None:
    """Delete every dead letter."""
    admin = _admin(ctx)
    queue_id = admin.dead_letter_queue()
    if not yes:
        click.confirm(
            f"Delete every dead letter in {admin.settings.queue_path(queue_id)}?", abort=True
        )
    click.echo(f"{queue_id}: purged ({admin.purge_dead_letters()} dead letters counted before)")
