"""The one error hierarchy of ForgetRT.

Every failure a user can cause (bad input, unknown names, corrupt or mismatched artifacts) raises a
subclass of :class:`ForgetRTError`, so a service can catch one base class and the CLI can map all of
them to a clean message and exit code at one boundary. Messages say what was expected, what came,
and, where there is a closed set, the valid choices.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ForgetRTError",
    "InvalidInputError",
    "UnknownNameError",
    "ArtifactError",
    "CorruptArtifactError",
    "MismatchError",
    "DataError",
    "BackendUnavailableError",
    "QueueFullError",
    "DeadlineExceededError",
    "RuntimeClosedError",
    "EngineError",
    "unknown",
]


class ForgetRTError(Exception):
    """Base class of every error ForgetRT raises on purpose."""

    exit_code = 1


class InvalidInputError(ForgetRTError, ValueError):
    """A value has the wrong shape, type or range (a tensor, a fraction, a weight, an option)."""

    exit_code = 2


class UnknownNameError(ForgetRTError, KeyError):
    """A name (architecture, class, vector, policy, backend, data spec kind) is not known."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class ArtifactError(ForgetRTError):
    """A file or folder ForgetRT reads (model, bank, bundle, archive) is missing or unusable."""

    exit_code = 3


class CorruptArtifactError(ArtifactError):
    """A file exists but cannot be parsed, or its content does not match its recorded hash."""


class MismatchError(ArtifactError):
    """Two artifacts that must belong together do not (a bank trained for another model, say)."""


class DataError(ForgetRTError):
    """A data set cannot be read, or a forget specification selects nothing usable."""

    exit_code = 2


class BackendUnavailableError(ForgetRTError):
    """A backend that was asked for by name cannot run here (library or device missing).

    Raised instead of silently falling back to another backend.
    """

    exit_code = 4


class QueueFullError(ForgetRTError):
    """The dynamic batcher's queue is full: the request was not accepted (retry later, or shed load)."""

    exit_code = 5


class DeadlineExceededError(ForgetRTError, TimeoutError):
    """A request's deadline passed before its batch ran; it was dropped, not computed."""

    exit_code = 5


class RuntimeClosedError(ForgetRTError):
    """The runtime was shut down; it accepts no new requests."""

    exit_code = 5


class EngineError(ForgetRTError):
    """The backend failed while running a batch; only that batch's requests fail."""

    exit_code = 5


def unknown(kind: str, name: object, choices: Iterable[object]) -> UnknownNameError:
    """Build the standard 'unknown X' error that lists the valid choices."""
    valid = ", ".join(str(c) for c in choices) or "(none)"
    shown = repr(name)
    if len(shown) > 120:  # a client's string is echoed, never whole
        shown = shown[:100] + f"... ({len(shown)} characters)"
    return UnknownNameError(f"unknown {kind} {shown}; valid: {valid}")
