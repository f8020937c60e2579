"""OIDC verification outcomes: who gets in, who is refused with which error, and cert caching.

Tokens are minted with a generated RSA key and verified against certificates served
over real HTTP on 127.0.0.1 (no mocks).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oidc_support import (
    DEFAULT_AUDIENCE,
    DEFAULT_EMAIL,
    CertsServer,
    TokenMinter,
    b64url,
    build_token,
)

from celery_cloudtasks.errors import (
    ConfigurationError,
    ForbiddenIdentity,
    InvalidToken,
    MissingToken,
    OidcError,
)
from celery_cloudtasks.oidc import (
    GOOGLE_CERTS_URL,
    GOOGLE_ISSUERS,
    CertificatesUnavailable,
    OidcVerifier,
    VerifiedIdentity,
)

REPO = Path(__file__).resolve().parents[1]
MINTER = TokenMinter()  # one RSA key for the module: key generation is the slow part


@pytest.fixture(scope="module")
def certs_server() -> Iterator[CertsServer]:
    with CertsServer(MINTER.certs()) as server:
        yield server


def make_verifier(server: CertsServer, **kwargs: object) -> OidcVerifier:
    options: dict[str, object] = {
        "audience": DEFAULT_AUDIENCE,
        "allowed_service_accounts": [DEFAULT_EMAIL],
        "certs_url": server.url,
    }
    options.update(kwargs)
    return OidcVerifier(**options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def verifier(certs_server: CertsServer) -> OidcVerifier:
    return make_verifier(certs_server)


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --- accepted ---------------------------------------------------------------------------


def test_valid_token_returns_the_identity(verifier: OidcVerifier) -> None:
    now = int(time.time())
    identity = verifier.verify(bearer(MINTER.mint(iat=now, exp=now + 3600)))
    assert identity == VerifiedIdentity(
        email=DEFAULT_EMAIL,
        subject="1098765432101234567890",
        audience=DEFAULT_AUDIENCE,
        issuer="https://accounts.google.com",
        issued_at=datetime.fromtimestamp(now, tz=timezone.utc),
        expires_at=datetime.fromtimestamp(now + 3600, tz=timezone.utc),
    )


def test_both_google_issuer_spellings_and_lowercase_scheme_are_accepted(
    verifier: OidcVerifier,
) -> None:
    token = MINTER.mint(issuer="accounts.google.com")
    assert verifier.verify(f"bearer   {token}  ").issuer == "accounts.google.com"


def test_allowed_emails_compare_case_insensitively(certs_server: CertsServer) -> None:
    verifier = make_verifier(certs_server, allowed_service_accounts=[DEFAULT_EMAIL.upper()])
    assert verifier.verify(bearer(MINTER.mint())).email == DEFAULT_EMAIL


def test_no_allow_list_accepts_any_verified_email(certs_server: CertsServer) -> None:
    verifier = make_verifier(certs_server, allowed_service_accounts=None)
    identity = verifier.verify(bearer(MINTER.mint(email="someone@other.iam.gserviceaccount.com")))
    assert identity.email == "someone@other.iam.gserviceaccount.com"
    with pytest.raises(ForbiddenIdentity):
        verifier.verify(bearer(MINTER.mint(email_verified=False)))


def test_clock_skew_tolerates_slightly_expired_and_early_tokens(verifier: OidcVerifier) -> None:
    now = int(time.time())
    verifier.verify(bearer(MINTER.mint(iat=now - 3600, exp=now - 5)))
    verifier.verify(bearer(MINTER.mint(iat=now + 5, exp=now + 3600)))


# --- refused ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   ", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   "])
def test_missing_or_non_bearer_header_is_missing_token(
    verifier: OidcVerifier, header: str | None
) -> None:
    with pytest.raises(MissingToken) as info:
        verifier.verify(header)
    assert info.value.status_code == 401


def test_token_in_basic_scheme_is_not_accepted(verifier: OidcVerifier) -> None:
    with pytest.raises(MissingToken):
        verifier.verify("Basic " + MINTER.mint())


def test_wrong_audience_is_invalid(verifier: OidcVerifier) -> None:
    token = MINTER.mint(audience="https://worker.example.com/_cloudtasks/push?x=1")
    with pytest.raises(InvalidToken, match="audience"):
        verifier.verify(bearer(token))


def test_wrong_issuer_is_invalid(verifier: OidcVerifier) -> None:
    with pytest.raises(InvalidToken, match="issuer"):
        verifier.verify(bearer(MINTER.mint(issuer="https://evil.example.com")))


def test_email_not_allowed_is_forbidden(verifier: OidcVerifier) -> None:
    token = MINTER.mint(email="intruder@other-project.iam.gserviceaccount.com")
    with pytest.raises(ForbiddenIdentity) as info:
        verifier.verify(bearer(token))
    assert info.value.status_code == 403
    assert "intruder@other-project" in str(info.value)


@pytest.mark.parametrize("email_verified", [False, "true", 1, None])
def test_email_verified_must_be_true(verifier: OidcVerifier, email_verified: object) -> None:
    with pytest.raises(ForbiddenIdentity):
        verifier.verify(bearer(MINTER.mint(email_verified=email_verified)))


def test_token_without_email_is_forbidden(verifier: OidcVerifier) -> None:
    with pytest.raises(ForbiddenIdentity):
        verifier.verify(bearer(MINTER.mint(email=None)))


def test_expired_token_is_invalid(verifier: OidcVerifier) -> None:
    now = int(time.time())
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(bearer(MINTER.mint(iat=now - 7200, exp=now - 3600)))


def test_token_issued_in_the_future_is_invalid(verifier: OidcVerifier) -> None:
    now = int(time.time())
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify(bearer(MINTER.mint(iat=now + 120, exp=now + 3720)))


@pytest.mark.parametrize("claim", ["iat", "exp"])
def test_missing_or_non_numeric_times_are_invalid(verifier: OidcVerifier, claim: str) -> None:
    claims = MINTER.claims()
    del claims[claim]
    with pytest.raises(InvalidToken):
        verifier.verify(bearer(sign(claims)))
    with pytest.raises(InvalidToken):
        verifier.verify(bearer(sign({**MINTER.claims(), claim: "soon"})))


def sign(claims: dict[str, object], header: dict[str, object] | None = None) -> str:
    from google.auth import jwt

    token: bytes = jwt.encode(MINTER.signer, claims, header=header)
    return token.decode()


def test_signature_by_another_key_with_the_same_kid_is_invalid(verifier: OidcVerifier) -> None:
    impostor = TokenMinter(kid=MINTER.kid)
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(bearer(impostor.mint()))


def test_tampered_payload_is_invalid(verifier: OidcVerifier) -> None:
    header, _, signature = MINTER.mint().split(".")
    forged = b64url(json.dumps(MINTER.claims(email=DEFAULT_EMAIL, extra={"x": 1})).encode())
    with pytest.raises(InvalidToken):
        verifier.verify(bearer(f"{header}.{forged}.{signature}"))


@pytest.mark.parametrize("signature", [b"", b"x" * 256])
def test_alg_none_is_invalid(verifier: OidcVerifier, signature: bytes) -> None:
    token = build_token(
        {"alg": "none", "typ": "JWT", "kid": MINTER.kid}, MINTER.claims(), signature
    )
    with pytest.raises(InvalidToken, match="algorithm"):
        verifier.verify(bearer(token))


def test_hs256_signed_with_the_public_cert_is_invalid(verifier: OidcVerifier) -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": MINTER.kid}
    unsigned = build_token(header, MINTER.claims(), b"").rstrip(".")
    mac = hmac.new(MINTER.cert_pem.encode(), unsigned.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken, match="algorithm"):
        verifier.verify(bearer(f"{unsigned}.{b64url(mac)}"))


def test_other_asymmetric_algorithms_are_invalid(verifier: OidcVerifier) -> None:
    with pytest.raises(InvalidToken, match="algorithm"):
        verifier.verify(bearer(sign(MINTER.claims(), header={"alg": "ES256"})))


def test_token_without_kid_is_invalid(verifier: OidcVerifier) -> None:
    from google.auth import jwt

    token = jwt.encode(MINTER.signer, MINTER.claims(), key_id="").decode()
    with pytest.raises(InvalidToken, match="key id"):
        verifier.verify(bearer(token))


@pytest.mark.parametrize(
    "garbage",
    [
        "abc",
        "a.b.c",
        "..",
        "eyJ.eyJ.",
        "not a jwt at all",
        "ünïcödé.tökén.x",
        "a.b.c.d",
        b64url(b"[1,2]") + "." + b64url(b"{}") + ".",
        b64url(b'{"alg":"RS256","kid":"k"}') + "." + b64url(b"\xff\xfe") + ".AAAA",
        "x" * 20_000 + ".a.b",
    ],
)
def test_garbage_is_invalid(verifier: OidcVerifier, garbage: str) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(bearer(garbage))


def test_error_messages_never_contain_the_token(verifier: OidcVerifier) -> None:
    now = int(time.time())
    refused = [
        MINTER.mint(audience="https://elsewhere.example.com"),
        MINTER.mint(issuer="https://evil.example.com"),
        MINTER.mint(iat=now - 7200, exp=now - 3600),
        MINTER.mint(iat=now + 600),
        MINTER.mint(kid="unknown-kid"),
        TokenMinter(kid=MINTER.kid).mint(),
        MINTER.mint(email="intruder@x.iam.gserviceaccount.com"),
        MINTER.mint() + "x",
        MINTER.mint().replace(".", "", 1),
    ]
    for token in refused:
        with pytest.raises(OidcError) as info:
            verifier.verify(bearer(token))
        message = str(info.value)
        assert len(message) < 120
        for part in token.split("."):
            assert part not in message


# --- certificates: caching, rotation, outages -------------------------------------------


def test_certs_are_fetched_once_for_many_verifications() -> None:
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server)
        assert server.hits == 0  # nothing fetched at construction
        for _ in range(25):
            verifier.verify(bearer(MINTER.mint()))
        assert server.hits == 1


def test_concurrent_first_verifications_fetch_once() -> None:
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server)
        token = MINTER.mint()
        results: list[str] = []

        def worker() -> None:
            for _ in range(10):
                results.append(verifier.verify(bearer(token)).email)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [DEFAULT_EMAIL] * 80
        assert server.hits == 1


def test_certs_are_refetched_after_the_cache_period() -> None:
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server, certs_cache_seconds=0.2)
        verifier.verify(bearer(MINTER.mint()))
        verifier.verify(bearer(MINTER.mint()))
        assert server.hits == 1
        time.sleep(0.3)
        verifier.verify(bearer(MINTER.mint()))
        assert server.hits == 2


def test_a_shorter_cache_control_max_age_is_honoured() -> None:
    with CertsServer(MINTER.certs(), headers={"Cache-Control": "public, max-age=0"}) as server:
        verifier = make_verifier(server)
        for _ in range(3):
            verifier.verify(bearer(MINTER.mint()))
        assert server.hits == 3


def test_a_longer_cache_control_max_age_does_not_extend_the_cache() -> None:
    headers = {"Cache-Control": "public, max-age=99999, must-revalidate"}
    with CertsServer(MINTER.certs(), headers=headers) as server:
        verifier = make_verifier(server, certs_cache_seconds=0.2)
        verifier.verify(bearer(MINTER.mint()))
        time.sleep(0.3)
        verifier.verify(bearer(MINTER.mint()))
        assert server.hits == 2


def test_unknown_kid_refetches_once_so_key_rotation_works() -> None:
    new_key = TokenMinter()
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server)
        verifier.verify(bearer(MINTER.mint()))
        server.certs = {**MINTER.certs(), **new_key.certs()}  # Google publishes a new key
        assert verifier.verify(bearer(new_key.mint())).email == DEFAULT_EMAIL
        assert server.hits == 2
        verifier.verify(bearer(MINTER.mint()))  # the old key keeps working
        verifier.verify(bearer(new_key.mint()))
        assert server.hits == 2


def test_unknown_kid_refetches_are_rate_limited() -> None:
    stranger = TokenMinter()
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server)
        verifier.verify(bearer(MINTER.mint()))
        for _ in range(10):
            with pytest.raises(InvalidToken, match="unknown signing key"):
                verifier.verify(bearer(stranger.mint()))
        assert server.hits == 2  # the first fetch plus one rotation refetch


def test_certs_server_down_refuses_with_a_retryable_error() -> None:
    server = CertsServer(MINTER.certs()).start()
    url = server.url
    server.stop()  # nothing listens on that port any more
    verifier = OidcVerifier(
        audience=DEFAULT_AUDIENCE,
        allowed_service_accounts=[DEFAULT_EMAIL],
        certs_url=url,
        http_timeout_seconds=2,
    )
    token = MINTER.mint()
    with pytest.raises(CertificatesUnavailable) as info:
        verifier.verify(bearer(token))
    assert isinstance(info.value, InvalidToken)
    assert info.value.retryable is True
    assert info.value.status_code == 503
    assert url not in str(info.value) and token not in str(info.value)


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, None), (404, None), (200, b"<html>oops</html>"), (200, b"[1, 2]"), (200, b'{"k": 1}')],
)
def test_bad_certs_responses_refuse_until_the_server_recovers(
    status: int, body: bytes | None
) -> None:
    with CertsServer(MINTER.certs(), status=status) as server:
        server.body = body
        verifier = make_verifier(server)
        with pytest.raises(CertificatesUnavailable):
            verifier.verify(bearer(MINTER.mint()))
        server.status, server.body = 200, None
        assert verifier.verify(bearer(MINTER.mint())).email == DEFAULT_EMAIL


def test_certs_outage_after_the_cache_expires_fails_closed() -> None:
    with CertsServer(MINTER.certs()) as server:
        verifier = make_verifier(server, certs_cache_seconds=0.1)
        verifier.verify(bearer(MINTER.mint()))
        server.status = 503
        time.sleep(0.2)
        with pytest.raises(CertificatesUnavailable):
            verifier.verify(bearer(MINTER.mint()))


# --- configuration ----------------------------------------------------------------------


def test_defaults_point_at_google() -> None:
    assert GOOGLE_CERTS_URL == "https://www.googleapis.com/oauth2/v1/certs"
    assert GOOGLE_ISSUERS == ("https://accounts.google.com", "accounts.google.com")
    verifier = OidcVerifier(audience="https://a.example.com", allowed_service_accounts=None)
    assert verifier.certs_url == GOOGLE_CERTS_URL
    assert verifier.issuers == frozenset(GOOGLE_ISSUERS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"audience": ""},
        {"audience": "   "},
        {"allowed_service_accounts": DEFAULT_EMAIL},  # a str is a collection of characters
        {"allowed_service_accounts": []},
        {"issuers": ()},
        {"certs_url": "file:///etc/certs.json"},
        {"clock_skew_seconds": -1},
        {"certs_cache_seconds": float("nan")},
        {"http_timeout_seconds": 0},
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs: dict[str, object]) -> None:
    options: dict[str, object] = {
        "audience": DEFAULT_AUDIENCE,
        "allowed_service_accounts": [DEFAULT_EMAIL],
    }
    options.update(kwargs)
    with pytest.raises(ConfigurationError):
        OidcVerifier(**options)  # type: ignore[arg-type]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_importing_the_module_does_not_import_google_auth() -> None:
    result = run_python("import sys, celery_cloudtasks.oidc; print('google.auth' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_missing_google_auth_is_a_configuration_error_naming_the_extra() -> None:
    result = run_python(
        "import sys; sys.modules['google.auth'] = None\n"
        "from celery_cloudtasks.oidc import OidcVerifier\n"
        "from celery_cloudtasks.errors import ConfigurationError\n"
        "try:\n"
        "    OidcVerifier(audience='https://a', allowed_service_accounts=None)\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install celery-cloudtasks[gcp]" in result.stdout


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
jwt_shaped = st.builds(
    build_token,
    st.fixed_dictionaries(
        {
            # Mostly the right alg and kid, so the signature check itself gets exercised.
            "alg": st.just("RS256") | st.sampled_from(["none", "HS256", "ES256", "RS512"]),
            "kid": st.just(MINTER.kid) | st.text(max_size=8) | json_values,
        },
        optional={"typ": st.just("JWT")},
    ),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6)
    | st.just(MINTER.claims()).map(lambda c: {**c, "exp": 2**40}),
    st.binary(max_size=300) | st.binary(min_size=256, max_size=256),
)
headers = (
    st.none()
    | st.text()
    | st.binary()
    | st.text().map(bearer)
    | st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.").map(
        bearer
    )
    | jwt_shaped.map(bearer)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers)
def test_arbitrary_headers_never_verify_and_only_raise_oidc_errors(
    certs_server: CertsServer, header: object
) -> None:
    verifier = make_verifier(certs_server)  # fresh per example: fetches certs, no shared cache
    with pytest.raises(OidcError):
        verifier.verify(header)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(token=jwt_shaped)
def test_forged_jwt_shaped_tokens_never_verify(verifier: OidcVerifier, token: str) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(bearer(token))


VALID = MINTER.mint(exp=int(time.time()) + 86400)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_the_signed_part_is_refused(
    verifier: OidcVerifier, data: st.DataObject
) -> None:
    signed_part_len = VALID.rindex(".")
    index = data.draw(st.integers(0, signed_part_len - 1), label="index")
    replacement = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.").filter(
            lambda c: c != VALID[index]
        ),
        label="replacement",
    )
    mutated = VALID[:index] + replacement + VALID[index + 1 :]
    with pytest.raises(OidcError):
        verifier.verify(bearer(mutated))
