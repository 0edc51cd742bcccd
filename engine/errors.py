"""The exception of bad input: a file, a setting or a data set that a command was handed and cannot
use. Its message names the problem and the fix; train.py, eval.py and certify.py print it as one
`error:` line instead of a traceback (a traceback says "a bug in this code", which this is not)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class InputError(ValueError):
    """Something the user handed over is wrong; the message says what and what to do instead."""


@contextlib.contextmanager
def reported_as_one_line(kinds: tuple[type[Exception], ...] = (InputError,)) -> Iterator[None]:
    """Inside: an exception of `kinds` ends the command with `error: <message>` (exit status 1)
    instead of a traceback."""
    try:
        yield
    except kinds as bad_input:
        raise SystemExit(f"error: {bad_input}") from bad_input
