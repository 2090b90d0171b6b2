"""Exceptions that carry a user-facing message (the CLI prints them on one line, exit 2)."""


class ShiftwiseError(Exception):
    """Base class of errors caused by bad input rather than by a bug."""


class CheckpointError(ShiftwiseError):
    """A checkpoint file cannot be read, is unsafe, or does not match a known architecture."""


class OutputExistsError(ShiftwiseError):
    """An output file exists and ``--force`` was not given."""
