"""Typed engine errors. server/errors.py maps each to an HTTP status and OpenAI error body in one place."""


class FamserveError(Exception):
    """Base of every error the engine raises on purpose."""


class CheckpointError(FamserveError):
    """A model file or folder is missing, truncated, corrupt or of an unsupported kind; the message names it."""


class StateMismatchError(FamserveError):
    """A saved state was made by another model or attention config than the one asked to load it."""


class StateFormatError(FamserveError):
    """A saved state is corrupt, truncated or of an unknown format version."""


class ContextLengthError(FamserveError):
    """Full-attention mode was asked to hold more tokens than it preallocated."""


class InvalidRequestError(FamserveError):
    """A request the engine cannot serve as given (bad sampling values, empty prompt, unknown token ids)."""


class QueueFullError(FamserveError):
    """The engine's waiting queue is full; the caller should retry later."""
