"""User-facing errors: an expected mistake is reported as one clear message, never a traceback."""

from __future__ import annotations

import signal


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


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT) ended the command: the CLI prints the message (where the checkpoint
    is and how to resume) and exits with 128 + the signal number. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {signal.Signals(self.signum).name}")
