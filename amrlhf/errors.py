"""User-facing errors: an expected mistake is reported as one clear message, never a traceback."""

from __future__ import annotations


class AmrlhfError(Exception):
    """An expected mistake (bad path, bad config, missing asset, malformed data)."""


class DataError(AmrlhfError):
    """A malformed data row: names the file, the line (or row) and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = source if line is None else f"{source}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {problem}")


class ConfigError(AmrlhfError, ValueError):
    """A setting no run can use (a negative learning rate, a batch of 0), refused where it is given: at
    construction. Also a ValueError, for code that builds the classes directly."""
