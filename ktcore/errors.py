"""User-facing errors.

Every error a user can cause (bad YAML, unknown backend, bad weights, ...) is a ``KtError``.
The CLI prints ``str(error)`` and exits non-zero without a traceback; anything that is not a
``KtError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class KtError(Exception):
    """Base class of every error caused by user input or by the host."""


class SourceError(KtError):
    """An error tied to a place in a file: ``file:line: message``."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        self.message = message
        self.file = file
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message}"


class RuleError(SourceError):
    """A rule file is malformed or cannot be satisfied on this host/model."""


class BackendError(KtError):
    """A backend is unknown, failed to load, or cannot run here."""


class WeightError(KtError):
    """Weights are missing, truncated, of the wrong shape or of an unsupported type."""
