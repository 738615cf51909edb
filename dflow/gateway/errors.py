"""Errors in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An answer other than success, raised anywhere in a route.

    Parameters
    ----------
    status
        The HTTP status.
    message
        What went wrong and, for bad input, what is allowed.
    type
        OpenAI's error type: ``invalid_request_error`` (4xx) by default.
    param
        The request field at fault, by its OpenAI name.
    code
        A machine-readable code.
    headers
        Extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(
    param: str | None, message: str, code: str = "invalid_value"
) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found"):
    return APIError(404, message, param=param, code=code)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in the envelope."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(
            error.status_code,
            str(error.detail),
            code=code,
            headers=dict(error.headers or {}),
        ).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(
        request: Request, error: RequestValidationError
    ) -> JSONResponse:
        first = error.errors()[0]
        param = str(first["loc"][-1]) if first.get("loc") else None
        return bad_request(param, f"{param}: {first['msg']}").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return APIError(
            500,
            f"internal error: {type(error).__name__}: {error}",
            type="server_error",
            code="internal_error",
        ).response()
