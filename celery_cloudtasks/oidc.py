"""Verify the OIDC token Cloud Tasks attaches to every push delivery.

``X-CloudTasks-*`` headers can be forged by any caller; identity comes only from
the ``Authorization: Bearer`` token. :class:`OidcVerifier` fails closed:

- ``MissingToken``: no ``Bearer <token>`` header.
- ``InvalidToken``: malformed JWT; ``alg`` other than ``RS256`` (no ``none``, no
  HMAC); unknown ``kid``; bad signature; ``iat``/``exp`` outside
  ``clock_skew_seconds``; ``aud`` not the configured audience (always checked:
  Cloud Tasks defaults it to the target URL, a classic 401 cause); ``iss`` not a
  Google issuer (google-auth does not check it).
- ``ForbiddenIdentity``: ``email_verified`` not true, or ``email`` not in
  ``allowed_service_accounts`` (case-insensitive). ``None`` allows any verified
  email: only the audience then ties the token to this service.
- ``CertificatesUnavailable`` (an ``InvalidToken``, ``retryable``, HTTP 503):
  Google's certificates could not be fetched.

Certificates are fetched from ``certs_url`` at most once per
``min(certs_cache_seconds, Cache-Control max-age)`` (the setting is an upper
bound), and again at once when a token names an unknown ``kid`` (key rotation),
at most once per ``kid_refetch_interval_seconds``. Messages never echo the token.
google-auth (the ``gcp`` extra) is imported only here, lazily.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeGuard

from .errors import ConfigurationError, ForbiddenIdentity, InvalidToken, MissingToken

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "CertificatesUnavailable",
    "OidcVerifier",
    "VerifiedIdentity",
]

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")

_MAX_TOKEN_CHARS = 16_384
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*(\d+)", re.IGNORECASE)
# google-auth message fragments -> our short reason (the decision never depends on these).
_REASONS = (
    ("expired", "token expired"),
    ("too early", "token not yet valid"),
    ("audience", "wrong audience"),
    ("signature", "bad signature"),
)


class CertificatesUnavailable(InvalidToken):
    """Google's signing certificates could not be fetched; the token was refused.

    Transient: the push endpoint may answer 503 so Cloud Tasks retries later.
    """

    status_code = 503
    retryable = True


@dataclass(frozen=True)
class VerifiedIdentity:
    """Who signed a push request, from a verified token (times are UTC-aware)."""

    email: str
    subject: str
    audience: str
    issuer: str
    issued_at: datetime
    expires_at: datetime


def _require_google_auth() -> None:
    try:
        for module in ("google.auth.jwt", "google.auth.transport.requests"):
            importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            "OIDC verification needs google-auth: pip install celery-cloudtasks[gcp]"
        ) from exc


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")


class OidcVerifier:
    """Verify Cloud Tasks OIDC bearer tokens; thread-safe, one instance per endpoint."""

    def __init__(
        self,
        *,
        audience: str,
        allowed_service_accounts: Collection[str] | None,
        issuers: Collection[str] = GOOGLE_ISSUERS,
        certs_url: str = GOOGLE_CERTS_URL,
        clock_skew_seconds: int = 10,
        certs_cache_seconds: float = 300.0,
        http_timeout_seconds: float = 5.0,
        kid_refetch_interval_seconds: float = 30.0,
    ) -> None:
        if not isinstance(audience, str) or not audience.strip():
            raise ConfigurationError("OIDC audience must be a non-empty string")
        if isinstance(allowed_service_accounts, str):
            raise ConfigurationError("allowed_service_accounts must be a collection of emails")
        if allowed_service_accounts is not None and not allowed_service_accounts:
            raise ConfigurationError("allowed_service_accounts is empty; use None to allow any")
        if isinstance(issuers, str) or not issuers:
            raise ConfigurationError("issuers must be a non-empty collection of strings")
        if not certs_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"certs_url must be an http(s) URL, got {certs_url!r}")
        _positive("clock_skew_seconds", clock_skew_seconds, allow_zero=True)
        _positive("certs_cache_seconds", certs_cache_seconds, allow_zero=True)
        _positive("http_timeout_seconds", http_timeout_seconds)
        _positive("kid_refetch_interval_seconds", kid_refetch_interval_seconds, allow_zero=True)
        _require_google_auth()
        self.audience = audience
        self.allowed_service_accounts: frozenset[str] | None = (
            None
            if allowed_service_accounts is None
            else frozenset(e.strip().lower() for e in allowed_service_accounts)
        )
        self.issuers = frozenset(issuers)
        self.certs_url = certs_url
        self.clock_skew_seconds = clock_skew_seconds
        self.certs_cache_seconds = certs_cache_seconds
        self.http_timeout_seconds = http_timeout_seconds
        self.kid_refetch_interval_seconds = kid_refetch_interval_seconds
        self._lock = threading.Lock()
        self._certs: dict[str, str] = {}
        self._expires_at = -math.inf  # monotonic time the cached certs go stale
        self._attempt_done_at = -math.inf  # monotonic end of the last fetch attempt
        self._last_error: str | None = None
        self._kid_refetch_at = -math.inf
        self._request: Any = None  # google.auth.transport.requests.Request, made on first fetch

    def verify(self, authorization_header: str | None) -> VerifiedIdentity:
        """Return the identity behind ``Authorization: Bearer <token>`` or raise an OidcError."""
        token = _bearer_token(authorization_header)
        if len(token) > _MAX_TOKEN_CHARS or not _JWT_SHAPE.fullmatch(token):
            raise InvalidToken("malformed token")
        header = _unverified_header(token)
        if header.get("alg") != "RS256":
            raise InvalidToken("unsupported signing algorithm (only RS256 is accepted)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token has no key id")
        claims = self._decode(token, kid, self._cert_for(kid))
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise InvalidToken("wrong issuer")
        email, subject = claims.get("email"), claims.get("sub")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not (isinstance(subject, str) and _is_time(iat) and _is_time(exp)):
            raise InvalidToken("malformed claims")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            raise ForbiddenIdentity("token has no verified email")
        allowed = self.allowed_service_accounts
        if allowed is not None and email.lower() not in allowed:
            raise ForbiddenIdentity(f"service account {email!r} is not allowed")
        return VerifiedIdentity(
            email=email,
            subject=subject,
            audience=self.audience,
            issuer=claims["iss"],
            issued_at=_utc(iat),
            expires_at=_utc(exp),
        )

    def _decode(self, token: str, kid: str, cert: str) -> Mapping[str, Any]:
        """Check signature, iat/exp and aud: the one place google-auth errors are translated."""
        from google.auth import jwt

        decode: Any = jwt.decode  # google-auth is typed but its functions are not annotated
        try:
            claims = decode(
                token,
                certs={kid: cert},
                audience=self.audience,
                clock_skew_in_seconds=self.clock_skew_seconds,
            )
        except Exception as exc:  # ValueError, GoogleAuthError, TypeError...: all mean "refuse"
            text = str(exc).lower()
            reason = next((r for frag, r in _REASONS if frag in text), "invalid token")
            raise InvalidToken(reason) from None
        if not isinstance(claims, Mapping):
            raise InvalidToken("malformed claims")
        return claims

    def _cert_for(self, kid: str) -> str:
        certs = self._get_certs(force=False)
        if kid not in certs:
            certs = self._get_certs(force=True)
        if kid not in certs:
            raise InvalidToken("unknown signing key id")
        return certs[kid]

    def _get_certs(self, *, force: bool) -> dict[str, str]:
        waited_from = time.monotonic()
        with self._lock:
            now = time.monotonic()
            if self._attempt_done_at >= waited_from:  # another thread fetched while we waited
                if now < self._expires_at or self._last_error is None:
                    return self._certs
                raise CertificatesUnavailable(self._last_error)
            if force:
                if now - self._kid_refetch_at < self.kid_refetch_interval_seconds:
                    return self._certs
                self._kid_refetch_at = now
            elif now < self._expires_at:
                return self._certs
            try:
                certs, ttl = self._fetch()
            except CertificatesUnavailable as exc:
                self._last_error = str(exc)
                raise
            finally:
                self._attempt_done_at = time.monotonic()
            self._certs, self._last_error = certs, None
            self._expires_at = time.monotonic() + ttl
            return certs

    def _fetch(self) -> tuple[dict[str, str], float]:
        """GET the certs JSON; return ({kid: PEM}, seconds to cache it)."""
        from google.auth import exceptions
        from google.auth.transport import requests as transport

        if self._request is None:
            self._request = transport.Request()
        try:
            response = self._request(
                self.certs_url, method="GET", timeout=self.http_timeout_seconds
            )
        except exceptions.TransportError:
            raise CertificatesUnavailable("signing certificates unreachable") from None
        if response.status != 200:
            raise CertificatesUnavailable(f"signing certificates: HTTP {response.status}")
        try:
            certs = json.loads(response.data)
        except ValueError:
            certs = None
        if not (isinstance(certs, dict) and all(isinstance(v, str) for v in certs.values())):
            raise CertificatesUnavailable("signing certificates: unexpected response body")
        ttl = self.certs_cache_seconds
        match = _MAX_AGE.search(response.headers.get("Cache-Control", "") or "")
        if match:
            ttl = min(ttl, float(match.group(1)))
        return certs, ttl


def _bearer_token(header: object) -> str:
    if not isinstance(header, str):
        raise MissingToken("no Authorization header")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingToken("Authorization header is not a Bearer token")
    return token.strip()


def _unverified_header(token: str) -> Mapping[str, Any]:
    from google.auth import jwt

    decode_header: Any = jwt.decode_header
    try:
        header = decode_header(token)
    except Exception:  # bad base64, bad JSON, bad UTF-8: all "malformed"
        raise InvalidToken("malformed token") from None
    if not isinstance(header, Mapping):
        raise InvalidToken("malformed token")
    return header


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _utc(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise InvalidToken("malformed claims") from None
