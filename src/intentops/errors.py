"""Errors that speak to the user: what went wrong, where, and what to do about it."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's data, config or request, reported without a traceback.

    Args:
        what: what is wrong, in one sentence.
        where: the file, row, field or URL concerned.
        fix: what the user should do next.
    """

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"error: {self.what}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class DataValidationError(UserError):
    """Critical data expectations failed; the pipeline stops before any output is replaced."""

    exit_code = 3


def setup_logging(level: int = logging.INFO) -> None:
    """Configure root logging for a command-line entry point (never at import time)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def cli_entry(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a stage's `main` so that a UserError prints its message and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(err.render(), file=sys.stderr)
            sys.exit(err.exit_code)

    return wrapper
