"""Bad input against the push endpoint, property-based (hypothesis), via Flask's test client.

The Celery app under attack is as exposed as it gets: its ``accept_content``
includes pickle and kombu's insecure serializers are enabled process-wide
(the endpoint must decode with its own accept list anyway). Its only task
records every run. For every generated request:

* no task ever runs;
* the response is a small JSON object, never a traceback;
* never a 5xx for input that can never succeed (a 5xx makes Cloud Tasks retry
  until it gives up): garbage is dead-lettered (2xx) or refused (4xx);
* a pickle whose unpickling would create a file never creates it;
* oversize bodies (with or without Content-Length) are refused with 413, and
  compressed bodies (Celery ``compression`` header or HTTP Content-Encoding)
  are never decompressed into a run.

300 examples per property by default (a few seconds);
``CELERY_CLOUDTASKS_FUZZ_EXAMPLES=5000`` for a longer hunt.

Tokens are fuzzed against the endpoint with OIDC on (a local certs server):
anything but a valid token from the allowed account is 401/403.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import os
import pickle
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.serialization
import pytest
from celery import Celery
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oidc_support import DEFAULT_AUDIENCE, DEFAULT_EMAIL, CertsServer, TokenMinter, build_token

from celery_cloudtasks import InMemoryCloudTasks
from celery_cloudtasks.flask import create_app
from celery_cloudtasks.oidc import GOOGLE_ISSUERS

MAX_BODY = 20_000
FUZZ = settings(
    max_examples=int(os.environ.get("CELERY_CLOUDTASKS_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Target:
    """A Celery app routed into memory, its push endpoints, and a record of task runs."""

    def __init__(self, marker: Path, certs_url: str) -> None:
        self.runs: list[Any] = []
        self.marker = marker
        self.queues = InMemoryCloudTasks()
        self.app = Celery(
            "fuzz",
            set_as_current=False,
            broker="cloudtasks://projects/fuzz/locations/local",
            backend="cache+memory://",
        )
        self.app.conf.accept_content = ["json", "pickle"]  # the endpoint must not care
        self.app.conf.broker_transport_options = {
            "push_url": DEFAULT_AUDIENCE,
            "queue_factory": self.queues,
            "dead_letter_queue": "dead",
            "retry": {"max_attempts": 3, "min_backoff": 1, "max_backoff": 1},
        }
        runs = self.runs

        @self.app.task(name="fuzz.target", shared=False)
        def target(*args: Any, **kwargs: Any) -> None:
            runs.append((args, kwargs))

        self.open = create_app(
            self.app, CLOUDTASKS_VERIFY_OIDC=False, CLOUDTASKS_MAX_BODY_BYTES=MAX_BODY
        ).test_client()
        self.guarded = create_app(
            self.app,
            CLOUDTASKS_OIDC_AUDIENCE=DEFAULT_AUDIENCE,
            CLOUDTASKS_OIDC_SERVICE_ACCOUNTS=[DEFAULT_EMAIL],
            CLOUDTASKS_OIDC_CERTS_URL=certs_url,
            CLOUDTASKS_MAX_BODY_BYTES=MAX_BODY,
        ).test_client()
        target.apply_async((1, 2), {"k": "v"})
        (task,) = self.queues.queue("celery").tasks
        self.queues.queue("celery").delete(task.task_id)
        #: A valid envelope of fuzz.target, as JSON data and as the delivery headers.
        self.envelope: dict[str, Any] = json.loads(task.body)
        self.headers = self.queues.queue("celery").build_delivery(task).headers


@pytest.fixture(scope="module")
def minter() -> TokenMinter:
    return TokenMinter()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, minter: TokenMinter) -> Iterator[Target]:
    disabled = set(kombu.serialization.registry._disabled_content_types)
    kombu.serialization.enable_insecure_serializers()  # the worst case for the endpoint
    marker = tmp_path_factory.mktemp("fuzz") / "unpickled-was-here"
    with CertsServer(minter.certs()) as certs:
        target = Target(marker, certs.url)
        try:
            yield target
        finally:
            kombu.serialization.registry._disabled_content_types = disabled
            target.app.close()
    assert not marker.exists(), "a pickle payload was unpickled"
    assert target.runs == [], "a task ran"


def check(response: Any, target: Target, *, allowed: set[int] | None = None) -> int:
    """The properties every refused request must have; returns the status."""
    status: int = response.status_code
    data: bytes = response.data
    assert target.runs == [], f"a task ran (HTTP {status})"
    assert not target.marker.exists(), "a pickle payload was unpickled"
    assert b"Traceback" not in data and b'File "' not in data, data[:300]
    assert len(data) < 1_000, data[:300]
    assert isinstance(json.loads(data), dict)
    assert status < 500, f"{status} for input that can never succeed: {data[:200]!r}"
    if allowed is not None:
        assert status in allowed, (status, data[:200])
    return status


# -- building blocks ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def _plausible_retry_count(headers: dict[str, str]) -> bool:
    """Leave out retry counts Cloud Tasks can never send (test_absurd_retry_count_... has them)."""
    try:
        return abs(int(headers.get("X-CloudTasks-TaskRetryCount", "0").strip())) <= 10**5
    except ValueError:
        return True


cloudtasks_headers = st.dictionaries(
    st.sampled_from(
        [
            "X-CloudTasks-QueueName",
            "X-CloudTasks-TaskName",
            "X-CloudTasks-TaskRetryCount",
            "X-CloudTasks-TaskExecutionCount",
            "X-CloudTasks-TaskETA",
            "X-CloudTasks-TaskPreviousResponse",
            "X-CloudTasks-TaskRetryReason",
            "Content-Type",
            "Content-Encoding",
            "Transfer-Encoding-Hint",
        ]
    ),
    header_text
    | st.integers(min_value=-(10**30), max_value=10**30).map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(str),
    max_size=6,
).filter(_plausible_retry_count)


class Unpickled:
    """Unpickling this creates ``path``: the visible side effect that must never happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def pickles(marker: Path) -> list[bytes]:
    bomb = Unpickled(marker)
    return [
        pickle.dumps([[bomb], {}, {}]),
        pickle.dumps(bomb),
        pickle.dumps(([bomb], {"x": bomb}, {"callbacks": [bomb]}), protocol=0),
    ]


