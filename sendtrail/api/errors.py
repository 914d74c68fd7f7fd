"""Errors of the HTTP API.

Raise an :class:`ApiError` (or one of its subclasses) from a handler; the web
app's error middleware turns it into ``{"error": {"code", "message"}}`` with
``status``. :func:`error_response` builds that response, for middlewares and
for code that answers without raising.
"""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    """An error with an HTTP status, a machine-readable code and a message for people."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, *args: Any, status: int | None = None, code: str | None = None,
                 message: str | None = None, details: dict[str, Any] | None = None):
        """``ApiError(status, code, message)`` or ``BadRequest(message)`` / ``ApiError(message, status=, code=)``."""
        if len(args) == 3 and isinstance(args[0], int):
            status, code, message = args
        elif len(args) == 1 and message is None:
            message = str(args[0])
        elif args:
            raise TypeError("ApiError(status, code, message) or ApiError(message)")
        message = message or "error"
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = int(status)
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details
        return {"error": err}

    def to_response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.details)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class BadRequest(ApiError):
    """A query parameter or body is missing or malformed (400)."""

    status = 400
    code = "bad_request"


class NotFound(ApiError):
    """The automation, mailing, contact or list does not exist (404)."""

    status = 404
    code = "not_found"


class Unavailable(ApiError):
    """The database cannot answer right now (503)."""

    status = 503
    code = "unavailable"


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return web.Response(
        status=status, body=orjson.dumps({"error": err}), content_type="application/json"
    )
