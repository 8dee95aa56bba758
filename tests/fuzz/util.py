"""What every fuzz test here checks, and the budget it runs under.

"One line" is the house style of a user-facing error: a ValueError or TypeError is exactly one
line (no newline in str(exc)); a ShardfxError's first line names the problem and any further lines
are its indented context ("  node: ...", "  module: ...", "  source: ...", see errors.py;
"  raised at FILE:LINE" from the pass manager).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from hypothesis import HealthCheck, settings

from shardfx.errors import ShardfxError

# derandomize: the same examples on every run (CI is reproducible); database=None: nothing is
# replayed from an earlier run either. The deadline is per example; `no_hang` below is the hard stop.
SETTINGS = {
    "derandomize": True,
    "database": None,
    "deadline": 5000,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}


def fuzz(max_examples: int, deadline_ms: int = 5000) -> settings:
    return settings(**{**SETTINGS, "deadline": deadline_ms}, max_examples=max_examples)


# Errors a user may see: their own mistake (ValueError/TypeError) or a shardfx error.
ALLOWED = (ValueError, TypeError, ShardfxError)
_CONTEXT = ("  node: ", "  module: ", "  source: ", "  raised at ")


def check_error(exc: BaseException) -> str:
    """The message of an allowed, one-line error (AssertionError naming what is wrong otherwise)."""
    assert isinstance(exc, ALLOWED), f"{type(exc).__name__} is not a user-facing error: {exc!r}"
    text = str(exc)
    lines = text.split("\n")
    assert lines[0].strip(), f"{type(exc).__name__} with an empty first line: {text!r}"
    if isinstance(exc, ShardfxError):
        extra = [line for line in lines[1:] if not line.startswith(_CONTEXT)]
        assert not extra, f"{type(exc).__name__} has lines that are not its graph context: {text!r}"
    else:
        assert len(lines) == 1, f"{type(exc).__name__} message is not one line: {text!r}"
    return text


class Hang(BaseException):
    """An example ran past its hard time limit (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """Fail the example (raise Hang) when it runs longer than `seconds`: a hang is a failure, not a stuck CI."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