COMPRESSORS = {
    "application/x-gzip": gzip.compress,
    "gzip": gzip.compress,
    "zlib": zlib.compress,
    "application/x-bz2": bz2.compress,
    "bzip2": bz2.compress,
    "application/x-lzma": lzma.compress,
    "lzma": lzma.compress,
}

NOT_JSON_TYPES = [
    "application/x-python-serialize",
    "application/x-python-serialize; charset=binary",
    "APPLICATION/X-PYTHON-SERIALIZE",
    "application/x-yaml",
    "application/x-msgpack",
    "application/data",
    "application/json; charset=utf-8",
    "text/plain",
    "",
]


def mutated(envelope: dict[str, Any], data: st.DataObject, marker: Path) -> dict[str, Any]:
    """A copy of a valid envelope with one change that makes it undeliverable, plus noise."""
    env = json.loads(json.dumps(envelope))
    message = env["message"]
    breaker = data.draw(
        st.sampled_from(
            [
                "content-type",
                "pickle",
                "compression",
                "body",
                "body-encoding",
                "payload-shape",
                "version",
                "drop-key",
                "wrong-type",
            ]
        ),
        label="breaker",
    )
    if breaker == "content-type":
        message["content-type"] = data.draw(st.sampled_from(NOT_JSON_TYPES) | st.text(max_size=30))
        assume(message["content-type"] != "application/json")
    elif breaker == "pickle":
        payload = data.draw(st.sampled_from(pickles(marker)))
        message["body"] = base64.b64encode(payload).decode()
        message["content-type"] = data.draw(
            st.sampled_from(["application/x-python-serialize", "application/json"])
        )
        message["content-encoding"] = data.draw(st.sampled_from(["binary", "utf-8", None]))
        if data.draw(st.booleans(), label="compressed pickle"):
            name = data.draw(st.sampled_from(sorted(COMPRESSORS)))
            message["body"] = base64.b64encode(COMPRESSORS[name](payload)).decode()
            message["headers"]["compression"] = name
    elif breaker == "compression":
        name = data.draw(st.sampled_from(sorted(COMPRESSORS)) | st.text(min_size=1, max_size=20))
        raw = base64.b64decode(message["body"])
        compress = COMPRESSORS.get(name, zlib.compress)
        message["body"] = base64.b64encode(compress(raw)).decode()
        message["headers"]["compression"] = name
    elif breaker == "body":
        message["body"] = data.draw(st.text(max_size=200))
        assume(message["body"] != envelope["message"]["body"])
    elif breaker == "body-encoding":
        message["properties"]["body_encoding"] = data.draw(json_values)
        assume(message["properties"]["body_encoding"] != "base64")
    elif breaker == "payload-shape":
        payload = data.draw(json_values)
        assume(not (isinstance(payload, list) and len(payload) == 3))
        message["body"] = base64.b64encode(json.dumps(payload).encode()).decode()
    elif breaker == "version":
        env["v"] = data.draw(json_values)
        assume(env["v"] != 1)
    elif breaker == "drop-key":
        key = data.draw(st.sampled_from(["v", "queue", "published_at", "message"]))
        if key == "message":
            inner = data.draw(st.sampled_from(sorted(message)))
            del message[inner]
        else:
            del env[key]
    else:  # wrong-type: a field of the wrong JSON type
        where = data.draw(st.sampled_from(["message", "headers", "properties", "id", "task"]))
        value = data.draw(json_values)
        if where in ("message",):
            assume(not isinstance(value, dict))
            env["message"] = value
        elif where in ("headers", "properties"):
            assume(not isinstance(value, dict))
            message[where] = value
        else:
            assume(not isinstance(value, str))
            message["headers"][where] = value
    # Noise on top: extra or changed fields that must not matter.
    for key, value in data.draw(
        st.dictionaries(st.text(max_size=10), json_values, max_size=3)
    ).items():
        if key not in env:
            env[key] = value
    return env


