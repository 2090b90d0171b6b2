"""Check, then time: one case (:func:`run_case`) and a whole run (:func:`run_bench`)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference
from ..evaluate import resolve_device
from .cases import Case, make_layer, make_sw_layer
from .impls import BASELINES, DENSE, IMPLS, Impl, build_impls
from .report import device_name, device_tag, fastest, versions
from .timing import (FLOOR_REPEATS_MIN, copy_bandwidth, is_oom, paired_floor, peak_step_bytes, time_calls,
                     timed_first)

logger = logging.getLogger(__name__)


def resolve_impls(names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """``names`` checked against :data:`IMPLS` (all of them if empty), the baselines first (the
    dense depthwise conv of large-kernel layers, the official computation of SW layers: each case
    runs those that apply to it)."""
    names = tuple(names) if names else IMPLS
    unknown = [nm for nm in names if nm not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementations {','.join(unknown)}; choose from {','.join(IMPLS)}")
    return tuple(b for b in BASELINES if b not in names) + names


def _rel_err(a: Tensor, b: Tensor) -> float:
    if not b.numel():
        return 0.0
    scale = b.detach().abs().max().item()
    return (a.detach().double() - b.detach().double()).abs().max().item() / max(scale, 1e-30)


class _ReferenceFailed(RuntimeError):
    """The torch reference of a case could not be computed (recorded, not blamed on the
    implementation being checked)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def run_case(case: Case, batch: int, device: torch.device, dtype: torch.dtype, names: Sequence[str],
             repeats: int, warmup: int, backward: bool = True, memory: bool = True, floor: bool = True,
             clock: str = "wall", tolerance: float = 1e-4, seed: int = 0,
             log: Callable[[str], None] = lambda s: None) -> dict:
    """Check then time every implementation of ``case``; returns the case's result record.

    Each implementation's first forward call (Taichi compiles there) is checked against the
    torch reference (``reference.shiftwise_conv2d`` of the layer or of its compacted plan; an SW
    layer's :func:`~shiftwise.bench.impls.sw_reference`) and timed as ``fwd.first_ms`` /
    ``compile_ms``; its first training step likewise, with the input gradient (and, for
    implementations that train the tiles, the tile and bias gradients; for an SW layer, those of
    every parameter) checked against the reference's. An implementation that runs out of memory
    is recorded as ``oom`` (its times ``inf``), one that fails otherwise or disagrees with the
    reference as ``error`` (a failing reference as well, saying so); the other implementations
    still run. Stages with a byte count are timed against their copy floor (``floor``:
    :func:`paired_floor`). Inference-only implementations (onnxruntime) get no training step; one
    that cannot run here is recorded as ``skipped`` with the reason (not a failure).
    ``log`` is called with each implementation's name before it runs.
    """
    record = {"case": dataclasses.asdict(case), "batch": batch, "results": []}
    try:
        layer = (make_sw_layer if case.sw is not None else make_layer)(case, device, dtype, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, case.channels, case.height, case.width, generator=g, dtype=dtype).to(device)
        gy = torch.randn(x.shape, generator=g, dtype=dtype).to(device)
        impls = build_impls(case, layer, names)
    except (RuntimeError, MemoryError) as exc:
        if not is_oom(exc):
            raise
        record["error"] = "out of memory building the case's weights and inputs (try a smaller batch size)"
        record["fastest_dense"] = {"fwd": None, "fwd_bwd": None}
        return record
    if case.sw is not None:
        record.update(shift_channels=layer.rep_n, planes=layer.num_planes, planes_per_channel=layer.nk)
    else:
        record.update(tiles=layer.plan.num_tiles, tiles_per_channel=layer.plan.num_tiles / case.channels)
    refs: Dict[object, object] = {}  # ref_key -> output; ("grad", ref_key) -> (x, tiles, bias) gradients
    users = collections.Counter(impl.ref_key for impl in impls)  # references are dropped after their last user

    def reference_of(impl: Impl, grad: bool = False):
        key = ("grad", impl.ref_key) if grad else impl.ref_key
        if key not in refs and impl.reference is not None:
            try:
                refs[key] = impl.reference(x, gy if grad else None)
            except Exception as exc:  # noqa: BLE001 (not the implementation's failure)
                raise _ReferenceFailed(f"the torch reference failed ({type(exc).__name__}: "
                                       f"{_first_line(exc)}); not checked, not timed") from exc
        if key not in refs:
            tiles, plan = impl.plan if impl.plan is not None else (layer.tiles, layer.plan)
            try:
                if grad:
                    leaves = [t.detach().requires_grad_(True) for t in (x, tiles, layer.bias)]
                    refs[key] = torch.autograd.grad(reference.shiftwise_conv2d(leaves[0], leaves[1], plan, leaves[2]),
                                                    leaves, gy)
                else:
                    with torch.no_grad():
                        refs[key] = reference.shiftwise_conv2d(x, tiles, plan, layer.bias)
            except Exception as exc:  # noqa: BLE001 (not the implementation's failure)
                raise _ReferenceFailed(f"the torch reference failed ({type(exc).__name__}: "
                                       f"{_first_line(exc)}); not checked, not timed") from exc
        return refs[key]

    def measure(impl: Impl, res: dict) -> None:
        if impl.skipped:
            res["skipped"] = impl.skipped
            return
        xin, gin = x, gy
        if impl.layout == "nhwc":
            xin, gin = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            y, first = timed_first(lambda: impl.fn(xin), device, clock)
            ref = impl.stage(x) if impl.stage is not None else reference_of(impl)
        res["max_rel_err"] = _rel_err(y, ref)
        del y, ref
        if not res["max_rel_err"] <= tolerance:
            res["error"] = f"output differs from the reference by {res['max_rel_err']:.2e} (relative)"
            return
        if impl.floor_bytes is not None and floor:
            moved = impl.floor_bytes(tuple(x.shape), x.element_size())
            with torch.no_grad():
                res.update(paired_floor(lambda: impl.fn(xin), moved, device, max(repeats, FLOOR_REPEATS_MIN),
                                        warmup, clock, first_ms=first))
            res["bytes_moved"] = moved
        else:
            with torch.no_grad():
                res["fwd"] = time_calls(lambda: impl.fn(xin), device, repeats, warmup, clock, first_ms=first)
        if not backward or impl.stage is not None or impl.inference:
            return
        xr = xin.detach().clone().requires_grad_(True)
        leaves = impl.params + [xr]

        def step():
            for p in leaves:
                p.grad = None
            impl.fn(xr).backward(gin)
        _, first = timed_first(step, device, clock)
        want = reference_of(impl, grad=True)
        got = [(xr.grad, want[0], "input")]
        if impl.tile_params:
            got += [(impl.params[0].grad, want[1], "tile"), (impl.params[1].grad, want[2], "bias")]
        elif impl.reference is not None:
            got += [(p.grad, w, f"parameter {i}") for i, (p, w) in enumerate(zip(impl.params, want[1:]))]
        for have, ref, what in got:
            err = _rel_err(have, ref) if have is not None else math.inf
            res["grad_max_rel_err"] = max(res.get("grad_max_rel_err", 0.0), err)
            if not err <= tolerance:
                res["error"] = f"{what} gradient differs from the reference by {err:.2e} (relative)"
                return
        res["fwd_bwd"] = time_calls(step, device, repeats, warmup, clock, first_ms=first)
        if memory:
            for p in leaves:  # the peak is measured from a state without gradients
                p.grad = None
            res["peak_step_bytes"] = peak_step_bytes(step, device)

    for impl in impls:
        log(impl.name)
        res = {"impl": impl.name}
        record["results"].append(res)
        try:
            measure(impl, res)
        except _ReferenceFailed as exc:
            res["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 (recorded; the command exits 1 at the end)
            if is_oom(exc):
                res["oom"] = True
                res["fwd"] = res.get("fwd") or {"median_ms": math.inf}
                res["fwd_bwd"] = {"median_ms": math.inf}
                res["peak_step_bytes"] = math.inf
            else:
                res["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
                logger.warning("%s %s failed", case.name, impl.name, exc_info=True)
        finally:
            res.update(impl.info)
            for p in impl.params:
                p.grad = None
            users[impl.ref_key] -= 1
            if not users[impl.ref_key]:  # its last user: free the reference output and gradients
                refs.pop(impl.ref_key, None)
                refs.pop(("grad", impl.ref_key), None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["fastest_dense"] = {key: fastest(record["results"], key, DENSE) for key in ("fwd", "fwd_bwd")}
    return record


def run_bench(cases: Sequence[Case], batch: int, device="cpu", dtype: torch.dtype = torch.float32,
        names: Optional[Sequence[str]] = None, repeats: int = 10, warmup: int = 2, backward: bool = True,
        memory: bool = True, clock: str = "wall", seed: int = 0, preset: str = "custom",
        progress: Callable[[str], None] = lambda s: None,
        on_case: Callable[[dict], None] = lambda report: None) -> dict:
    """Run :func:`run_case` on every case and return the report: the machine, versions and
    settings, the copy bandwidth, and one record per case. ``on_case(report)`` is called after
    every case (``report["complete"]`` is true after the last); ``progress`` gets
    ``"case implementation"`` before each implementation runs.

    >>> from shiftwise.bench import Case
    >>> report = run_bench([Case("tiny", 2, 8, 8, ((7, 5),), 5, (1.0,))], batch=1, names=["torch_fft"],
    ...                    repeats=1, warmup=0, backward=False, memory=False)
    >>> [r["impl"] for r in report["cases"][0]["results"]]
    ['torch_depthwise', 'torch_fft']
    """
    device = resolve_device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warm-up calls >= 0, got {repeats} and {warmup}")
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    if clock not in ("wall", "cpu") or (clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"clock {clock!r}: 'wall', or 'cpu' for CPU runs only")
    names = resolve_impls(names)
    if device.type == "cuda":  # cuDNN's fastest algorithms (chosen during the warm-up), in full float32
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    load_before = os.getloadavg()
    progress("copy bandwidth")
    report = {"preset": preset, "device": device_tag(device), "device_name": device_name(device),
              "versions": versions(), "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
              "clock": clock, "repeats": repeats, "warmup": warmup,
              "copy_bandwidth_gbs": copy_bandwidth(device, clock=clock) / 1e9,
              "loadavg_before": load_before, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "SHIFTWISE_CPU_THREADS")},
              "cases": []}
    for i, case in enumerate(cases):
        report["cases"].append(run_case(case, batch, device, dtype, names, repeats, warmup, backward=backward,
                                        memory=memory, clock=clock, seed=seed,
                                        log=lambda impl, case=case: progress(f"{case.name} {impl}")))
        report["loadavg_after"] = os.getloadavg()
        report["complete"] = i + 1 == len(cases)
        on_case(report)
    return report


def failures(report: dict) -> list:
    """``"case implementation"`` of every failed result, and every case that failed to build."""
    out = [f"{rec['case']['name']} {r['impl']}" for rec in report["cases"] for r in rec["results"] if "error" in r]
    return out + [rec["case"]["name"] for rec in report["cases"] if rec.get("error")]
