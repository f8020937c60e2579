"""Test helpers for OIDC: mint Google-style ID tokens and serve their certificates.

``TokenMinter`` holds a fresh RSA key and a self-signed certificate for it (the
``{kid: PEM certificate}`` format of https://www.googleapis.com/oauth2/v1/certs)
and mints RS256 tokens with the claims Cloud Tasks sends. ``CertsServer``
serves a certs mapping over real HTTP on 127.0.0.1 and counts requests::

    minter = TokenMinter()
    with CertsServer(minter.certs()) as server:
        verifier = OidcVerifier(audience=AUDIENCE, allowed_service_accounts=[EMAIL],
                                certs_url=server.url)
        verifier.verify("Bearer " + minter.mint(email=EMAIL, audience=AUDIENCE))
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import secrets
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

DEFAULT_EMAIL = "tasks-invoker@example-project.iam.gserviceaccount.com"
DEFAULT_AUDIENCE = "https://worker.example.com/_cloudtasks/push"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as in JWT segments."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def build_token(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes) -> str:
    """Assemble a JWT by hand (for ``alg: none``, HS256 and other forgeries)."""
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        ]
    )


class TokenMinter:
    """An RSA signing key with a self-signed certificate, minting Google-like ID tokens."""

    def __init__(self, kid: str | None = None) -> None:
        self.kid = kid or secrets.token_hex(20)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.signer = crypt.RSASigner.from_string(private_pem, key_id=self.kid)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-oidc-signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def certs(self) -> dict[str, str]:
        """``{kid: PEM certificate}``, the v1 certs format google-auth verifies against."""
        return {self.kid: self.cert_pem}

    def claims(
        self,
        *,
        email: str | None = DEFAULT_EMAIL,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = "https://accounts.google.com",
        email_verified: Any = True,
        iat: float | None = None,
        exp: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The payload Cloud Tasks' tokens carry (``email=None`` leaves the email out)."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": "1098765432101234567890",
            "azp": "1098765432101234567890",
            "email_verified": email_verified,
            "iat": now if iat is None else iat,
            "exp": (now + 3600) if exp is None else exp,
        }
        if email is not None:
            payload["email"] = email
        payload.update(extra or {})
        return payload

    def mint(
        self,
        *,
        email: str | None = DEFAULT_EMAIL,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = "https://accounts.google.com",
        email_verified: Any = True,
        iat: float | None = None,
        exp: float | None = None,
        kid: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed RS256 token; ``kid`` overrides the header's key id."""
        payload = self.claims(
            email=email,
            audience=audience,
            issuer=issuer,
            email_verified=email_verified,
            iat=iat,
            exp=exp,
            extra=extra,
        )
        token: bytes = jwt.encode(self.signer, payload, key_id=kid or self.kid)
        return token.decode("ascii")


class CertsServer:
    """Serve a certs JSON mapping on 127.0.0.1 (a free port) in a thread.

    ``certs``, ``status`` and ``headers`` may be changed while it runs (key
    rotation, outages, Cache-Control); ``hits`` counts requests received.
    """

    def __init__(
        self,
        certs: Mapping[str, str],
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.certs: dict[str, str] = dict(certs)
        self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.body: bytes | None = None  # overrides the JSON body when set
        self._hits = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    def start(self) -> CertsServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner._hits += 1
                body = owner.body if owner.body is not None else json.dumps(owner.certs).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                for name, value in owner.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}/oauth2/v1/certs"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut down and close the socket: the URL then refuses connections."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> CertsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
