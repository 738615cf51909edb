"""API keys: bearer tokens from a file or the environment, compared in constant
time. Keys are never logged or echoed."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from dflow.gateway.errors import APIError

#: Environment variable of API keys, separated by commas
ENV = "DFLOW_API_KEYS"


def load_keys(path: str | os.PathLike | None = None) -> list[bytes]:
    """Keys from ``path`` (one a line; blank lines and ``#`` comments skipped)
    and from ``$DFLOW_API_KEYS`` (comma-separated)."""
    keys = [k.strip() for k in os.environ.get(ENV, "").split(",")]
    if path is not None:
        for line in Path(path).read_text().splitlines():
            keys.append(line.partition("#")[0].strip())
    return [k.encode() for k in keys if k]


class KeyCheck:
    """A FastAPI dependency: 401 unless the request carries one of ``keys`` as
    ``Authorization: Bearer KEY``; with no keys, every request passes."""

    def __init__(self, keys: Iterable[bytes]):
        self.keys = list(keys)

    def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing API key: send `Authorization: Bearer KEY`")
        given = token.strip().encode(errors="surrogateescape")
        # every key is compared, so the time taken tells nothing of which matched
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise _unauthorized("invalid API key")


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
