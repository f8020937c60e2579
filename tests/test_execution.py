"""Executing deliveries through Celery's worker machinery: stored states, signals, requests."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import pickle
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import signals, states
from celery.exceptions import Ignore, Reject
from celery.worker import state as worker_state
from fixtures_endpoint import (
    DOWN_BACKEND,
    iter_signal,
    make_app,
    sqlite_backend,
    take,
    with_message,
)

from celery_cloudtasks.decoding import decode_body
from celery_cloudtasks.errors import EnvelopeError
from celery_cloudtasks.execution import DeliveryExecutor, DeliveryMetadata, Outcome
from celery_cloudtasks.memory import ManualClock

collect = contextlib.contextmanager(iter_signal)


@pytest.fixture
def env() -> Iterator[Any]:
    app, queues = make_app()
    calls: list[Any] = []

    @app.task(shared=False, bind=True)
    def add(self: Any, x: int, y: int) -> int:
        calls.append(self.request)
        return x + y

    @app.task(shared=False)
    def boom() -> None:
        calls.append("boom")
        raise ValueError("boom")

    @app.task(shared=False, throws=(KeyError,))
    def expected() -> None:
        raise KeyError("expected")

    @app.task(shared=False, retry_on_failure=False)
    def no_retry() -> None:
        raise ValueError("once")

    @app.task(shared=False, bind=True, max_retries=2)
    def retrying(self: Any, n: int) -> int:
        calls.append(n)
        if n < 3:
            raise self.retry(args=(n + 1,), countdown=30)
        return n

    @app.task(shared=False, bind=True, max_retries=0)
    def exhausted(self: Any) -> None:
        try:
            raise OSError("flaky")
        except OSError as exc:
            raise self.retry(exc=exc) from exc

    @app.task(shared=False)
    def reject(requeue: bool) -> None:
        raise Reject("no", requeue=requeue)

    @app.task(shared=False)
    def ignore() -> None:
        raise Ignore()

    class Env:
        pass

    e = Env()
    e.app, e.queues, e.calls = app, queues, calls
    e.executor = DeliveryExecutor(app, clock=queues.clock)
    e.tasks = {t.__name__: t for t in (add, boom, expected, no_retry, retrying, exhausted)}
    e.tasks.update(reject=reject, ignore=ignore)
    yield e
    app.close()


def run(
    env: Any, *, retry_count: int = 0, final: bool = False, envelope: Any = None, **meta: Any
) -> Any:
    if envelope is None:
        envelope = take(env.queues).envelope
    env.last = envelope
    meta = DeliveryMetadata(
        queue="celery", task_name="t", retry_count=retry_count, final_attempt=final, **meta
    )
    return env.executor.execute(envelope, meta)


def test_success_stores_result_and_exposes_worker_request(env: Any) -> None:
    with collect(signals.task_received) as received, collect(signals.task_success) as success:
        result = env.tasks["add"].apply_async((2, 3), priority=4, headers={"tenant": "t1"})
        outcome = run(env, execution_count=0, eta=None)
    assert outcome.outcome is Outcome.SUCCEEDED and outcome.state == states.SUCCESS
    assert result.get(timeout=1) == 5
    request = env.calls[0]
    assert request.id == result.id and request.root_id == result.id and request.retries == 0
    assert request.delivery_info["redelivered"] is False
    assert request.delivery_info["priority"] == 4
    assert request.delivery_info["routing_key"] == "celery"
    assert request.properties["priority"] == 4
    assert request.headers == {"tenant": "t1"}
    assert request.cloudtasks["queue"] == "celery" and request.cloudtasks["retry_count"] == 0
    assert request.hostname.startswith("cloudtasks@")
    assert request.is_eager is False
    assert [r["request"].id for r in received] == [result.id]
    assert len(success) == 1
    assert not worker_state.active_requests and result.id not in worker_state.requests


def test_worker_state_counts_accepted_tasks(env: Any) -> None:
    before = worker_state.total_count[env.tasks["add"].name]
    env.tasks["add"].delay(1, 1)
    run(env)
    assert worker_state.total_count[env.tasks["add"].name] == before + 1


def test_retry_count_sets_redelivered(env: Any) -> None:
    env.tasks["add"].delay(1, 1)
    run(env, retry_count=2)
    assert env.calls[0].delivery_info["redelivered"] is True
    assert env.calls[0].cloudtasks["retry_count"] == 2


def test_unhandled_exception_with_attempts_left_is_retry_then_failure(env: Any) -> None:
    with collect(signals.task_retry) as retried, collect(signals.task_failure) as failed:
        result = env.tasks["boom"].delay()
        first = run(env)
        assert first.outcome is Outcome.REDELIVER and first.redeliver
        assert result.state == states.RETRY and isinstance(result.result, ValueError)
        assert len(retried) == 1 and not failed
        last = run(env, retry_count=2, final=True, envelope=env.last)  # delivered again
    assert last.outcome is Outcome.FAILED and not last.redeliver
    assert last.dead_letter_reason == "final attempt failed"
    assert last.failure is not None and last.failure.type == "ValueError"
    assert result.state == states.FAILURE and len(failed) == 1


def test_final_failure_runs_errbacks(env: Any) -> None:
    errback = env.tasks["add"].si(10, 10)
    env.tasks["boom"].apply_async(link_error=errback)
    run(env, final=True)
    follow_up = take(env.queues)
    assert follow_up.envelope.task_name == env.tasks["add"].name


def test_throws_and_opt_out_fail_at_once(env: Any) -> None:
    expected = env.tasks["expected"].delay()
    outcome = run(env)
    assert outcome.outcome is Outcome.FAILED and outcome.dead_letter_reason is None
    assert expected.state == states.FAILURE
    opted_out = env.tasks["no_retry"].delay()
    outcome = run(env)
    assert outcome.outcome is Outcome.FAILED and opted_out.state == states.FAILURE
    assert "retry_on_failure" in (outcome.dead_letter_reason or "")


def test_transport_option_retry_on_failure_false() -> None:
    app, queues = make_app(retry_on_failure=False)

    @app.task(shared=False)
    def fails() -> None:
        raise ValueError("x")

    result = fails.delay()
    executor = DeliveryExecutor(app, retry_on_failure=False)
    outcome = executor.execute(take(queues).envelope, DeliveryMetadata())
    assert outcome.outcome is Outcome.FAILED and result.state == states.FAILURE


def test_self_retry_publishes_next_attempt_with_changed_args(env: Any) -> None:
    result = env.tasks["retrying"].delay(1)
    outcome = run(env)
    assert outcome.outcome is Outcome.RETRY_SCHEDULED and not outcome.redeliver
    assert result.state == states.RETRY
    nxt = env.queues.queue("celery").tasks[0]
    assert nxt.envelope.retries == 1 and nxt.envelope.task_id == result.id
    assert nxt.schedule_time - env.queues.clock() == pytest.approx(30, abs=2)
    assert run(env).outcome is Outcome.NOT_DUE  # delivered early: not run
    env.queues.clock.advance(31)
    assert run(env, envelope=env.last).outcome is Outcome.RETRY_SCHEDULED
    env.queues.clock.advance(31)
    assert run(env).outcome is Outcome.SUCCEEDED
    assert env.calls == [1, 2, 3] and result.get(timeout=1) == 3


def test_max_retries_exceeded_is_final(env: Any) -> None:
    result = env.tasks["exhausted"].delay()
    outcome = run(env)
    assert outcome.outcome is Outcome.FAILED and result.state == states.FAILURE
    assert outcome.dead_letter_reason == "max_retries exceeded"


@pytest.mark.parametrize(
    ("requeue", "expected", "state"),
    [(True, Outcome.REQUEUE, states.PENDING), (False, Outcome.REJECTED, states.FAILURE)],
)
def test_reject(env: Any, requeue: bool, expected: Outcome, state: str) -> None:
    result = env.tasks["reject"].delay(requeue)
    outcome = run(env)
    assert outcome.outcome is expected and result.state == state
    assert outcome.redeliver is requeue


def test_ignore(env: Any) -> None:
    result = env.tasks["ignore"].delay()
    outcome = run(env)
    assert outcome.outcome is Outcome.IGNORED and not outcome.redeliver
    assert result.state == states.PENDING


def test_expired_task_is_revoked_not_run(env: Any) -> None:
    with collect(signals.task_revoked) as revoked:
        result = env.tasks["add"].apply_async((1, 2), expires=60)
        env.queues.clock.advance(120)
        outcome = run(env)
    assert outcome.outcome is Outcome.REVOKED and result.state == states.REVOKED
    assert env.calls == [] and revoked[0]["expired"] is True


def test_expiry_follows_the_executor_clock() -> None:
    clock = ManualClock()
    app, queues = make_app(clock=clock)

    @app.task(shared=False)
    def noop() -> str:
        return "ran"

    result = noop.apply_async(expires=60)
    clock.advance(120)
    outcome = DeliveryExecutor(app, clock=clock).execute(take(queues).envelope, DeliveryMetadata())
    assert outcome.outcome is Outcome.REVOKED and result.state == states.REVOKED


def test_eta_not_reached_is_not_run(env: Any) -> None:
    env.tasks["add"].apply_async((1, 2), countdown=600)
    outcome = run(env)
    assert outcome.outcome is Outcome.NOT_DUE and outcome.eta is not None
    assert env.calls == []


def test_unknown_task(env: Any) -> None:
    result = env.app.send_task("not.registered")
    outcome = run(env)
    assert outcome.outcome is Outcome.UNKNOWN_TASK and outcome.redeliver
    assert result.state == states.PENDING


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
def test_backend_down_is_internal_error() -> None:
    producer, queues = make_app()
    worker, _ = make_app(DOWN_BACKEND)

    def ok() -> int:
        return 1

    for app in (producer, worker):
        app.task(shared=False, name="ok")(ok)
    producer.send_task("ok")
    outcome = DeliveryExecutor(worker).execute(take(queues).envelope, DeliveryMetadata())
    assert outcome.outcome is Outcome.INTERNAL_ERROR and outcome.redeliver
    assert not worker_state.active_requests


def test_deduplicate_successful_tasks_on_redelivery(tmp_path: Path) -> None:
    app, queues = make_app(sqlite_backend(tmp_path))
    app.conf.worker_deduplicate_successful_tasks = True
    runs: list[int] = []

    @app.task(shared=False, acks_late=True)
    def once() -> int:
        runs.append(1)
        return 7

    result = once.delay()
    envelope = take(queues).envelope
    executor = DeliveryExecutor(app)
    assert executor.execute(envelope, DeliveryMetadata()).outcome is Outcome.SUCCEEDED
    worker_state.successful_requests.clear()  # a different instance answers the redelivery
    again = executor.execute(envelope, DeliveryMetadata(retry_count=1))
    assert again.outcome is Outcome.SUCCEEDED and runs == [1] and result.get(timeout=1) == 7


def test_chain_publishes_next_step_with_fixed_id(env: Any) -> None:
    add = env.tasks["add"]
    result = (add.s(1, 2) | add.s(10)).delay()
    run(env)
    step = take(env.queues)
    assert step.envelope.task_id == result.id
    env.executor.execute(step.envelope, DeliveryMetadata())
    assert result.get(timeout=1) == 13


def test_current_app_is_the_executing_app(env: Any) -> None:
    from celery import current_app

    seen: list[Any] = []

    @env.app.task(shared=False)
    def which() -> None:
        seen.append(current_app._get_current_object())

    which.delay()
    run(env)
    assert seen == [env.app]


# -- decoding -----------------------------------------------------------------------


def _message(env: Any) -> Any:
    env.tasks["add"].delay(1, 2)
    return take(env.queues).envelope


def test_pickle_refused_even_if_celery_accepts_it(env: Any) -> None:
    env.app.conf.accept_content = ["json", "pickle"]
    raw = pickle.dumps([[1, 2], {}, {}])
    envelope = with_message(
        _message(env),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        body=base64.b64encode(raw).decode(),
    )
    outcome = env.executor.execute(envelope, DeliveryMetadata())
    assert outcome.outcome is Outcome.UNDELIVERABLE and "not accepted" in outcome.failure.message
    assert env.calls == []


def test_pickle_only_when_opted_in(env: Any) -> None:
    raw = pickle.dumps([[1, 2], {}, {}])
    envelope = with_message(
        _message(env),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        body=base64.b64encode(raw).decode(),
    )
    executor = DeliveryExecutor(env.app, accept_content=("json", "pickle"))
    assert executor.execute(envelope, DeliveryMetadata()).outcome is Outcome.SUCCEEDED


def test_compression_refused_unless_allowed(env: Any) -> None:
    envelope = _message(env)
    headers = dict(envelope.message["headers"], compression="application/x-gzip")
    body = base64.b64encode(zlib.compress(json.dumps([[1, 2], {}, {}]).encode())).decode()
    compressed = with_message(envelope, headers=headers, body=body)
    refused = env.executor.execute(compressed, DeliveryMetadata())
    assert refused.outcome is Outcome.UNDELIVERABLE and "compress" in refused.failure.message
    allowed = DeliveryExecutor(env.app, allow_compression=True)
    assert allowed.execute(compressed, DeliveryMetadata()).outcome is Outcome.SUCCEEDED


@pytest.mark.parametrize(
    "change",
    [
        {"body": "%%% not base64 %%%"},
        {"body": base64.b64encode(b"{not json").decode()},
        {"body": base64.b64encode(b'{"a": 1}').decode()},
        {"body": base64.b64encode(b"[1, 2, 3]").decode()},
        {"content_type": None},
        {"content_type": "application/data"},
        {"properties": {"body_encoding": "rot13"}},
    ],
)
def test_undecodable_bodies_are_undeliverable(env: Any, change: dict[str, Any]) -> None:
    envelope = with_message(_message(env), **change)
    outcome = env.executor.execute(envelope, DeliveryMetadata())
    assert outcome.outcome is Outcome.UNDELIVERABLE and outcome.dead_letter_reason
    assert env.calls == []


def test_decode_body_never_decompresses_before_checking_content_type() -> None:
    bomb = base64.b64encode(gzip.compress(b"0" * 10_000_000)).decode()
    message = {
        "body": bomb,
        "content-type": "application/x-python-serialize",
        "content-encoding": "binary",
        "headers": {"compression": "application/x-gzip"},
        "properties": {"body_encoding": "base64"},
    }
    with pytest.raises(EnvelopeError, match="not accepted"):
        decode_body(message, accept=("json",), allow_compression=True)


def test_retry_after_countdown_lands_in_future(env: Any) -> None:
    env.tasks["retrying"].delay(1)
    run(env)
    nxt = env.queues.queue("celery").tasks[0]
    eta = datetime.fromisoformat(nxt.envelope.headers["eta"])
    assert eta - datetime.now(timezone.utc) > timedelta(seconds=20)
