"""Output files of the commands: refuse to overwrite without ``--force``, write atomically.

``claim`` is called before any work starts (a run of minutes must not end in "file exists"),
``atomic`` around the write itself: the data goes to a temporary file in the same folder
(same suffix, so writers that infer the format from it still do) and replaces ``path`` only
once complete and on disk; a failed write leaves ``path`` as it was and no temporary file
behind. Every file the package writes goes through these two: converted checkpoints, ONNX
exports, training checkpoints, and the outputs of bench, erf and inspect.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Iterator, Optional

from .errors import OutputExistsError, ShiftwiseError


def json_text(obj, indent=2) -> str:
    """Strict JSON of ``obj`` (what ``--json`` prints and result files hold): non-finite floats
    become the strings ``"inf"``, ``"-inf"``, ``"nan"`` (an out-of-memory time is ``inf``), which
    every JSON parser reads; :func:`json_restore` turns them back."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: finite(a) for k, a in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(a) for a in v]
        return v
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def json_restore(v):
    """The inverse of :func:`json_text` on loaded JSON."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, dict):
        return {k: json_restore(a) for k, a in v.items()}
    if isinstance(v, list):
        return [json_restore(a) for a in v]
    return v


def claim(path: Optional[str], force: bool, what: str = "output") -> Optional[str]:
    """Check that ``path`` may be written: not a directory, its folder exists, and it does not
    exist unless ``force``. Returns ``path`` (``None`` passes through)."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ShiftwiseError(f"{what} {path} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ShiftwiseError(f"{what} {path}: folder {folder} does not exist; create it first")
    if os.path.exists(path) and not force:
        raise OutputExistsError(f"{what} {path} exists; pass --force to overwrite it")
    return path


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temporaries(path) -> list:
    """Temporary files :func:`atomic` left next to ``path`` when its process was killed mid-write."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    prefix = f".{name}."
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix) and ".tmp" in f[len(prefix):]]


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same suffix); once the body has written it, it is
    flushed to disk, given the usual permissions and renamed onto ``path``. On any failure the
    temporary file is removed and ``path`` is unchanged (an ``OSError`` is reported as a
    :class:`ShiftwiseError` naming the file)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
        _fsync_folder(folder)  # the rename itself survives a power loss
    except OSError as exc:
        raise ShiftwiseError(f"cannot write {path}: {exc.strerror or exc}; nothing was changed") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
