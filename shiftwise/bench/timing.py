"""Timing and memory: medians of synchronised calls, the memory-bandwidth floor, peak memory.

On CUDA calls are timed with CUDA events, on CPU with ``perf_counter`` (or the process's CPU
time, ``clock="cpu"``). The bandwidth floor of a stage is a ``copy_`` that moves as many bytes
as the stage must (half read, half written), timed in rounds alternating with the stage
(:func:`paired_floor`), so that drifts of a shared machine's bandwidth cancel in the ratio.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

# PyTorch's OpenMP workers (libgomp, default wait policy) spin for 4-8 ms after each parallel
# region before they sleep, sharing the cores with the next stage's threads. Before a stage is
# timed after another one, the benchmark waits this long (busy: see settle).
SETTLE_S = 0.02
# the floor's copy moves at least FLOOR_BUFFER_MIN bytes (more than a last-level cache: memory,
# not cache, bandwidth) and at most FLOOR_BUFFER_MAX; its time is scaled to the stage's bytes
FLOOR_BUFFER_MIN = 128 << 20
FLOOR_BUFFER_MAX = 1 << 30
# a stage timed against its floor gets at least this many timed calls (rounds of 3): these
# stages take milliseconds, and with 4 rounds one disturbed round moved the median multiple
FLOOR_REPEATS_MIN = 30
# untimed calls of a stage in each round, after settle(): the first calls after a switch of
# thread pool run slower (threads waking up, caches and TLBs refilled)
SETTLE_CALLS = 2


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def settle(device: torch.device) -> None:
    """Wait until the thread pools of what ran before are idle (CPU; nothing to wait for on CUDA).
    The wait keeps this thread busy: after a sleep the next calls ran slower, as if the virtual
    CPUs had been handed to other work."""
    if device.type == "cpu":
        end = time.perf_counter() + SETTLE_S
        while time.perf_counter() < end:
            pass


def time_once(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of one call (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    now = time.process_time if clock == "cpu" else time.perf_counter
    t0 = now()
    fn()
    return (now() - t0) * 1e3


def timed_first(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> Tuple[object, float]:
    """``(fn(), milliseconds)`` of a call that may compile (synchronised, after :func:`settle`)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync(device)
    settle(device)
    t0 = now()
    out = fn()
    sync(device)
    return out, (now() - t0) * 1e3


def summary(times: List[float], first: float) -> Dict[str, float]:
    """Median, spread (interquartile range) and extremes of timed calls; ``compile_ms`` is the
    first call's excess over the median."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_ms": med, "iqr_ms": q[2] - q[0], "min_ms": min(times), "max_ms": max(times),
            "first_ms": first, "compile_ms": max(0.0, first - med), "runs": len(times)}


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
               clock: str = "wall", first_ms: Optional[float] = None) -> Dict[str, float]:
    """First call, then ``warmup`` untimed calls, then ``repeats`` timed: milliseconds
    (:func:`summary`). ``first_ms``: the first call was already made (and timed) by the caller.

    ``clock="cpu"`` (CPU device only) times with the process's CPU time: on a machine shared with
    other jobs a single-threaded run is then barely disturbed by them (with several threads,
    spinning thread pools make CPU time overstate the work).

    >>> stats = time_calls(lambda: torch.ones(8).sum(), torch.device("cpu"), repeats=3, warmup=1)
    >>> stats["runs"], stats["median_ms"] >= 0
    (3, True)
    """
    first = first_ms if first_ms is not None else timed_first(fn, device, clock)[1]
    for _ in range(warmup):
        fn()
    return summary([time_once(fn, device, clock) for _ in range(repeats)], first)


def copy_bandwidth(device: torch.device, nbytes: int = 128 << 20, repeats: int = 10, clock: str = "wall") -> float:
    """Bytes per second of a large ``copy_`` (bytes read + bytes written)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_calls(lambda: dst.copy_(src), device, repeats, 2, clock)["median_ms"]
    return 2 * nbytes / (ms / 1e3)


def paired_floor(fn: Callable[[], object], moved: int, device: torch.device, repeats: int, warmup: int,
                 clock: str = "wall", block: int = 3, first_ms: Optional[float] = None) -> Dict[str, object]:
    """Time ``fn`` alternately with its bandwidth floor, a copy that moves ``moved`` bytes (half
    read, half written): rounds of ``block`` timed calls of each, until ``fn`` has been timed at
    least ``repeats`` times; in each round both start after :func:`settle` and ``SETTLE_CALLS``
    untimed calls. The copy moves at least ``FLOOR_BUFFER_MIN`` bytes and its time is scaled to
    ``moved``.

    Returns ``fwd`` (``fn``'s statistics, as :func:`time_calls`), ``floor_ms`` (the copy's median,
    scaled), ``floor_multiple`` (median over rounds of ``fn``'s median / the copy's) and
    ``floor_multiple_quartiles`` (first and third quartile of the per-round ratios).
    """
    buffer = min(max(moved, FLOOR_BUFFER_MIN), FLOOR_BUFFER_MAX)
    n = max(2, buffer // 8)  # float32 elements of the copy's source
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    stages = {"fn": fn, "copy": lambda: dst.copy_(src)}
    scales = {"fn": 1.0, "copy": moved / buffer}
    first = first_ms if first_ms is not None else time_once(fn, device, clock)
    for _ in range(warmup):
        for stage in stages.values():
            stage()
    times: Dict[str, List[float]] = {name: [] for name in stages}
    rounds: Dict[str, List[float]] = {name: [] for name in stages}
    for _ in range(max(1, -(-repeats // block))):
        for name, stage in stages.items():
            settle(device)
            for _ in range(SETTLE_CALLS):
                stage()
            got = [time_once(stage, device, clock) * scales[name] for _ in range(block)]
            times[name] += got
            rounds[name].append(statistics.median(got))
    ratios = [f / c for f, c in zip(rounds["fn"], rounds["copy"])]
    quart = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"fwd": summary(times["fn"], first), "floor_ms": statistics.median(times["copy"]),
            "floor_multiple": statistics.median(ratios), "floor_multiple_quartiles": [quart[0], quart[2]]}


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``step`` above what was allocated when it started:
    ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocation events of
    ``torch.profiler`` (every allocation of the CPU allocator, temporaries inside ops included)
    summed in time order."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    # the profiler's C++ side logs its start and stop on file descriptor 2, once per step
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
