"""The two kinds of input error. The CLI prints either as one line and exits 2; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted key."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and row) and what to do."""
