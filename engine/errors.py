"""The exception of bad input: a file, a setting or a data set that a command was handed and cannot
use. Its message names the problem and the fix; train.py, eval.py and certify.py print it as one
`error:` line instead of a traceback (a traceback says "a bug in this code", which this is not)."""

from __future__ import annotations


class InputError(ValueError):
    """Something the user handed over is wrong; the message says what and what to do instead."""
