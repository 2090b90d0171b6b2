"""Self-test of an installation on the user's own hardware: is every backend exact here, and how fast?

:func:`run_selftest` starts Taichi on the device, then checks every backend of
:func:`shiftwise.functional.shiftwise_conv2d` against PyTorch's depthwise conv of the merged kernel
(:func:`shiftwise.tiling.merge_tiles`, computed in float64, TF32 off) in float32 and float64 on
geometries chosen to catch border and indexing errors: forward, input, tile and bias gradients,
``torch.autograd.gradcheck`` in float64, bitwise determinism of two runs, and on CUDA that a
forward and backward make no hidden host synchronisation. Then it times the fused Taichi kernel
against the depthwise conv on the shift-wise paper's layer and SLaK-T stage 1. The result is
a :class:`SelftestResult` (:meth:`SelftestResult.to_dict` for JSON, :func:`format_report` for
the table).

Errors are relative to the output's scale: ``max |y - y_ref| / max |y_ref|`` for the output and
each gradient, compared with :data:`TOLERANCES` for the dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import platform
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _runtime, dispatch, progress
from ._version import __version__
from .bench import timing
from .bench.cases import PRESETS, compact, make_layer
from .errors import ShiftwiseError
from .functional import shiftwise_conv2d
from .tiling import TilePlan, merge_tiles, split_branches

__all__ = ["DeviceUnavailableError", "GEOMETRIES", "QUICK_GEOMETRIES", "SelftestResult", "TOLERANCES",
           "format_report", "run_selftest"]

# max |y - y_ref| / max |y_ref| allowed, per dtype, for outputs and gradients (the reference is
# computed in float64 from the same inputs, so this bounds the arithmetic error of the backend)
TOLERANCES = {torch.float32: 2e-5, torch.float64: 1e-12}
# backends whose two runs must agree bit for bit (every kernel is a Taichi kernel without atomics);
# the others run PyTorch convs, whose algorithms may reorder sums between runs on a GPU
BITWISE_BACKENDS = ("taichi", "taichi_fused")
GRADCHECK = {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-3}  # torch.autograd.gradcheck's tolerances


class DeviceUnavailableError(ShiftwiseError):
    """The device asked for cannot be used here (no CUDA, or Taichi cannot start on it)."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A test layer: ``channels`` x ``height`` x ``width`` maps in batches of ``batch``, the
    centred branch kernels summed into one, split into ``tile_size`` tiles; ``empty`` channels
    lose all their tiles and every other channel keeps about half (a compacted plan)."""

    name: str
    channels: int
    height: int
    width: int
    batch: int
    branches: Tuple[Tuple[int, int], ...]
    tile_size: int
    empty: Tuple[int, ...] = ()

    def build(self, seed: int) -> Tuple[Tensor, TilePlan]:
        """``(tiles (T, N, N) float64, plan)`` on the CPU."""
        g = torch.Generator().manual_seed(seed)
        branches = [(torch.randn(self.channels, kh, kw, generator=g, dtype=torch.float64) / (kh * kw) ** 0.5, None)
                    for kh, kw in self.branches]
        tiles, _, plan = split_branches(branches, self.tile_size)
        if self.empty:
            keep = torch.rand(plan.num_tiles, generator=g) < 0.5
            keep[plan.offsets[:-1].long()] = True  # every channel keeps one tile at least...
            channel = plan.tile_channel().long()
            for c in self.empty:  # ...but these keep none
                keep[channel == c] = False
            tiles, plan = tiles[keep].contiguous(), plan.select(keep)
        return tiles, plan


GEOMETRIES = (
    Geometry("strip 15x5 > map 7x9, N=5, B=1", 3, 7, 9, 1, ((15, 5),), 5),
    Geometry("SLaK 51x5+5x51+5x5 on 9x9, N=5", 2, 9, 9, 2, ((51, 5), (5, 51), (5, 5)), 5),
    Geometry("13x13 on 11x33, N=3", 3, 11, 33, 2, ((13, 13),), 3),
    Geometry("7x7 on 6x70, N=1, B=1", 2, 6, 70, 1, ((7, 7),), 1),
    Geometry("21x7 on 9x40, N=7", 2, 9, 40, 2, ((21, 7),), 7),
    Geometry("compacted 25x5, 2 of 5 channels empty, 12x37, N=5", 5, 12, 37, 2, ((25, 5), (5, 5)), 5, (1, 3)),
    Geometry("compacted 9x9, channel 0 empty, 7x31, N=3, B=1", 3, 7, 31, 1, ((9, 9),), 3, (0,)),
)
# one tile size, as in the timed layers (each tile size, dtype and store mode compiles its own
# kernels; the CPU forward stores float32 rows of odd and of even width differently)
QUICK_GEOMETRIES = (
    Geometry("strip 15x5 > map 7x9, N=5, B=1", 3, 7, 9, 1, ((15, 5),), 5),
    Geometry("compacted 25x5+5x5, 1 of 3 channels empty, 9x34, N=5", 3, 9, 34, 2, ((25, 5), (5, 5)), 5, (1,)),
)
# gradcheck's layer: tiny (every input element is perturbed), float64, with an empty channel
GRADCHECK_GEOMETRY = Geometry("7x5 on 4x6, N=5, 1 of 2 channels empty", 2, 4, 6, 1, ((7, 5),), 5, (1,))
# the timed layers (bench presets) and their densities; quick runs shrink them
TIMING_CASES = (("paper", 0), ("slak_t", 0))
TIMING_DENSITIES = (1.0, 0.25)
QUICK_TIMING_SIZE = {"channels": 8, "height": 24, "width": 24}


@dataclasses.dataclass
class Check:
    """One check: ``status`` is ``"pass"``, ``"fail"`` or ``"n/a"``; ``error`` and ``tolerance``
    as defined in the module docs (``None`` where the check has no number)."""

    # forward | grad_input | grad_tiles | grad_bias | gradcheck | determinism | host_sync |
    # forward_timed (the fused kernel against the depthwise conv on a timed layer)
    kind: str
    backend: str
    dtype: str
    geometry: str
    status: str
    error: Optional[float] = None
    tolerance: Optional[float] = None
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind} {self.backend} {self.dtype} [{self.geometry}]"


@dataclasses.dataclass
class SelftestResult:
    """What :func:`run_selftest` found: the environment, every check, the timing rows."""

    device: str
    quick: bool
    environment: Dict[str, object]
    checks: List[Check]
    timing: List[Dict[str, object]]

    @property
    def failed(self) -> List[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {"device": self.device, "quick": self.quick, "passed": self.passed,
                "environment": self.environment,
                "tolerances": {str(k).replace("torch.", ""): v for k, v in TOLERANCES.items()},
                "gradcheck": GRADCHECK,
                "checks": [dict(dataclasses.asdict(c), name=c.name) for c in self.checks],
                "failed": [c.name for c in self.failed], "timing": self.timing}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _rel_err(a: Optional[Tensor], ref: Optional[Tensor]) -> float:
    if a is None or ref is None:
        return float("inf") if (a is None) != (ref is None) else 0.0
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def no_tf32():
    """TF32 off for cuDNN convs and matmuls (float32 at full precision), restored after."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def resolve_device(name: Optional[str]) -> torch.device:
    """``"cpu"``/``"cuda"`` (``None``: CUDA where available) as a device Taichi can run on;
    :class:`DeviceUnavailableError` if it cannot be used here."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the self-test runs on cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} asked for, but CUDA is not available here "
                                     "(no GPU or no CUDA build of PyTorch); use --device cpu")
    return device


def start_taichi(device: torch.device) -> Dict[str, object]:
    """Start Taichi on ``device``'s arch and describe the environment: versions, Taichi's arch,
    the device. :class:`DeviceUnavailableError` if Taichi cannot start there."""
    try:
        with _runtime.launch(device):
            pass
        import taichi as ti  # noqa: PLC0415 (started above: the import is free now)

        arch = str(ti.lang.impl.current_cfg().arch).rpartition(".")[2]
    except Exception as exc:  # any failure to start is the device's, not a check's
        raise DeviceUnavailableError(f"Taichi cannot start on {device}: {' '.join(_first_line(exc).split())}") \
            from exc
    env = {"shiftwise": __version__, "torch": torch.__version__, "taichi": importlib.metadata.version("taichi"),
           "python": platform.python_version(), "taichi_arch": arch, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _inputs(geom: Geometry, dtype: torch.dtype, device: torch.device, seed: int):
    """``(x, tiles, bias, upstream gradient, plan)`` of ``geom`` in ``dtype`` on ``device``."""
    tiles, plan = geom.build(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(geom.batch, geom.channels, geom.height, geom.width, generator=g, dtype=torch.float64)
    bias = torch.randn(geom.channels, generator=g, dtype=torch.float64)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return (*(t.to(device=device, dtype=dtype) for t in (x, tiles, bias, gy)), plan.to(device))


def _reference(x: Tensor, tiles: Tensor, bias: Tensor, gy: Tensor, plan: TilePlan):
    """Output and ``(input, tiles, bias)`` gradients of the depthwise conv of the merged kernel, in float64."""
    x, tiles, bias = (t.detach().double().requires_grad_() for t in (x, tiles, bias))
    y = F.conv2d(x, merge_tiles(tiles, plan)[:, None], bias, padding=plan.info.padding, groups=plan.channels)
    y.backward(gy.double())
    return y.detach(), x.grad, tiles.grad, bias.grad


def _run_backend(backend: str, x: Tensor, tiles: Tensor, bias: Tensor, gy: Tensor, plan: TilePlan):
    """Output and ``(input, tiles, bias)`` gradients of ``backend``."""
    x, tiles, bias = (t.detach().clone().requires_grad_() for t in (x, tiles, bias))
    y = shiftwise_conv2d(x, tiles, plan, bias, backend=backend)
    y.backward(gy)
    return y.detach(), x.grad, tiles.grad, bias.grad


_QUANTITIES = ("forward", "grad_input", "grad_tiles", "grad_bias")


def _equivalence(backend: str, geom: Geometry, dtype: torch.dtype, device: torch.device, seed: int) -> List[Check]:
    dname = str(dtype).replace("torch.", "")
    tol = TOLERANCES[dtype]
    x, tiles, bias, gy, plan = _inputs(geom, dtype, device, seed)
    ref = _reference(x, tiles, bias, gy, plan)
    try:
        got = _run_backend(backend, x, tiles, bias, gy, plan)
    except Exception as exc:  # a backend that raises fails every quantity, with the reason
        return [Check(q, backend, dname, geom.name, "fail", None, tol, _first_line(exc)) for q in _QUANTITIES]
    checks = []
    for q, a, r in zip(_QUANTITIES, got, ref):
        err = _rel_err(a, r)
        checks.append(Check(q, backend, dname, geom.name, "pass" if err <= tol else "fail", err, tol))
    return checks


def _gradcheck(backend: str, device: torch.device, seed: int, fast: bool) -> Check:
    """``torch.autograd.gradcheck`` of input, tile and bias gradients; ``fast``: its fast mode
    (one random projection of the Jacobian instead of every column)."""
    geom = GRADCHECK_GEOMETRY
    x, tiles, bias, _, plan = _inputs(geom, torch.float64, device, seed)
    args = tuple(t.detach().requires_grad_() for t in (x, tiles, bias))
    detail = (f"eps {GRADCHECK['eps']:g}, atol {GRADCHECK['atol']:g}, rtol {GRADCHECK['rtol']:g}"
              + (", fast mode" if fast else ""))
    try:
        ok = torch.autograd.gradcheck(lambda a, w, b: shiftwise_conv2d(a, w, plan, b, backend=backend), args,
                                      eps=GRADCHECK["eps"], atol=GRADCHECK["atol"], rtol=GRADCHECK["rtol"],
                                      fast_mode=fast, raise_exception=True)
    except Exception as exc:
        ok, detail = False, _first_line(exc)
    return Check("gradcheck", backend, "float64", geom.name, "pass" if ok else "fail", None, None, detail)


def _determinism(backend: str, geom: Geometry, device: torch.device, seed: int) -> Check:
    x, tiles, bias, gy, plan = _inputs(geom, torch.float32, device, seed)
    bitwise = backend in BITWISE_BACKENDS
    tol = 0.0 if bitwise else TOLERANCES[torch.float32]
    detail = "two runs, output and gradients: " + ("bitwise" if bitwise else "within tolerance")
    try:
        first = _run_backend(backend, x, tiles, bias, gy, plan)
        second = _run_backend(backend, x, tiles, bias, gy, plan)
    except Exception as exc:
        return Check("determinism", backend, "float32", geom.name, "fail", None, tol, _first_line(exc))
    err = max(_rel_err(a, b) for a, b in zip(first, second))
    return Check("determinism", backend, "float32", geom.name, "pass" if err <= tol else "fail", err, tol, detail)


SYNC_SLEEP_CYCLES = 1_000_000_000  # GPU clock cycles: ~0.5 s at 2 GHz, far more than a small step's host time


def _host_sync(backend: str, geom: Geometry, device: torch.device, seed: int) -> Check:
    """CUDA: a forward and backward that make the host wait for the GPU fail (a training loop
    would stall on every step)."""
    x, tiles, bias, gy, plan = _inputs(geom, torch.float32, device, seed)
    detail = ("forward + backward under torch.cuda.set_sync_debug_mode('error'), queued behind a GPU sleep that "
              "must still run when they return, after one warm-up call")
    try:
        _run_backend(backend, x, tiles, bias, gy, plan)  # warm-up: plans cache their host-side data
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        # PyTorch's debug mode sees PyTorch's own syncs only; a wait inside Taichi's launches shows
        # as a GPU that finished the sleep queued before the step by the time the step returns
        torch.cuda._sleep(SYNC_SLEEP_CYCLES)
        torch.cuda.set_sync_debug_mode("error")
        try:
            _run_backend(backend, x, tiles, bias, gy, plan)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        waited = torch.cuda.current_stream(device).query()
        torch.cuda.synchronize(device)
    except Exception as exc:
        return Check("host_sync", backend, "float32", geom.name, "fail", detail=_first_line(exc))
    if waited:
        return Check("host_sync", backend, "float32", geom.name, "fail",
                     detail="the host waited for the GPU: a sleep queued before the step had finished when it returned")
    return Check("host_sync", backend, "float32", geom.name, "pass", detail=detail)


def _timing_cases(quick: bool):
    for preset, index in TIMING_CASES:
        case = PRESETS[preset][index]
        if quick:
            case = dataclasses.replace(case, name=f"{case.name} (shrunk)", **QUICK_TIMING_SIZE)
        for density in TIMING_DENSITIES:
            yield case, density


def _time_case(case, density: float, device: torch.device, quick: bool) -> Tuple[Dict[str, object], Check]:
    """Forward and training-step medians of the depthwise conv of the merged kernel and of the
    fused Taichi kernel on ``case`` at ``density``, and the check that they agree."""
    batch = (64 if device.type == "cuda" else 1) if not quick else 1
    repeats, warmup = ((1, 0) if quick else (2, 0)) if device.type == "cpu" else ((3, 1) if quick else (10, 3))
    layer = make_layer(case, device, torch.float32)
    tiles, plan = compact(layer.tiles, layer.plan, density)
    merged = merge_tiles(tiles, plan)[:, None].contiguous()
    padding, c = plan.info.padding, plan.channels
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, c, case.height, case.width, generator=g, device=device)
    gy = torch.randn(x.shape, generator=g, device=device)
    bias = layer.bias

    # oneDNN's NCHW depthwise kernel is slow for wide kernels: on the CPU those run channels_last
    # (copy included), as the dense path of auto runs them
    wide = device.type == "cpu" and merged.shape[-1] > dispatch.DENSE_NCHW_MAX_WIDTH

    def depthwise(a, w, b):
        if wide:
            return F.conv2d(a.contiguous(memory_format=torch.channels_last), w, b, padding=padding,
                            groups=c).contiguous()
        return F.conv2d(a, w, b, padding=padding, groups=c)

    def fused(a, w, b):
        return shiftwise_conv2d(a, w, plan, b, backend="taichi_fused")

    def step(fn, weight):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(gy)
        return run

    row = {"case": case.name, "channels": c, "height": case.height, "width": case.width, "batch": batch,
           "depthwise_layout": "channels_last" if wide else "nchw", "kernel": list(case.kernel),
           "tile_size": case.tile_size, "density": density, "tiles": plan.num_tiles,
           "auto": dispatch.choose_auto_path(device, plan, tuple(x.shape), torch.float32, False, tiles),
           "repeats": repeats}
    name = f"{case.name}, density {density:g}"
    with torch.no_grad():
        err = _rel_err(fused(x, tiles, bias), depthwise(x, merged, bias))
    check = Check("forward_timed", "taichi_fused", "float32", name,
                  "pass" if err <= TOLERANCES[torch.float32] else "fail", err, TOLERANCES[torch.float32],
                  "against the depthwise conv at the timed size")
    for label, fn, weight in (("depthwise", depthwise, merged), ("fused", fused, tiles)):
        with torch.no_grad():
            row[f"{label}_forward_ms"] = timing.time_calls(lambda: fn(x, weight, bias), device, repeats,
                                                           warmup)["median_ms"]
        row[f"{label}_step_ms"] = timing.time_calls(step(fn, weight), device, repeats, warmup)["median_ms"]
    row["forward_ratio"] = row["fused_forward_ms"] / row["depthwise_forward_ms"]
    row["step_ratio"] = row["fused_step_ms"] / row["depthwise_step_ms"]
    return row, check


def run_selftest(device: Optional[str] = None, quick: bool = False, backends: Optional[Sequence[str]] = None,
                 timed: bool = True, show_progress: bool = True, seed: int = 0) -> SelftestResult:
    """Check and time shiftwise on ``device`` (``"cpu"`` or ``"cuda"``; ``None``: CUDA where
    available). ``quick``: fewer geometries and a tiny timing. ``backends`` defaults to every
    backend (:data:`shiftwise.dispatch.BACKENDS`); ``timed=False`` skips the timing table.

    Raises :class:`DeviceUnavailableError` if the device cannot be used (no CUDA, or Taichi cannot
    start on it). A failing check does not raise: see :attr:`SelftestResult.failed`.

    Example::

        >>> result = run_selftest("cpu", quick=True, backends=["torch"], timed=False, show_progress=False)
        >>> result.passed
        True
    """
    dev = resolve_device(device)
    env = start_taichi(dev)
    backends = tuple(backends) if backends is not None else dispatch.BACKENDS
    unknown = [b for b in backends if b not in dispatch.BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {dispatch.BACKENDS}")
    geometries = QUICK_GEOMETRIES if quick else GEOMETRIES
    seeds = {geom: seed + 10 * i for i, geom in enumerate(geometries)}
    tasks: List[Callable[[], object]] = []
    for backend in backends:
        for geom in geometries:
            for dtype in (torch.float32, torch.float64):
                tasks.append(lambda b=backend, g=geom, d=dtype: _equivalence(b, g, d, dev, seeds[g]))
        tasks.append(lambda b=backend: [_gradcheck(b, dev, seed, quick)])
        tasks.append(lambda b=backend: [_determinism(b, geometries[-1], dev, seeds[geometries[-1]])])
        if dev.type == "cuda":
            for geom in geometries:
                tasks.append(lambda b=backend, g=geom: [_host_sync(b, g, dev, seeds[g])])
        else:
            tasks.append(lambda b=backend: [Check("host_sync", b, "float32", "every geometry", "n/a",
                                                  detail="CUDA only")])
    cases = list(_timing_cases(quick)) if timed else []
    checks: List[Check] = []
    rows: List[Dict[str, object]] = []
    bar = progress.bar(total=len(tasks) + len(cases), desc="selftest", unit="check", enabled=show_progress)
    try:
        with no_tf32():
            for task in tasks:
                checks.extend(task())
                bar.update(1)
            for case, density in cases:
                try:
                    row, check = _time_case(case, density, dev, quick)
                    rows.append(row)
                except Exception as exc:  # e.g. out of memory: reported, and the other cases still run
                    check = Check("forward_timed", "taichi_fused", "float32", f"{case.name}, density {density:g}",
                                  "fail", detail=_first_line(exc))
                checks.append(check)
                bar.update(1)
    finally:
        bar.close()
    return SelftestResult(str(dev), quick, env, checks, rows)


def _fmt_err(err: Optional[float]) -> str:
    return "-" if err is None else f"{err:.1e}"


def _badness(c: Check) -> tuple:
    return (c.status == "fail", c.error if c.error is not None else (float("inf") if c.status == "fail" else -1.0))


def _worst_per_kind(checks: Sequence[Check]) -> List[Check]:
    """The checks other than the equivalence quantities, one per kind and backend (the worst;
    the timed-size checks one per case), in order of first appearance."""
    worst: Dict[tuple, Check] = {}
    for c in checks:
        if c.kind in _QUANTITIES:
            continue
        key = (c.kind, c.backend, c.geometry if c.kind == "forward_timed" else None)
        if key not in worst or _badness(c) > _badness(worst[key]):
            worst[key] = c
    return list(worst.values())


def format_report(result: SelftestResult) -> str:
    """The result as text tables: environment, the equivalence checks (worst relative error of
    each backend, dtype and quantity over the geometries), the other checks, the failures by name,
    the timing table, and a last line saying whether every check passed."""
    env = result.environment
    lines = [f"shiftwise selftest on {result.device}" + (" (quick)" if result.quick else ""),
             "  " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["Equivalence with the depthwise conv of the merged kernel (float64 reference, TF32 off)",
              "worst max|y - ref| / max|ref| over the geometries; tolerance "
              + ", ".join(f"{str(k).replace('torch.', '')} {v:g}" for k, v in TOLERANCES.items()), ""]
    header = f"{'backend':<18} {'dtype':<8}" + "".join(f" {q:>11}" for q in _QUANTITIES) + "  result"
    lines += [header, "-" * len(header)]
    worst: Dict[Tuple[str, str], Dict[str, Check]] = {}
    for c in result.checks:
        if c.kind in _QUANTITIES:
            cell = worst.setdefault((c.backend, c.dtype), {})
            if c.kind not in cell or _badness(c) > _badness(cell[c.kind]):
                cell[c.kind] = c
    for (backend, dtype), cell in worst.items():
        cells = "".join(f" {(_fmt_err(cell[q].error) + ('!' if cell[q].status == 'fail' else '')):>11}"
                        if q in cell else f" {'-':>11}" for q in _QUANTITIES)
        ok = all(c.status != "fail" for c in cell.values())
        lines.append(f"{backend:<18} {dtype:<8}{cells}  {'pass' if ok else 'FAIL'}")
    lines += ["", f"{'check':<13} {'backend':<18} {'result':<6} {'error':>8} {'tol':>8}  detail"]
    lines.append("-" * 96)
    for c in _worst_per_kind(result.checks):
        tol = "-" if c.tolerance is None else f"{c.tolerance:g}"
        where = c.geometry if c.kind == "forward_timed" else c.detail
        lines.append(f"{c.kind:<13} {c.backend:<18} {c.status.upper() if c.status == 'fail' else c.status:<6} "
                     f"{_fmt_err(c.error):>8} {tol:>8}  {where}")
    if result.timing:
        lines += ["", "Timing: median ms; dw = PyTorch's depthwise conv of the merged kernel"
                  + (" (cuDNN, NCHW)" if result.device.startswith("cuda") else
                     " (channels_last for kernels wider than 13)")
                  + ", fused = the fused Taichi kernel; step = forward + backward; ratio = fused / dw", ""]
        head = (f"{'case':<22} {'dens':>5} {'tiles':>6} {'batch':>5} {'dw fwd':>9} {'fused fwd':>9} {'ratio':>8} "
                f"{'dw step':>9} {'fused step':>10} {'ratio':>8}  auto runs")
        lines += [head, "-" * len(head)]
        for r in result.timing:
            lines.append(f"{r['case']:<22} {r['density']:>5g} {r['tiles']:>6} {r['batch']:>5} "
                         f"{r['depthwise_forward_ms']:>9.2f} {r['fused_forward_ms']:>9.2f} {r['forward_ratio']:>7.2g}x "
                         f"{r['depthwise_step_ms']:>9.2f} {r['fused_step_ms']:>10.2f} {r['step_ratio']:>7.2g}x  "
                         f"{r['auto']}")
    lines.append("")
    failed = result.failed
    if failed:
        lines.append(f"FAILED: {len(failed)} of {len(result.checks)} checks:")
        lines += [f"  {c.name}: error {_fmt_err(c.error)}, tolerance {c.tolerance}"
                  + (f"; {c.detail}" if c.detail else "") for c in failed]
    else:
        na = sum(c.status == "n/a" for c in result.checks)
        lines.append(f"all {len(result.checks) - na} checks passed" + (f" ({na} not applicable here)" if na else ""))
    return "\n".join(lines)
