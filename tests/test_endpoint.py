"""The Flask push endpoint: OIDC, configuration, routing, metadata, dead letters, canvas."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, states
from fixtures_endpoint import SMALL_RETRY, iter_signal, sqlite_backend
from flask import Flask
from oidc_support import DEFAULT_AUDIENCE, DEFAULT_EMAIL, CertsServer, TokenMinter

from celery_cloudtasks.deadletter import task_dead_lettered
from celery_cloudtasks.errors import ConfigurationError
from celery_cloudtasks.flask import CloudTasksPush, create_app
from celery_cloudtasks.testing import CloudTasksHarness

AUDIENCE = DEFAULT_AUDIENCE


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("endpoint", set_as_current=False, backend="cache+memory://")
    yield app
    app.close()


@pytest.fixture(scope="module")
def minter() -> TokenMinter:
    return TokenMinter()


@pytest.fixture(scope="module")
def certs(minter: TokenMinter) -> Iterator[CertsServer]:
    with CertsServer(minter.certs()) as server:
        yield server


def oidc_config(certs: CertsServer) -> dict[str, Any]:
    return {
        "CLOUDTASKS_VERIFY_OIDC": True,
        "CLOUDTASKS_OIDC_AUDIENCE": AUDIENCE,
        "CLOUDTASKS_OIDC_SERVICE_ACCOUNTS": [DEFAULT_EMAIL],
        "CLOUDTASKS_OIDC_CERTS_URL": certs.url,
    }


def counting(app: Celery, runs: list[Any], name: str = "job") -> Any:
    @app.task(shared=False, name=name, bind=True)
    def job(self: Any, *args: Any) -> int:
        runs.append(self.request)
        return len(runs)

    return job


# -- OIDC --------------------------------------------------------------------------


def _bad_signature(minter: TokenMinter) -> str:
    other = TokenMinter(kid=minter.kid)  # same key id, different key
    return other.mint()


def _alg_none(minter: TokenMinter) -> str:
    from oidc_support import b64url

    header = b64url(json.dumps({"alg": "none", "kid": minter.kid}).encode())
    payload = b64url(json.dumps(minter.claims()).encode())
    return f"{header}.{payload}."


REFUSED = {
    "wrong audience": (lambda m: m.mint(audience="https://other.example/"), 401),
    "wrong issuer": (lambda m: m.mint(issuer="https://evil.example"), 401),
    "wrong email": (lambda m: m.mint(email="intruder@proj.iam.gserviceaccount.com"), 403),
    "unverified email": (lambda m: m.mint(email_verified=False), 403),
    "expired": (lambda m: m.mint(iat=time.time() - 7200, exp=time.time() - 3600), 401),
    "not yet valid": (lambda m: m.mint(iat=time.time() + 3600, exp=time.time() + 7200), 401),
    "bad signature": (_bad_signature, 401),
    "alg none": (_alg_none, 401),
    "garbage": (lambda m: "garbage", 401),
    "missing": (None, 401),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_tokens_run_nothing_and_reveal_nothing(
    app: Celery, minter: TokenMinter, certs: CertsServer, case: str
) -> None:
    make, status = REFUSED[case]
    runs: list[Any] = []
    with CloudTasksHarness(app, retry=SMALL_RETRY, endpoint_config=oidc_config(certs)) as ct:
        result = counting(app, runs).delay()
        [pending] = ct.pending
        headers = {} if make is None else {"Authorization": f"Bearer {make(minter)}"}
        response = ct.test_client().post("/_cloudtasks", data=pending.body, headers=headers)
    assert response.status_code == status
    assert runs == [] and result.state == states.PENDING
    assert json.loads(response.data) == {"error": "forbidden" if status == 403 else "unauthorized"}


def test_valid_token_is_accepted(app: Celery, minter: TokenMinter, certs: CertsServer) -> None:
    runs: list[Any] = []
    before = certs.hits
    with CloudTasksHarness(app, retry=SMALL_RETRY, endpoint_config=oidc_config(certs)) as ct:
        result = counting(app, runs).delay()
        [pending] = ct.pending
        headers = {"Authorization": f"Bearer {minter.mint()}"}
        for _ in range(3):
            response = ct.test_client().post("/_cloudtasks", data=pending.body, headers=headers)
            assert response.status_code == 200
    assert result.get(timeout=0) >= 1
    assert certs.hits - before == 1  # certificates are cached, not fetched per request


def test_oidc_settings_default_to_the_transport_options(
    app: Celery, minter: TokenMinter, certs: CertsServer
) -> None:
    options = {"oidc_audience": AUDIENCE, "oidc_service_account_email": DEFAULT_EMAIL}
    config = {"CLOUDTASKS_VERIFY_OIDC": True, "CLOUDTASKS_OIDC_CERTS_URL": certs.url}
    with CloudTasksHarness(app, transport_options=options, endpoint_config=config) as ct:
        counting(app, []).delay()
        [pending] = ct.pending
        client = ct.test_client()
        ok = client.post(
            "/_cloudtasks", data=pending.body, headers={"Authorization": f"Bearer {minter.mint()}"}
        )
        other = minter.mint(email="someone@else.iam.gserviceaccount.com")
        refused = client.post(
            "/_cloudtasks", data=pending.body, headers={"Authorization": f"Bearer {other}"}
        )
    assert (ok.status_code, refused.status_code) == (200, 403)


def test_verification_needs_allowed_accounts(app: Celery) -> None:
    app.conf.broker_transport_options = {"oidc_audience": AUDIENCE}
    with pytest.raises(ConfigurationError, match="SERVICE_ACCOUNTS"):
        create_app(app)


def test_turning_oidc_off_is_explicit_and_warns(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_cloudtasks.endpoint"):
        create_app(app, CLOUDTASKS_VERIFY_OIDC=False)
    assert "OIDC verification" in caplog.text and "OFF" in caplog.text


# -- Flask integration -------------------------------------------------------------


def test_init_app_pattern_prefix_and_sub_paths(app: Celery) -> None:
    runs: list[Any] = []
    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:
        counting(app, runs).delay()
        [pending] = ct.pending
        extension = CloudTasksPush(celery_app=app)
        flask_apps = [Flask("one"), Flask("two")]
        for flask_app in flask_apps:
            flask_app.config.update(CLOUDTASKS_VERIFY_OIDC=False, CLOUDTASKS_URL_PREFIX="/hooks")
            extension.init_app(flask_app)
        assert not hasattr(extension, "app")
        assert flask_apps[0].extensions["cloudtasks"] is not flask_apps[1].extensions["cloudtasks"]
        client = flask_apps[1].test_client()
        assert client.post("/hooks/_cloudtasks/job/abc", data=pending.body).status_code == 200
        assert client.post("/_cloudtasks", data=pending.body).status_code == 404
        assert client.get("/hooks/_cloudtasks").status_code == 405
    assert len(runs) == 1


def test_create_app_accepts_config_keywords(app: Celery) -> None:
    flask_app = create_app(app, verify_oidc=False, max_body_bytes=50)
    assert flask_app.config["CLOUDTASKS_MAX_BODY_BYTES"] == 50
    response = flask_app.test_client().post("/_cloudtasks", data=b"x" * 51)
    assert response.status_code == 413


def test_cloudtasks_metadata_on_task_request(app: Celery) -> None:
    runs: list[Any] = []
    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:
        counting(app, runs).delay()
        ct.run_until_idle()
    meta = runs[0].cloudtasks
    assert meta["queue"] == "celery" and meta["retry_count"] == 0
    assert meta["execution_count"] == 0 and meta["final_attempt"] is False
    assert isinstance(meta["eta"], float) and meta["task_name"]


def test_retry_counts_reach_the_task_and_the_final_attempt(app: Celery) -> None:
    seen: list[dict[str, Any]] = []

    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:

        @app.task(shared=False, bind=True)
        def flaky(self: Any) -> None:
            seen.append(dict(self.request.cloudtasks))
            raise RuntimeError("nope")

        flaky.delay()
        ct.run_until_idle()
    assert [m["retry_count"] for m in seen] == [0, 1, 2]
    assert [m["final_attempt"] for m in seen] == [False, False, True]
    assert [m["execution_count"] for m in seen] == [0, 0, 0]  # 5xx are not counted


def test_final_attempt_needs_duration_too(app: Celery) -> None:
    retry = {"max_attempts": 2, "min_backoff": 10, "max_backoff": 10, "max_retry_duration": 600}
    with CloudTasksHarness(app, retry=retry) as ct:

        @app.task(shared=False)
        def flaky() -> None:
            raise RuntimeError("nope")

        result = flaky.delay()
        statuses = []
        while ct.pending and len(statuses) < 100:
            ct.advance(max(0.0, ct.pending[0].schedule_time - ct.clock()))
            statuses.append(ct.deliver_next())
    # 2 attempts are not enough: retried until 600 s have (nearly) passed, then dead-lettered.
    assert len(statuses) > 2 and statuses[-1] == 200 and set(statuses[:-1]) == {500}
    assert result.state == states.FAILURE and len(ct.dead_letters) == 1


def test_dead_letter_signal(app: Celery) -> None:
    received = iter_signal(task_dead_lettered)
    events = next(received)
    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:
        result = app.send_task("missing.task")
        ct.run_until_idle()
    received.close()
    [event] = events
    assert event["sender"] == "missing.task" and event["queue"] == "dead-letters"
    assert event["enqueued"] is True and event["envelope"].task_id == result.id


def test_without_dead_letter_queue_the_envelope_is_logged(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with CloudTasksHarness(app, retry=SMALL_RETRY, dead_letter_queue="") as ct:
        result = app.send_task("missing.task", args=("keep-me",))
        with caplog.at_level(logging.ERROR, logger="celery_cloudtasks.deadletter"):
            ct.run_until_idle()
    [record] = [r for r in caplog.records if r.name == "celery_cloudtasks.deadletter"]
    assert record.levelno == logging.ERROR and result.id in record.getMessage()
    assert '"body"' in record.getMessage()  # the whole envelope


def test_errors_never_leak_tracebacks(app: Celery) -> None:
    with CloudTasksHarness(app, retry=SMALL_RETRY) as ct:

        @app.task(shared=False)
        def secret() -> None:
            raise RuntimeError("password=hunter2")

        secret.delay()
        [pending] = ct.pending
        response = ct.test_client().post("/_cloudtasks", data=pending.body)
    assert response.status_code == 500
    assert b"hunter2" not in response.data and b"Traceback" not in response.data


# -- canvas through the endpoint ---------------------------------------------------


@pytest.fixture(params=["cache", "sqlite"])
def canvas_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    backend = "cache+memory://" if request.param == "cache" else sqlite_backend(tmp_path)
    app = Celery("canvas", set_as_current=False, backend=backend)

    @app.task(shared=False, name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="total")
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="replaced", bind=True)
    def replaced(self: Any, x: int) -> Any:
        raise self.replace(add.s(x, 100))

    yield app
    app.close()


def test_chain_group_chord(canvas_app: Celery) -> None:
    add, total = canvas_app.tasks["add"], canvas_app.tasks["total"]
    with CloudTasksHarness(canvas_app, retry=SMALL_RETRY) as ct:
        c = chain(add.s(1, 2), add.s(3), add.s(4)).delay()
        g = group(add.s(i, i) for i in range(4)).delay()
        ch = chord((add.s(i, 1) for i in range(3)), total.s()).delay()
        ct.run_until_idle()
        assert c.get(timeout=1) == 10
        assert g.get(timeout=1) == [0, 2, 4, 6]
        assert ch.get(timeout=1) == 6
        assert ct.dead_letters == []


def test_task_replace_with_callbacks(canvas_app: Celery) -> None:
    add = canvas_app.tasks["add"]
    with CloudTasksHarness(canvas_app, retry=SMALL_RETRY) as ct:
        r = (canvas_app.tasks["replaced"].s(1) | add.s(1000)).delay()
        ct.run_until_idle()
        assert r.get(timeout=1) == 1101
