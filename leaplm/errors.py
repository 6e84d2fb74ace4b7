"""Errors leaplm raises for bad input.

Every error a user can cause is a subclass of :class:`LeapLMError` with a message that names the
problem (the path, the field, the value) and, where there is one, the fix. The CLI prints the
message without a traceback; the server (later) maps them to 4xx answers.
"""
from __future__ import annotations


class LeapLMError(Exception):
    """Base class of every user-facing leaplm error."""


class ModelNotFoundError(LeapLMError):
    """A model path, short name or hub id that resolves to nothing."""


class CorruptModelError(LeapLMError):
    """A checkpoint file exists but cannot be read (truncated, wrong magic, missing tensors)."""


class UnsupportedModelError(LeapLMError):
    """A checkpoint of an architecture, tensor type or format leaplm does not run."""


class InvalidParamsError(LeapLMError, ValueError):
    """Sampling or engine parameters outside their valid range."""


class InvalidConstraintError(InvalidParamsError):
    """A structured-output constraint (JSON schema, regex, grammar) that cannot be compiled: a syntax error,
    a JSON-schema feature the grammar engine does not support (the message names it), an unsatisfiable
    schema, or one too complex to compile within the limits. Raised before generation starts."""


class ConstraintError(LeapLMError, RuntimeError):
    """A structured-output constraint failed during generation: a token the grammar does not allow was
    fed to it, or a step of the grammar engine ran past its resource limits."""


class PromptTooLongError(LeapLMError, ValueError):
    """A prompt (plus the requested tokens) that does not fit the context window."""


class FetchError(LeapLMError):
    """Downloading or verifying a known model failed (network, checksum)."""
