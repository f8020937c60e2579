"""The HTTP contract of the push endpoint, one test per row of the README table.

Each test checks the status Cloud Tasks sees, the state stored in the result
backend and whether the delivery was dead-lettered.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import Ignore, Reject
from fixtures_endpoint import DOWN_BACKEND, SMALL_RETRY

from celery_cloudtasks.testing import CloudTasksHarness


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("contract", set_as_current=False, backend="cache+memory://")
    yield app
    app.close()


@pytest.fixture
def ct(app: Celery) -> Iterator[CloudTasksHarness]:
    with CloudTasksHarness(app, retry=SMALL_RETRY) as harness:
        yield harness


def task(app: Celery, **options: Any) -> Any:
    return app.task(shared=False, **options)


def counting_task(app: Celery, runs: list[int], **options: Any) -> Any:
    """A task that records each run in ``runs``."""

    def job(*args: Any) -> int:
        runs.append(1)
        return len(runs)

    return task(app, name=options.pop("name", "job"), **options)(job)


def test_success_is_2xx(app: Celery, ct: CloudTasksHarness) -> None:
    @task(app)
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 2)
    assert ct.deliver_next() == 200
    assert result.state == states.SUCCESS and result.get(timeout=0) == 4
    assert ct.dead_letters == [] and ct.pending == []


def test_self_retry_is_2xx_and_schedules_a_new_task(app: Celery, ct: CloudTasksHarness) -> None:
    @task(app, bind=True)
    def poll(self: Any) -> str:
        if self.request.retries < 1:
            raise self.retry(countdown=120)
        return "ready"

    result = poll.delay()
    assert ct.deliver_next() == 200
    assert result.state == states.RETRY
    [nxt] = ct.pending
    assert (
        nxt.envelope.retries == 1 and nxt.task_id != ct.queues.queue("celery").completed[0].task_id
    )
    assert nxt.schedule_time - ct.clock() == pytest.approx(120, abs=2)
    ct.run_until_idle()
    assert result.get(timeout=0) == "ready" and ct.dead_letters == []


def test_unhandled_exception_with_attempts_left_is_5xx(app: Celery, ct: CloudTasksHarness) -> None:
    @task(app)
    def flaky() -> None:
        raise ConnectionError("upstream down")

    result = flaky.delay()
    assert ct.deliver_next() == 500
    assert result.state == states.RETRY and isinstance(result.result, ConnectionError)
    assert ct.dead_letters == [] and len(ct.pending) == 1  # Cloud Tasks will redeliver


def test_final_attempt_failure_is_2xx_failure_errback_dead_letter(
    app: Celery, ct: CloudTasksHarness
) -> None:
    errbacks: list[str] = []

    @task(app)
    def on_error(request: Any, exc: Any, tb: Any) -> None:
        errbacks.append(request.id)

    @task(app)
    def broken() -> float:
        return 1 / 0

    result = broken.apply_async(link_error=on_error.s())
    assert [ct.deliver_next(), ct.deliver_next(), ct.deliver_next()] == [500, 500, 200]
    assert result.state == states.FAILURE and isinstance(result.result, ZeroDivisionError)
    ct.run_until_idle()
    assert errbacks == [result.id]
    [dead] = ct.dead_letters
    assert dead.task_id == result.id and dead.dead_letter["attempts"] == 3
    assert dead.dead_letter["exception_type"] == "ZeroDivisionError"
    assert "final attempt" in dead.dead_letter["reason"]


@pytest.mark.parametrize("how", ["throws", "task_attribute", "transport_option"])
def test_expected_or_opted_out_failure_is_2xx_failure(app: Celery, how: str) -> None:
    options: dict[str, Any] = {}
    if how == "throws":
        options["throws"] = (KeyError,)
    elif how == "task_attribute":
        options["retry_on_failure"] = False
    transport = {"retry_on_failure": False} if how == "transport_option" else {}
    with CloudTasksHarness(app, retry=SMALL_RETRY, transport_options=transport) as ct:

        @task(app, **options)
        def lookup() -> None:
            raise KeyError("missing")

        result = lookup.delay()
        assert ct.deliver_next() == 200
        assert result.state == states.FAILURE and ct.pending == []
        # Expected exceptions are outcomes, not incidents; an opt-out is dead-lettered.
        assert len(ct.dead_letters) == (0 if how == "throws" else 1)


@pytest.mark.parametrize(
    ("raised", "status", "state", "dead"),
    [
        (Reject("again", requeue=True), 500, states.PENDING, 0),
        (Reject("never", requeue=False), 200, states.FAILURE, 1),
        (Ignore(), 200, states.PENDING, 0),
    ],
    ids=["reject-requeue", "reject-drop", "ignore"],
)
def test_reject_and_ignore(
    app: Celery, ct: CloudTasksHarness, raised: Exception, status: int, state: str, dead: int
) -> None:
    @task(app)
    def refuse() -> None:
        raise raised

    result = refuse.delay()
    assert ct.deliver_next() == status
    assert result.state == state and len(ct.dead_letters) == dead


def test_expired_is_2xx_revoked_not_run(app: Celery, ct: CloudTasksHarness) -> None:
    runs: list[int] = []
    job = counting_task(app, runs)
    result = job.apply_async(expires=30)
    ct.advance(60)
    assert ct.deliver_next() == 200
    assert result.state == states.REVOKED and runs == [] and ct.dead_letters == []


def test_unknown_task_is_5xx_then_dead_lettered(app: Celery, ct: CloudTasksHarness) -> None:
    result = app.send_task("proj.tasks.deployed_tomorrow", args=(1,))
    assert [ct.deliver_next(), ct.deliver_next(), ct.deliver_next()] == [500, 500, 200]
    assert result.state == states.PENDING
    [dead] = ct.dead_letters
    assert dead.task_name == "proj.tasks.deployed_tomorrow" and "final attempt" in str(
        dead.dead_letter["reason"]
    )


@pytest.mark.parametrize("body", ["garbage", "pickle", "not-celery"])
def test_undecodable_body_is_dead_lettered_2xx(
    app: Celery, ct: CloudTasksHarness, body: str
) -> None:
    runs: list[int] = []
    job = counting_task(app, runs)
    result = job.delay()
    [pending] = ct.pending
    envelope = pending.envelope.to_dict()
    if body == "garbage":
        data = b"\x00not json at all"
    elif body == "pickle":
        envelope["message"]["content-type"] = "application/x-python-serialize"
        envelope["message"]["body"] = base64.b64encode(b"cos\nsystem\n(S'true'\ntR.").decode()
        data = json.dumps(envelope).encode()
    else:
        data = json.dumps({"v": 1, "hello": "world"}).encode()
    response = ct.test_client().post("/_cloudtasks", data=data)
    assert response.status_code == 200
    assert runs == [] and result.state == states.PENDING
    [dead] = ct.dead_letters
    assert dead.dead_letter["reason"].startswith("undeliverable")
    assert b"Traceback" not in response.data


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
def test_failure_outside_the_body_is_503_with_retry_after() -> None:
    app = Celery("down", set_as_current=False, backend=DOWN_BACKEND)
    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:
        counting_task(app, []).delay()
        [pending] = ct.pending
        response = ct.test_client().post("/_cloudtasks", data=pending.body)
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        assert b"Traceback" not in response.data and ct.dead_letters == []


@pytest.mark.parametrize("days", [0.01, 45])
def test_eta_not_reached_is_reenqueued_2xx(app: Celery, ct: CloudTasksHarness, days: float) -> None:
    runs: list[int] = []
    job = counting_task(app, runs)
    result = job.apply_async(countdown=days * 86400)
    [first] = ct.pending
    response = ct.test_client().post("/_cloudtasks", data=first.body)  # early delivery
    assert response.status_code == 200 and runs == []
    assert result.state == states.PENDING
    later = [t for t in ct.pending if t.task_id != first.task_id]
    assert len(later) == 1 and later[0].envelope.task_id == result.id
    assert later[0].schedule_time > ct.clock()
    ct.queues.queue("celery").delete(first.task_id)
    ct.run_until_idle()
    assert runs == [1] and result.state == states.SUCCESS


def test_missing_or_invalid_token_is_401_nothing_run(app: Celery) -> None:
    from oidc_support import CertsServer, TokenMinter

    minter = TokenMinter()
    with CertsServer(minter.certs()) as certs:
        config = {
            "CLOUDTASKS_VERIFY_OIDC": True,
            "CLOUDTASKS_OIDC_AUDIENCE": "https://worker.example/_cloudtasks",
            "CLOUDTASKS_OIDC_SERVICE_ACCOUNTS": "tasks@proj.iam.gserviceaccount.com",
            "CLOUDTASKS_OIDC_CERTS_URL": certs.url,
        }
        with CloudTasksHarness(app, retry=SMALL_RETRY, endpoint_config=config) as ct:
            runs: list[int] = []
            counting_task(app, runs).delay()
            [pending] = ct.pending
            client = ct.test_client()
            assert client.post("/_cloudtasks", data=pending.body).status_code == 401
            bad = {"Authorization": "Bearer not.a.token"}
            response = client.post("/_cloudtasks", data=pending.body, headers=bad)
            assert response.status_code == 401 and runs == []
            assert json.loads(response.data) == {"error": "unauthorized"}


def test_body_over_the_cap_is_413(app: Celery) -> None:
    with CloudTasksHarness(
        app, retry=SMALL_RETRY, endpoint_config={"CLOUDTASKS_MAX_BODY_BYTES": 1000}
    ) as ct:
        response = ct.test_client().post("/_cloudtasks", data=b"x" * 1001)
        assert response.status_code == 413 and ct.dead_letters == []


def test_chunked_body_the_server_cannot_read_is_411_not_a_dead_letter() -> None:
    from celery import Celery

    from celery_cloudtasks.flask import create_app

    app = Celery("chunked", broker="cloudtasks://projects/p/locations/l")
    app.conf.broker_transport_options = {"push_url": "http://h/_cloudtasks"}
    client = create_app(app, verify_oidc=False).test_client()
    response = client.post(
        "/_cloudtasks",
        data=b'{"v": 1}',
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": False},
    )
    assert response.status_code == 411
