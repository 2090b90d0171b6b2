"""Exceptions that carry a user-facing message (the CLI prints them on one line, exit 2)."""
import os


class ShiftwiseError(Exception):
    """Base class of errors caused by bad input rather than by a bug."""


class CheckpointError(ShiftwiseError):
    """A checkpoint file cannot be read, is unsafe, or does not match a known architecture."""


class OutputExistsError(ShiftwiseError):
    """An output file exists and ``--force`` was not given."""


class BadImageError(ShiftwiseError):
    """An image file cannot be decoded (unreadable, truncated, not an image); ``.path`` names it.

    ``BadImageError(path, reason)`` builds the message. A ``DataLoader`` re-raises an error of a
    worker process as ``BadImageError(text)`` with the worker's whole traceback as ``text``; the
    one-line message and the path are recovered from it, so the error reads the same with and
    without worker processes.
    """

    _PREFIX = "cannot read image "
    _HINT = "; remove or replace the file, or pass --skip-bad-images"

    def __init__(self, path: str, reason: str = None):
        if reason is None:
            path, reason = self._parse(str(path))
        self.path, self.reason = path, reason
        super().__init__(f"{self._PREFIX}{path}: {reason}{self._HINT}" if reason is not None else path)

    @classmethod
    def _parse(cls, text: str) -> tuple:
        """``(path, reason)`` from a message of this class anywhere in ``text``; ``(text, None)``
        if there is none."""
        start = text.rfind(cls._PREFIX)
        end = text.find(cls._HINT, start)
        if start < 0 or end < 0:
            return text, None
        body = text[start + len(cls._PREFIX):end]
        splits = [i for i in range(len(body)) if body.startswith(": ", i)]
        if not splits:
            return text, None
        # the path itself may hold ": "; the split after an existing file is the right one
        cut = next((i for i in splits if os.path.isfile(body[:i])), splits[0])
        return body[:cut], body[cut + 2:]

    def __reduce__(self):
        return type(self), (self.path, self.reason)
