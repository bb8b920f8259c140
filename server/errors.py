"""The one place that maps exceptions to HTTP statuses and OpenAI error bodies
{"error": {"message", "type", "param", "code"}}: request validation, unknown routes, engine errors, and anything
unexpected (a generic 500 whose details stay in the server log). Streams use the same mapping for their error event."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from famserve.engine.errors import (ContextLengthError, InvalidRequestError, QueueFullError, StateFormatError,
                                    StateMismatchError)

from .sessions import SessionBusyError, SessionNotFoundError
from .store import SessionCorruptError


# The error types we answer with (OpenAI's vocabulary): one per kind of failure, stable for clients to branch on.
INVALID_REQUEST = "invalid_request_error"  # 400, 404, 405, 413: the client should change the request
AUTHENTICATION = "authentication_error"  # 401
RATE_LIMIT = "rate_limit_error"  # 429: retry later
SERVER_ERROR = "server_error"  # 500, 503, 504: not the client's fault

QUEUE_FULL_RETRY_AFTER_S = 1  # Retry-After on 429
_PARAM_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\]|\.[a-z_][a-z0-9_]*)*): (.+)$", re.DOTALL)
_TYPE_ERROR_SUFFIXES = ("_type", "_parsing")
_CUSTOM_CODES = ("unsupported_parameter", "invalid_type", "invalid_value")  # codes our own validators raise


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raise it anywhere in the server."""

    status_code = 400
    error_type = INVALID_REQUEST

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 status_code: int | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status_code = status_code or self.status_code
        self.error_type = error_type or self.error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    @classmethod
    def from_message(cls, message: str, code: str = "invalid_value") -> "APIError":
        """"field: what is wrong" (the engine's and SamplingParams' convention) -> a 400 whose param is field."""
        match = _PARAM_PREFIX.match(message)
        return cls(message, code=code, param=match.group(1) if match else None)


class NotFoundError(APIError):
    status_code = 404


class NotReadyError(APIError):
    status_code = 503
    error_type = SERVER_ERROR


class RequestTimeoutError(APIError):
    status_code = 504
    error_type = SERVER_ERROR


class EngineFailureError(APIError):
    status_code = 500
    error_type = SERVER_ERROR


class PayloadTooLargeError(StarletteHTTPException):
    """Raised by the body-size middleware while the body streams in; FastAPI re-raises HTTPExceptions unchanged."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {limit_bytes} bytes")


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_json(status_code: int, message: str, error_type: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status_code, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Any exception -> the APIError a client sees. Unexpected ones become a bare 500 (the caller logs them)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, QueueFullError):
        return APIError(f"the server is overloaded: {exc}; retry later", code="queue_full", status_code=429,
                        error_type=RATE_LIMIT, headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    if isinstance(exc, ContextLengthError):
        return APIError(str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError.from_message(str(exc))
    if isinstance(exc, SessionNotFoundError):
        return APIError(str(exc), code="session_not_found", status_code=404)
    if isinstance(exc, SessionBusyError):
        return APIError(str(exc), code="session_busy", status_code=409)
    if isinstance(exc, (StateMismatchError, StateFormatError)):
        return APIError(str(exc), code="invalid_state", param="body")
    if isinstance(exc, SessionCorruptError):  # refused, never loaded; the message names what failed its check
        return APIError(str(exc), code="session_corrupt", status_code=500, error_type=SERVER_ERROR)
    if isinstance(exc, PayloadTooLargeError):
        return APIError(exc.detail, code="request_too_large", status_code=413)
    if isinstance(exc, StarletteHTTPException):
        return _http_error(exc)
    return APIError("internal server error", code="internal_error", status_code=500, error_type=SERVER_ERROR)


def _http_error(exc: StarletteHTTPException) -> APIError:
    codes = {400: "invalid_body", 404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}
    error_type = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    return APIError(str(exc.detail), code=codes.get(exc.status_code), status_code=exc.status_code,
                    error_type=error_type, headers=dict(exc.headers or {}))


def _param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; union-branch tags such as "list[int]" or
    "ContentPart" that pydantic puts in locations are dropped."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower() and part not in ("str", "int", "list"):
            param += f".{part}" if param else part
    return param or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError("invalid request", code="invalid_value")
    error = errors[0]  # the first field at fault, in the order of the reference
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "malformed JSON")
        return APIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = _param(tuple(error.get("loc", ())))
    code = kind if kind in _CUSTOM_CODES else ("invalid_type" if kind.endswith(_TYPE_ERROR_SUFFIXES)
                                               else "invalid_value")
    named = _PARAM_PREFIX.match(error.get("msg", "")) if kind in _CUSTOM_CODES else None
    if named:  # a check of a whole object names the field at fault: "tool_choice: ..." inside the object's loc
        param = f"{param}.{named.group(1)}" if param else named.group(1)
        error = {**error, "msg": named.group(2)}
    if kind == "missing":
        code = "missing_required_parameter"
        message = f"{param}: this field is required" if param else "the request body is missing"
    elif param is None and code == "invalid_type":
        message = "the request body must be a JSON object (send Content-Type: application/json)"
    else:
        message = f"{param}: {error.get('msg', 'invalid value')}" if param else error.get("msg", "invalid request")
    return APIError(message, code=code, param=param)


def api_error_response(exc: BaseException) -> JSONResponse:
    error = to_api_error(exc)
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers or None)


def register_exception_handlers(app: FastAPI) -> None:
    """Every error path of the app answers in OpenAI's shape; FastAPI's 422 becomes 400. An unexpected exception
    gets a bare 500 here, then Starlette re-raises it so uvicorn logs its traceback (server side only)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc)
        if error.status_code == 404 and isinstance(exc, StarletteHTTPException) and exc.detail == "Not Found":
            error.message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405 and isinstance(exc, StarletteHTTPException):
            error.message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers or None)

    for exc_class in (APIError, RequestValidationError, StarletteHTTPException, QueueFullError, ContextLengthError,
                      InvalidRequestError, SessionNotFoundError, SessionBusyError, StateMismatchError,
                      StateFormatError, SessionCorruptError, Exception):
        app.add_exception_handler(exc_class, handle)