# -- properties ------------------------------------------------------------------------------


def test_the_unmutated_envelope_does_run(target: Target) -> None:
    # Not vacuous: the envelope every mutation starts from is a real, runnable delivery.
    response = target.open.post("/_cloudtasks", json=target.envelope, headers=target.headers)
    assert response.status_code == 200 and len(target.runs) == 1
    target.runs.clear()


@FUZZ
@given(body=st.binary(max_size=4096), headers=cloudtasks_headers)
def test_random_bytes_and_headers(target: Target, body: bytes, headers: dict[str, str]) -> None:
    response = target.open.post("/_cloudtasks", data=body, headers=headers)
    check(response, target, allowed={200, 400, 413, 415})


@FUZZ
@given(body=json_values, headers=cloudtasks_headers)
def test_random_json(target: Target, body: Any, headers: dict[str, str]) -> None:
    response = target.open.post("/_cloudtasks", data=json.dumps(body), headers=headers)
    check(response, target, allowed={200, 400, 413, 415})


@FUZZ
@given(data=st.data(), headers=cloudtasks_headers)
def test_mutated_envelopes_never_run(
    target: Target, data: st.DataObject, headers: dict[str, str]
) -> None:
    env = mutated(target.envelope, data, target.marker)
    body = json.dumps(env).encode()
    response = target.open.post("/_cloudtasks", data=body, headers={**target.headers, **headers})
    check(response, target)


@FUZZ
@given(headers=cloudtasks_headers)
def test_forged_cloudtasks_headers_on_a_valid_unknown_task(
    target: Target, headers: dict[str, str]
) -> None:
    # A valid message for a task this worker does not have: never run, never a traceback.
    # (5xx is allowed here: the task may be deployed later, so Cloud Tasks should retry.)
    env = json.loads(json.dumps(target.envelope))
    env["message"]["headers"]["task"] = "fuzz.not_deployed"
    response = target.open.post(
        "/_cloudtasks", data=json.dumps(env), headers={**target.headers, **headers}
    )
    assert target.runs == []
    assert b"Traceback" not in response.data and len(response.data) < 1_000
    assert response.status_code in (200, 500, 503)


def test_absurd_retry_count_is_not_a_5xx(target: Target) -> None:
    response = target.open.post(
        "/_cloudtasks", data=b"garbage", headers={"X-CloudTasks-TaskRetryCount": str(10**12)}
    )
    check(response, target, allowed={200})


def test_pickle_payloads_are_never_unpickled(target: Target) -> None:
    for payload in pickles(target.marker):
        for content_type in ("application/x-python-serialize", "application/json", None):
            env = json.loads(json.dumps(target.envelope))
            env["message"].update(
                {
                    "body": base64.b64encode(payload).decode(),
                    "content-type": content_type,
                    "content-encoding": "binary",
                }
            )
            response = target.open.post("/_cloudtasks", json=env, headers=target.headers)
            assert check(response, target) == 200
            assert json.loads(response.data)["outcome"] == "undeliverable"
    assert not target.marker.exists()


# -- size and compression ------------------------------------------------------------------------


