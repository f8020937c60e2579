"""Execute one Cloud Tasks delivery exactly as a Celery worker would.

The Celery message inside a :class:`~celery_cloudtasks.envelope.TaskEnvelope`
is decoded with an explicit accept list (JSON unless opted in; compression
refused unless opted in, and checked before anything is decompressed). Then,
as the worker's strategy and pool do: build the task's
:class:`celery.worker.request.Request` (``on_ack``/``on_reject`` record the
decision), check ``revoked()`` (expiry), fire ``task_received``, do the
``celery.worker.state`` bookkeeping, ``on_accepted``, run a tracer from
:func:`celery.app.trace.build_tracer` and hand its result to
``on_success``/``on_failure``. No eager ``apply()``, no ``Request.execute()``,
no solo pool.

One deliberate difference from a broker worker: an unhandled exception while
Cloud Tasks still has attempts left is stored as RETRY (with the exception) and
answered with a 5xx, so Cloud Tasks redelivers with its backoff. It is a
FAILURE on the final attempt, for exceptions in ``task.throws``, when the task
(or the transport option) sets ``retry_on_failure = False``, and when Celery's
own ``max_retries`` ran out inside ``self.retry()``.

The result is an :class:`ExecutionResult`; the endpoint maps it to HTTP.
"""

from __future__ import annotations

import enum
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from celery import signals, states
from celery._state import _set_current_app, _tls
from celery.app.task import Context
from celery.app.trace import TraceInfo, build_tracer
from celery.exceptions import InvalidTaskError, MaxRetriesExceededError, Reject, Retry
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from kombu.message import Message
from kombu.serialization import prepare_accept_content

from .decoding import decode_body
from .envelope import TaskEnvelope
from .errors import EnvelopeError

__all__ = [
    "DeliveryExecutor",
    "DeliveryMetadata",
    "ExecutionResult",
    "FailureInfo",
    "Outcome",
]

#: A delivery whose ETA is this far ahead is re-enqueued instead of run.
ETA_TOLERANCE_SECONDS = 1.0
_TRACEBACK_CHARS = 4_000


class Outcome(enum.Enum):
    """What happened to one delivery; the endpoint turns it into an HTTP status."""

    SUCCEEDED = "succeeded"  # SUCCESS stored: 2xx
    RETRY_SCHEDULED = "retry_scheduled"  # self.retry(): the next attempt is a new task: 2xx
    REDELIVER = "redeliver"  # unhandled exception, attempts left: RETRY stored, 5xx
    FAILED = "failed"  # FAILURE stored: 2xx
    REJECTED = "rejected"  # Reject(requeue=False): FAILURE, dead-lettered, 2xx
    REQUEUE = "requeue"  # Reject(requeue=True): 5xx
    IGNORED = "ignored"  # Ignore: 2xx
    REVOKED = "revoked"  # expired or revoked: REVOKED, not executed, 2xx
    UNKNOWN_TASK = "unknown_task"  # not registered here: 5xx, dead-lettered when final
    UNDELIVERABLE = "undeliverable"  # not decodable / not accepted: dead-lettered, 2xx
    NOT_DUE = "not_due"  # ETA ahead: re-enqueue for later, 2xx
    INTERNAL_ERROR = "internal_error"  # failure outside the task body: 503


#: Outcomes answered with a non-2xx status so that Cloud Tasks delivers again.
REDELIVERED = frozenset(
    {Outcome.REDELIVER, Outcome.REQUEUE, Outcome.UNKNOWN_TASK, Outcome.INTERNAL_ERROR}
)


