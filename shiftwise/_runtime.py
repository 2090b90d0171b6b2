"""The only place that initialises Taichi.

Taichi has one global runtime per process: ``ti.init`` resets every kernel, so it is called
once, lazily, with the arch of the first tensor handed to a kernel. Taichi is not thread-safe,
so every launch holds one lock. On CUDA, Taichi launches on the default stream, so a launch
from under a side stream is refused.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading

import torch

os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "0")
# Taichi wraps every kernel call with a print to sys.stdout when it was imported while stdout was
# redirected (pytest capture, --json output); our kernels never print, so keep calls unwrapped.
os.environ.setdefault("TI_ENABLE_PYBUF", "0")

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_arch_device: str | None = None  # "cpu" or "cuda" once initialised
_inherited = False  # this process was forked from one whose Taichi runtime was live


def _after_fork_in_child() -> None:
    # A forked child inherits Taichi's state but not its threads: any launch hangs, and so
    # does ti.init (it tears the old runtime down). Such a child must not use Taichi.
    global _inherited, _lock
    _inherited = _inherited or _arch_device is not None
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TaichiUnavailable(RuntimeError):
    """Raised when the Taichi backend cannot run for the given tensors."""


def _import_taichi():
    try:
        import taichi as ti  # noqa: PLC0415 (imported lazily: importing taichi costs ~0.5 s)
    except ImportError as exc:  # pragma: no cover - taichi is a hard dependency
        raise TaichiUnavailable(f"taichi is not importable ({exc}); pip install 'taichi>=1.7,<1.8'") from exc
    return ti


def _init(device_type: str) -> None:
    global _arch_device
    ti = _import_taichi()
    if device_type == "cuda":
        arch = ti.cuda
    elif device_type == "cpu":
        arch = ti.cpu
    else:
        raise TaichiUnavailable(f"no Taichi arch for device type {device_type!r}; use backend='torch'")
    threads = int(os.environ.get("SHIFTWISE_CPU_THREADS", "0")) or torch.get_num_threads()
    kwargs = dict(arch=arch, log_level=ti.WARN, default_fp=ti.f32)
    if device_type == "cpu":
        kwargs["cpu_max_num_threads"] = max(1, threads)
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):  # ti.init prints its arch to stdout unconditionally
        ti.init(**kwargs)
    logger.debug("%s", banner.getvalue().strip())
    if device_type == "cuda" and ti.lang.impl.current_cfg().arch != ti.cuda:
        raise TaichiUnavailable("Taichi could not start on CUDA (it fell back to the CPU); use backend='torch'")
    _arch_device = device_type
    logger.debug("taichi initialised on %s", device_type)


def check_runnable(device: torch.device) -> None:
    """Raise :class:`TaichiUnavailable` with the reason if Taichi cannot run on ``device`` now."""
    if _inherited:
        raise TaichiUnavailable(
            "this process was forked after Taichi started in its parent, and Taichi cannot run in such a child "
            "(e.g. a DataLoader worker); use backend='torch' here or multiprocessing_context='spawn'")
    if device.type not in ("cpu", "cuda"):
        raise TaichiUnavailable(f"Taichi kernels run on cpu or cuda tensors, got {device}; use backend='torch'")
    if _arch_device is not None and _arch_device != device.type:
        raise TaichiUnavailable(
            f"Taichi was initialised for {_arch_device} in this process and cannot also run on {device.type} "
            "(ti.init would reset it); use backend='torch' for these tensors")
    if device.type == "cuda":
        if device.index not in (None, 0) and device.index != torch.cuda.current_device():
            raise TaichiUnavailable(f"Taichi runs on the current CUDA device only, got {device}")
        if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
            raise TaichiUnavailable("Taichi launches on the default CUDA stream; called under a side stream")


@contextlib.contextmanager
def launch(device: torch.device):
    """Hold the Taichi lock, initialised for ``device``'s arch, for one or more kernel launches."""
    with _lock:
        check_runnable(device)
        if _arch_device is None:
            _init(device.type)
        yield


def initialised_device() -> str | None:
    """``"cpu"``/``"cuda"`` once Taichi is initialised in this process, else ``None``."""
    return _arch_device