@FUZZ
@given(extra=st.integers(min_value=1, max_value=3 * MAX_BODY), chunked=st.booleans())
def test_oversize_bodies_are_refused(target: Target, extra: int, chunked: bool) -> None:
    env = json.loads(json.dumps(target.envelope))
    env["padding"] = "x" * (MAX_BODY + extra)  # a valid envelope, just too big
    body = json.dumps(env).encode()
    if chunked:  # no Content-Length: the endpoint must stop reading at the cap
        response = target.open.post(
            "/_cloudtasks",
            input_stream=io.BytesIO(body),
            headers={**target.headers, "Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets it
        )
    else:
        response = target.open.post("/_cloudtasks", data=body, headers=target.headers)
    assert check(response, target, allowed={413}) == 413


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressed_bodies_are_refused(target: Target, name: str) -> None:
    # A compressed Celery body (and a 10 MB zip bomb) under the `compression` header.
    for raw in (base64.b64decode(target.envelope["message"]["body"]), b"[" * 10_000_000):
        env = json.loads(json.dumps(target.envelope))
        env["message"]["body"] = base64.b64encode(COMPRESSORS[name](raw)).decode()
        env["message"]["headers"]["compression"] = name
        response = target.open.post("/_cloudtasks", json=env, headers=target.headers)
        assert check(response, target) == 200
        assert json.loads(response.data)["outcome"] == "undeliverable"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_http_compressed_bodies_are_not_decompressed(target: Target, encoding: str) -> None:
    body = json.dumps(target.envelope).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    response = target.open.post(
        "/_cloudtasks",
        data=packed,
        headers={**target.headers, "Content-Encoding": encoding},
    )
    assert check(response, target) in (200, 400, 415)


# -- tokens (OIDC on) ------------------------------------------------------------------------------

jwt_segment = st.binary(max_size=200).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
)


def _not_a_time(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


def tokens(minter: TokenMinter) -> st.SearchStrategy[str]:
    """Authorization header values that must all be refused."""
    from google.auth import jwt

    now = int(time.time())
    good = minter.claims()
    # Per claim, values that can never pass (some claims accept many values: sub, iat, exp).
    broken: dict[str, st.SearchStrategy[Any]] = {
        "aud": json_values.filter(lambda v: v != DEFAULT_AUDIENCE),
        # (a list or object iss: test_signed_token_with_a_list_issuer_is_a_401)
        "iss": json_values.filter(
            lambda v: not isinstance(v, (list, dict)) and v not in GOOGLE_ISSUERS
        ),
        "email": json_values.filter(
            lambda v: not (isinstance(v, str) and v.lower() == DEFAULT_EMAIL.lower())
        ),
        "email_verified": json_values.filter(lambda v: v is not True),
        "exp": st.integers(max_value=now - 3600) | json_values.filter(_not_a_time),
        "iat": st.integers(min_value=now + 3600) | json_values.filter(_not_a_time),
        "sub": json_values.filter(lambda v: not isinstance(v, str)),
    }

    def signed(field_value: tuple[str, Any]) -> str:
        field, value = field_value
        claims = {**good, field: value}
        return "Bearer " + jwt.encode(minter.signer, claims, key_id=minter.kid).decode("ascii")

    return st.one_of(
        header_text,
        header_text.map(lambda t: "Bearer " + t),
        st.tuples(jwt_segment, jwt_segment, jwt_segment).map(lambda s: "Bearer " + ".".join(s)),
        st.sampled_from(["none", "HS256", "RS256", "ES256"]).map(
            lambda alg: (
                "Bearer "
                + build_token(
                    {"alg": alg, "kid": minter.kid}, good, b"" if alg == "none" else b"sig"
                )
            )
        ),
        st.sampled_from(sorted(broken))
        .flatmap(lambda field: broken[field].map(lambda value: (field, value)))
        .map(signed),
        st.sampled_from(["bearer", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "Token abc"]),
    )


def test_tokens_are_refused(target: Target, minter: TokenMinter) -> None:
    body = json.dumps(target.envelope).encode()

    @FUZZ
    @given(authorization=tokens(minter), headers=cloudtasks_headers)
    def refused(authorization: str, headers: dict[str, str]) -> None:
        response = target.guarded.post(
            "/_cloudtasks",
            data=body,
            headers={**target.headers, **headers, "Authorization": authorization},
        )
        check(response, target, allowed={401, 403})

    refused()
    # The same request with a real token does run (the guard is not simply closed).
    valid = "Bearer " + minter.mint()
    response = target.guarded.post(
        "/_cloudtasks", data=body, headers={**target.headers, "Authorization": valid}
    )
    assert response.status_code == 200 and len(target.runs) == 1
    target.runs.clear()


def test_signed_token_with_a_list_issuer_is_a_401(target: Target, minter: TokenMinter) -> None:
    from google.auth import jwt

    claims = {**minter.claims(), "iss": ["https://accounts.google.com"]}
    token = jwt.encode(minter.signer, claims, key_id=minter.kid).decode("ascii")
    response = target.guarded.post(
        "/_cloudtasks",
        data=json.dumps(target.envelope),
        headers={**target.headers, "Authorization": f"Bearer {token}"},
    )
    check(response, target, allowed={401})
