"""errors.to_api_error, in process: every engine error the server can meet maps to one status and error body."""

from __future__ import annotations

import pytest

from famserve.engine.errors import CheckpointError, ContextLengthError, InvalidRequestError, QueueFullError
from famserve.server.errors import APIError, PayloadTooLargeError, to_api_error


@pytest.mark.parametrize(("exc", "status", "error_type", "param", "code"), [
    (QueueFullError("3 requests are already waiting"), 429, "rate_limit_error", None, "queue_full"),
    (ContextLengthError("full attention holds 8192 tokens"), 400, "invalid_request_error", None,
     "context_length_exceeded"),
    (InvalidRequestError("messages[1].role: 'tool' is not one of system, user"), 400, "invalid_request_error",
     "messages[1].role", "invalid_value"),
    (InvalidRequestError("the prompt must contain at least one token"), 400, "invalid_request_error", None,
     "invalid_value"),
    (PayloadTooLargeError(100), 413, "invalid_request_error", None, "request_too_large"),
    (CheckpointError("/secret/path/model.gguf: corrupt"), 500, "server_error", None, "internal_error"),
    (RuntimeError("CUDA out of memory at /secret/path"), 500, "server_error", None, "internal_error"),
])
def test_engine_errors_map_to_one_status(exc: Exception, status: int, error_type: str, param: str | None,
                                         code: str) -> None:
    error = to_api_error(exc)
    assert (error.status_code, error.error_type, error.param, error.code) == (status, error_type, param, code)
    if status == 500:
        assert error.message == "internal server error"  # nothing of the exception reaches the client


def test_queue_full_says_when_to_retry() -> None:
    assert to_api_error(QueueFullError("full")).headers == {"Retry-After": "1"}


def test_sampling_params_messages_name_their_field() -> None:
    error = APIError.from_message("top_k: must be an integer >= -1 (0 or -1 = off), got -5")
    assert (error.status_code, error.param, error.code) == (400, "top_k", "invalid_value")
