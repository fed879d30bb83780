"""Errors a person can act on: each renders as one line naming file, line and field."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisionpipeError(Exception):
    """Base class for every error visionpipe reports to a user as one line."""


class ConfigError(VisionpipeError):
    """A pipeline config value is wrong; knows where it came from."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(self.render())

    def render(self) -> str:
        """Render as `file:line: field: message`."""
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


class UsageError(VisionpipeError):
    """The command line itself is wrong (missing argument, unsupported option value): exit code 2."""


class DataError(VisionpipeError):
    """Input data (images, annotations, text) is missing or malformed."""


class UnsafePathError(DataError):
    """A path from a config or annotation escapes the root it must stay under."""


class ImageReadError(DataError):
    """An image could not be decoded; carries the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class TrainingError(VisionpipeError):
    """Training cannot go on (e.g. a non-finite loss)."""


class ExportError(VisionpipeError):
    """Export failed or the exported model does not match PyTorch."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str], context: str = "") -> str:
    """Message for an unknown registry name that suggests and lists valid names."""
    choices = sorted(choices)
    ctx = f" for {context}" if context else ""
    return f"unknown {kind} '{name}'{ctx}{did_you_mean(name, choices)} (valid: {', '.join(choices)})"
