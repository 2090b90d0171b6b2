"""The only place that initialises Taichi.

Taichi has one global runtime per process: ``ti.init`` resets every kernel, so it is called
once, lazily, with the arch of the first tensor handed to a kernel. Taichi is not thread-safe,
so every launch holds one lock. On CUDA, Taichi launches on the default stream, so a launch
from under a side stream is refused; and it addresses the first visible GPU only (its CUDA
context is that of device ordinal 0, with no device argument), so a tensor on any other GPU is
refused before a launch: one process per GPU, each restricted to its GPU by
``CUDA_VISIBLE_DEVICES`` (:func:`rank_gpu`), is how several GPUs are used.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from typing import Optional

import torch

from .errors import ShiftwiseError

os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "0")
# Taichi wraps every kernel call with a print to sys.stdout when it was imported while stdout was
# redirected (pytest capture, --json output); our kernels never print, so keep calls unwrapped.
os.environ.setdefault("TI_ENABLE_PYBUF", "0")

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_arch_device: str | None = None  # "cpu" or "cuda" once initialised
_inherited = False  # this process was forked from one whose Taichi runtime was live
_failed: dict = {}  # device type -> why Taichi could not start there (it is not tried again)


def _after_fork_in_child() -> None:
    # A forked child inherits Taichi's state but not its threads: any launch hangs, and so
    # does ti.init (it tears the old runtime down). Such a child must not use Taichi.
    global _inherited, _lock
    _inherited = _inherited or _arch_device is not None
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TaichiUnavailable(RuntimeError):
    """Raised when the Taichi backend cannot run for the given tensors."""


class WrongCudaDevice(TaichiUnavailable, ShiftwiseError):
    """A CUDA tensor on a GPU other than the first visible one, which is the only one Taichi
    addresses (``backend="auto"`` runs PyTorch's conv there instead)."""


class TaichiArchMismatch(TaichiUnavailable, ShiftwiseError):
    """``TI_ARCH`` asks Taichi for an arch other than the tensors' device type (raised for
    ``backend="auto"`` too: the setting contradicts the call)."""


# TI_ARCH values (Taichi's arch names) by the device type they run tensors of; Taichi aborts the
# whole process on a name it does not know, so the name is checked before ti.init sees it.
TI_ARCH_DEVICE = {"x64": "cpu", "arm64": "cpu", "cuda": "cuda"}
TI_ARCH_OTHER = ("amdgpu", "dx11", "dx12", "gles", "js", "metal", "opencl", "opengl", "vulkan")


def env_arch(device_type: str) -> None:
    """Raise :class:`TaichiArchMismatch` if ``TI_ARCH`` is set and would start Taichi on an arch
    that cannot run tensors of ``device_type``; ``ti.init`` takes ``TI_ARCH`` over its ``arch``
    argument, so the kernels would be handed pointers of the other device."""
    name = os.environ.get("TI_ARCH")
    if name is None:
        return
    want = {"cpu": "x64 or arm64", "cuda": "cuda"}.get(device_type, device_type)
    if name not in TI_ARCH_DEVICE and name not in TI_ARCH_OTHER:
        raise TaichiArchMismatch(
            f"TI_ARCH={name!r} is not a Taichi arch name (Taichi would abort the process); unset TI_ARCH or "
            f"set it to {want} for {device_type} tensors")
    if TI_ARCH_DEVICE.get(name) != device_type:
        raise TaichiArchMismatch(
            f"TI_ARCH={name} starts Taichi on {name}, but the tensors are on {device_type}; unset TI_ARCH or set it "
            f"to {want} (or use backend='torch')")


def visible_gpus(visible: str) -> list:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value that CUDA uses: indices or UUIDs, up to the
    first empty or negative one (CUDA ignores the rest)."""
    out = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        out.append(entry)
    return out


def rank_gpu(local_rank: int, visible: Optional[str] = None, count: Optional[int] = None,
             ranks: Optional[int] = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that leaves local rank ``local_rank`` its own GPU as its
    only device, ``cuda:0`` (the one Taichi addresses).

    Args:
        local_rank: the process's rank on its node (torchrun's ``LOCAL_RANK``).
        visible: the ``CUDA_VISIBLE_DEVICES`` the process was started with (``None``: unset, every
            GPU); the rank takes its entry, so a launcher's selection is respected.
        count: how many GPUs the process sees (``None``: unknown).
        ranks: processes on the node (torchrun's ``LOCAL_WORLD_SIZE``; ``None``: unknown).

    Raises ``ValueError`` (one line) when the node has more processes than GPUs.

    Example::

        >>> rank_gpu(1), rank_gpu(1, visible="4,6"), rank_gpu(0, visible="GPU-8e1c")
        ('1', '6', 'GPU-8e1c')
    """
    gpus = None if visible is None else visible_gpus(visible)
    n = len(gpus) if gpus is not None else count
    if gpus is not None and count is not None:
        n = min(n, count)
    if local_rank < 0:
        raise ValueError(f"local rank {local_rank} is negative; LOCAL_RANK counts processes on a node from 0")
    needed = max(local_rank + 1, ranks or 0)
    if n is not None and needed > n:
        seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(
            f"{needed} processes on this node but {n} GPU{'s' if n != 1 else ''} visible{seen}; Taichi runs each "
            f"process on one GPU of its own: start at most {n} per node (torchrun --nproc-per-node {n})"
            if n else f"no GPU visible{seen} for local rank {local_rank}; use --device cpu or make a GPU visible")
    return gpus[local_rank] if gpus is not None else str(local_rank)


def cuda_index(device: torch.device) -> int:
    """The ordinal of a CUDA ``device`` (``cuda`` without an index: PyTorch's current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _one_gpu_hint(index: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        gpu = rank_gpu(index, visible)
    except ValueError:
        gpu = str(index)
    return f"CUDA_VISIBLE_DEVICES={gpu}"


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
    try:
        with contextlib.redirect_stdout(banner):  # ti.init prints its arch to stdout unconditionally
            ti.init(enable_fallback=False, **kwargs)  # never quietly on the CPU for CUDA tensors
    except Exception as exc:  # noqa: BLE001 - whatever stops Taichi there, the tensors need the reason
        _failed[device_type] = (f"Taichi could not start on {device_type} ({' '.join(str(exc).split())}); "
                                "use backend='torch'")
        raise TaichiUnavailable(_failed[device_type]) from exc
    logger.debug("%s", banner.getvalue().strip())
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
    if _arch_device is None:
        if device.type in _failed:
            raise TaichiUnavailable(_failed[device.type])
        env_arch(device.type)
    if device.type == "cuda":
        index = cuda_index(device)
        if index != 0:
            raise WrongCudaDevice(
                f"Taichi runs on the first visible GPU only and the tensors are on cuda:{index}; run one process per "
                f"GPU with {_one_gpu_hint(index)} so that it is cuda:0 (or use backend='torch')")
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