@dataclass(frozen=True)
class DeliveryMetadata:
    """Cloud Tasks facts about one delivery (``X-CloudTasks-*``: metadata, never identity).

    Exposed to the task as ``task.request.cloudtasks`` (a dict of these fields).
    """

    queue: str = ""
    task_name: str = ""
    retry_count: int = 0
    execution_count: int = 0
    eta: float | None = None
    final_attempt: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FailureInfo:
    """An exception, reduced to what a log line or a dead letter needs."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> FailureInfo:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return cls(type(exc).__name__, str(exc)[:1000], "".join(lines)[-_TRACEBACK_CHARS:])


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one delivery and the Celery state it left (None: unchanged)."""

    outcome: Outcome
    task_id: str
    task_name: str
    state: str | None = None
    failure: FailureInfo | None = None
    dead_letter_reason: str | None = None
    eta: datetime | None = None
    runtime_seconds: float = 0.0

    @property
    def redeliver(self) -> bool:
        """Whether the endpoint should answer non-2xx (Cloud Tasks tries again)."""
        return self.outcome in REDELIVERED


def _raised_by_task_retry(exc: BaseException) -> bool:
    """Whether ``exc`` came out of ``Task.retry()`` (Celery's max_retries ran out)."""
    if isinstance(exc, MaxRetriesExceededError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "retry" and code.co_filename.endswith(
            os.path.join("celery", "app", "task.py")
        ):
            return True
        tb = tb.tb_next
    return False


def _terminal_reason(task: Any, req: Any, exc: Any, retry_on_failure: bool) -> str | None:
    """Why a failure is final (FAILURE now), or None if Cloud Tasks should redeliver."""
    meta = getattr(req, "cloudtasks", None)
    if not isinstance(meta, Mapping) or meta.get("final_attempt", True):
        return "final attempt failed"
    if isinstance(exc, tuple(task.throws or ())):
        return "expected"
    if not retry_on_failure or not getattr(task, "retry_on_failure", True):
        return "failed and retry_on_failure is False"
    if _raised_by_task_retry(exc):
        return "max_retries exceeded"
    return None


def _trace_info_class(retry_on_failure: bool) -> type[TraceInfo]:
    """A tracer ``Info`` that stores RETRY (not FAILURE) while Cloud Tasks will redeliver."""

    class DeliveryTraceInfo(TraceInfo):  # type: ignore[misc]
        state: str
        retval: Any
        redeliver: bool = False
        terminal: str | None = None

        def handle_error_state(
            self, task: Any, req: Any, eager: bool = False, call_errbacks: bool = True
        ) -> Any:
            if self.state == states.FAILURE:
                self.terminal = _terminal_reason(task, req, self.retval, retry_on_failure)
                if self.terminal is None:
                    self.redeliver = True
                    self.state = states.RETRY
                    self.retval = Retry(exc=self.retval)
            return super().handle_error_state(task, req, eager=eager, call_errbacks=call_errbacks)

    return DeliveryTraceInfo


class _Decision:
    """Records what the Request did with its "message": ack, or reject (requeue?)."""

    def __init__(self) -> None:
        self.acked = False
        self.requeue: bool | None = None

    def on_ack(self, logger: Any, connection_errors: Any) -> None:
        self.acked = True

    def on_reject(self, logger: Any, connection_errors: Any, requeue: bool = False) -> None:
        self.requeue = bool(requeue)


def _custom_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """What Celery's Context would call custom headers, computed without ``cloudtasks``."""
    celery_keys = {*Context.__dict__, "lang", "task", "argsrepr", "kwargsrepr", "compression"}
    return {k: v for k, v in headers.items() if k not in celery_keys and k != "cloudtasks"}


@contextmanager
def _current_app(app: Any) -> Iterator[None]:
    """Make ``app`` the current Celery app of this thread for one delivery (as a worker does)."""
    previous = _tls.current_app
    _set_current_app(app)
    try:
        yield
    finally:
        _set_current_app(previous)


def _parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class DeliveryExecutor:
    """Runs deliveries of one Celery app; thread-safe, tracers cached per task."""

    def __init__(
        self,
        app: Any,
        *,
        accept_content: Sequence[str] = ("json",),
        allow_compression: bool = False,
        retry_on_failure: bool = True,
        clock: Callable[[], float] = time.time,
        hostname: str | None = None,
    ) -> None:
        self.app = app
        self.accept_content = tuple(accept_content)
        prepare_accept_content(self.accept_content)  # unknown serializer: fail at start-up
        self.allow_compression = allow_compression
        self.clock = clock
        self.hostname = hostname or f"cloudtasks@{socket.gethostname()}"
        self._info_class = _trace_info_class(retry_on_failure)
        self._tracers: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def tracer(self, task: Any) -> Any:
        """The tracer for ``task`` (built once; rebuilt if the registry changed)."""
        cached = self._tracers.get(task.name)
        if cached is not None and cached[0] is task:
            return cached[1]
        with self._lock:
            tracer = build_tracer(
                task.name,
                task,
                app=self.app,
                hostname=self.hostname,
                eager=False,
                Info=self._info_class,
            )
            self._tracers[task.name] = (task, tracer)
            return tracer

    def execute(self, envelope: TaskEnvelope, meta: DeliveryMetadata) -> ExecutionResult:
        """Run one delivery; never raises for anything a delivery can carry."""
        message = envelope.message
        task_id, name = envelope.task_id, envelope.task_name
        try:
            body = decode_body(
                message, accept=self.accept_content, allow_compression=self.allow_compression
            )
        except EnvelopeError as exc:
            return ExecutionResult(
                Outcome.UNDELIVERABLE,
                task_id,
                name,
                failure=FailureInfo("EnvelopeError", str(exc)),
                dead_letter_reason=f"undeliverable: {exc}",
            )
        task = self.app.tasks.get(name)
        if task is None:
            return ExecutionResult(
                Outcome.UNKNOWN_TASK,
                task_id,
                name,
                failure=FailureInfo("NotRegistered", f"task {name!r} is not registered here"),
                dead_letter_reason=f"task {name!r} is not registered in this worker",
            )
        now = self.clock()
        eta = _parse_time(envelope.headers.get("eta"))
        if eta is not None and eta.timestamp() - now > ETA_TOLERANCE_SECONDS:
            return ExecutionResult(Outcome.NOT_DUE, task_id, name, eta=eta)
        with _current_app(self.app):
            return self._run(task, envelope, body, meta, now)

    def _request(
        self, task: Any, envelope: TaskEnvelope, body: Any, meta: DeliveryMetadata, now: float
    ) -> tuple[Any, _Decision]:
        message = envelope.message
        headers = {k: v for k, v in envelope.headers.items() if k != "compression"}
        headers["cloudtasks"] = meta.as_dict()
        headers["headers"] = _custom_headers(headers)
        properties = dict(message.get("properties") or {})
        delivery_info = dict(properties.get("delivery_info") or {})
        delivery_info.setdefault("routing_key", envelope.queue)
        delivery_info["redelivered"] = meta.retry_count > 0
        delivery_info["priority"] = properties.get("priority")
        properties["delivery_info"] = delivery_info
        kombu_message = Message(
            body=message.get("body"),
            content_type=message.get("content-type"),
            content_encoding=message.get("content-encoding"),
            delivery_info=delivery_info,
            properties=properties,
            headers=headers,
        )
        decision = _Decision()
        request_cls = symbol_by_name(task.Request)
        req = request_cls(
            kombu_message,
            on_ack=decision.on_ack,
            on_reject=decision.on_reject,
            app=self.app,
            hostname=self.hostname,
            eventer=None,
            task=task,
            connection_errors=(),
            body=body,
            headers=headers,
            decoded=True,
            utc=True,
        )
        if req.expires is not None and self.clock is not time.time:
            # Judge expiry by this executor's clock (tests move it), in the Request's terms.
            left = req.expires.timestamp() - now
            req.expires = datetime.fromtimestamp(time.time() + left, tz=timezone.utc)
        return req, decision

    def _run(
        self, task: Any, envelope: TaskEnvelope, body: Any, meta: DeliveryMetadata, now: float
    ) -> ExecutionResult:
        task_id, name = envelope.task_id, envelope.task_name
        try:
            req, decision = self._request(task, envelope, body, meta, now)
        except InvalidTaskError as exc:
            return ExecutionResult(
                Outcome.UNDELIVERABLE,
                task_id,
                name,
                failure=FailureInfo.from_exception(exc),
                dead_letter_reason=f"undeliverable: {exc}",
            )
        try:
            if (req.expires or req.id in worker_state.revoked) and req.revoked():
                return ExecutionResult(Outcome.REVOKED, task_id, name, state=states.REVOKED)
            signals.task_received.send(sender=self, request=req)
            worker_state.task_reserved(req)
            if req.revoked():
                return ExecutionResult(Outcome.REVOKED, task_id, name, state=states.REVOKED)
            req.on_accepted(os.getpid(), time.monotonic())
            args, kwargs, embed = body
            request = req.request_dict
            request.update(
                {"args": args, "kwargs": kwargs, "hostname": self.hostname, "is_eager": False},
                **embed,
            )
            started = time.monotonic()
            retval, info, runtime, retstr = self.tracer(task)(req.id, args, kwargs, request)
            req.on_success((1, retval, runtime) if info else (0, retstr, runtime))
        except Reject as exc:  # raised past the tracer (e.g. a failed dedup re-dispatch)
            worker_state.task_ready(req)
            outcome = Outcome.REQUEUE if exc.requeue else Outcome.REJECTED
            return ExecutionResult(outcome, task_id, name, failure=FailureInfo.from_exception(exc))
        except Exception as exc:
            # The tracer could not even record the failure (e.g. result backend down).
            worker_state.task_ready(req)
            return ExecutionResult(
                Outcome.INTERNAL_ERROR, task_id, name, failure=FailureInfo.from_exception(exc)
            )
        runtime_seconds = time.monotonic() - started
        result = _result_of(task_id, name, info, retval, decision)
        return replace(result, runtime_seconds=runtime_seconds)


def _failure_of(retval: Any) -> FailureInfo | None:
    """The exception the tracer reported (unwrapping Retry and pickling wrappers)."""
    exc = getattr(retval, "exception", None)
    if isinstance(exc, Retry) or not isinstance(exc, BaseException):
        exc = getattr(exc, "exc", exc)  # Retry.exc, or billiard's ExceptionWithTraceback.exc
    if exc is None:
        return None
    tb = getattr(retval, "traceback", None)
    return FailureInfo(
        type(exc).__name__, str(exc)[:1000], tb[-_TRACEBACK_CHARS:] if isinstance(tb, str) else ""
    )


def _result_of(
    task_id: str, name: str, info: Any, retval: Any, decision: _Decision
) -> ExecutionResult:
    """Turn the tracer's ``(R, I)`` and the recorded ack/reject into an ExecutionResult."""
    if info is None:
        if decision.requeue:
            return ExecutionResult(Outcome.REQUEUE, task_id, name)
        return ExecutionResult(Outcome.SUCCEEDED, task_id, name, states.SUCCESS)
    failure = _failure_of(retval)
    state = info.state
    if getattr(retval, "internal", False) and state in (states.FAILURE, states.RETRY):
        return ExecutionResult(Outcome.INTERNAL_ERROR, task_id, name, state, failure)
    if state == states.RETRY:
        redeliver = getattr(info, "redeliver", False)
        outcome = Outcome.REDELIVER if redeliver else Outcome.RETRY_SCHEDULED
        return ExecutionResult(outcome, task_id, name, states.RETRY, failure)
    if state == states.REJECTED:
        if getattr(info.retval, "requeue", False) or decision.requeue:
            return ExecutionResult(Outcome.REQUEUE, task_id, name, None, failure)
        reason = f"rejected by the task: {info.retval!r}"
        return ExecutionResult(Outcome.REJECTED, task_id, name, states.FAILURE, failure, reason)
    if state == states.IGNORED:
        return ExecutionResult(Outcome.IGNORED, task_id, name, states.IGNORED)
    terminal = getattr(info, "terminal", None)
    if decision.requeue:
        return ExecutionResult(Outcome.REQUEUE, task_id, name, states.FAILURE, failure)
    reason_ = None if terminal in (None, "expected") else str(terminal)
    return ExecutionResult(Outcome.FAILED, task_id, name, states.FAILURE, failure, reason_)
