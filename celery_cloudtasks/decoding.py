"""Decode the Celery body carried by an envelope, safely.

``kombu.Message`` decompresses a ``compression`` header before any content-type
check, and ``kombu.serialization.loads`` with ``accept=None`` may unpickle if
anything in the process enabled insecure serializers. So the push endpoint
never builds a ``Message`` from untrusted input: it checks the body encoding,
the content type against an explicit accept list (JSON by default; pickle only
if listed in ``endpoint_accept_content``) and refuses compression unless
``endpoint_allow_compression`` is set, all before decoding anything.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from kombu.compression import decompress
from kombu.serialization import loads, prepare_accept_content

from .errors import EnvelopeError

__all__ = ["decode_body"]


def decode_body(
    message: Mapping[str, Any], *, accept: Sequence[str], allow_compression: bool
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Decode a Celery protocol-2 body into ``(args, kwargs, embed)``.

    Checks, in this order and before any decompression or deserialization:
    the body encoding, the ``compression`` header, the content type against
    ``accept``. Any problem is an :class:`EnvelopeError` (never retried).
    """
    properties = message.get("properties") or {}
    headers = message.get("headers") or {}
    body = message.get("body")
    if not isinstance(body, str):
        raise EnvelopeError("message body must be a string")
    encoding = properties.get("body_encoding")
    try:
        if encoding == "base64":
            raw = base64.b64decode(body.encode("ascii"), validate=True)
        elif encoding in (None, ""):
            raw = body.encode("utf-8")
        else:
            raise EnvelopeError(f"unsupported body_encoding {encoding!r}")
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise EnvelopeError(f"body is not valid {encoding or 'text'}: {exc}") from None
    compression = headers.get("compression")
    accepted = prepare_accept_content(list(accept))
    content_type = message.get("content-type")
    if content_type not in accepted:
        raise EnvelopeError(
            f"content type {content_type!r} is not accepted by this endpoint "
            f"(endpoint_accept_content={list(accept)})"
        )
    if compression:
        if not allow_compression:
            raise EnvelopeError(
                f"compressed body ({compression!r}) refused: set endpoint_allow_compression"
            )
        try:
            raw = decompress(raw, compression)
        except Exception as exc:
            raise EnvelopeError(f"cannot decompress body ({compression!r}): {exc}") from None
    try:
        payload = loads(raw, content_type, message.get("content-encoding"), accept=accepted)
    except Exception as exc:
        raise EnvelopeError(f"cannot decode body: {type(exc).__name__}: {exc}") from None
    if not (isinstance(payload, (list, tuple)) and len(payload) == 3):
        raise EnvelopeError("not a Celery protocol 2 body ([args, kwargs, embed])")
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise EnvelopeError("task args must be a list and kwargs an object")
    if embed is not None and not isinstance(embed, dict):
        raise EnvelopeError("message embed must be an object")
    return list(args), kwargs, embed or {}
