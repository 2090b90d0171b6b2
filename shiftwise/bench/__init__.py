"""``shiftwise bench``: side-by-side timings of large depthwise kernels, dense and shift-wise.

Every implementation of a case runs on the same input, weights and output gradient, and its
output is checked against the torch reference of the shift-wise plan before it is timed.

Implementations (``--impls``, default all that apply to the case):

* ``torch_depthwise``: one ``F.conv2d`` with the layer's dense kernel (the branches summed):
  the baseline every ratio refers to.
* ``torch_branches_bn``: the module as SLaK / RepLKNet run it in PyTorch: each branch a
  depthwise conv then BatchNorm (eval statistics), summed.
* ``torch_nhwc``: the branches (BN folded) in channels_last; the input arrives channels_last
  (conversion not timed), as in a network that runs channels_last throughout.
* ``torch_transposed``: the branches (BN folded), wide ones run as tall ones on transposed
  maps (transposes timed).
* ``pad_slice``: the per-tile approach of the original shift-wise code: one grouped conv of
  all tiles with padding ``N-1``, then each tile slot shifted by ``F.pad`` + ``narrow`` and
  summed (uniform plans only).
* ``torch_roll``: the same with the shift done by ``torch.roll`` (uniform plans only).
* ``sw_decomposed@d`` / ``sw_fused@d``: shiftwise's two Taichi paths at tile density ``d``
  after compaction (a random, per-channel varying subset of the tiles, fixed seed; removed
  from the plan, not masked).
* ``sw_auto@d``: what ``backend="auto"`` (the default) runs: the forward pass picks the dense
  conv or the fused kernel per shape (:func:`shiftwise.functional.choose_auto_path`), the
  training step the fused kernel.
* ``sw_shift_add@d``: the decomposed path's shift-add stage alone (forward), reported as a
  multiple of its memory-bandwidth floor. It writes into an output allocated once, as the
  floor's copy does: a fresh 31 MiB output per call made glibc grow its heap by a fresh block
  on most calls (small allocations split the freed one), and the page faults of that block
  (~8000 per call) took 4-6x the kernel's time.

Measurements: the first call (compile / cache load) is reported separately, then
``--warmup`` calls, then ``--repeats`` timed calls: median and spread (interquartile range).
On CUDA, CUDA events; on CPU, ``perf_counter``. Peak memory of one training step (forward +
backward) above what was allocated before it: ``torch.cuda.max_memory_allocated`` on CUDA; on
CPU the allocation events of ``torch.profiler`` (``profile_memory=True``: every allocation of
the CPU allocator, temporaries inside ops included) summed in time order. The bandwidth floor
of a stage is a ``copy_`` that moves as many bytes as the stage must (half read, half
written), timed in rounds alternating with the stage (:func:`paired_floor`): the floor multiple
is the median of the per-round ratios, so that drifts in a shared machine's bandwidth cancel;
a ``sum`` over the same bytes gives the read-only floor, reported beside it. The large copy and sum of
the report header are the machine's rates at the start of the run. An out-of-memory error is
recorded as ``inf``.

On CPU the command first asks glibc to keep freed memory in the process
(:func:`keep_freed_memory`; ``--system-malloc`` leaves it alone), for every implementation
alike: otherwise each large output is handed back to the kernel when freed and faulted in
again at the next call, a cost of the machine rather than of the implementation (up to 12 ms
for a 31 MiB output on the development VM, whose page faults cost ~1.5 us).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import __version__, ops, outputs, reference
from ..functional import decomposed_planes, shiftwise_conv2d
from ..tiling import TilePlan, fold_bn, split_branches

IMPLS = ("torch_depthwise", "torch_branches_bn", "torch_nhwc", "torch_transposed", "pad_slice", "torch_roll",
         "sw_decomposed", "sw_fused", "sw_auto", "sw_shift_add")
BASELINE = "torch_depthwise"
DENSE = ("torch_depthwise", "torch_branches_bn", "torch_nhwc", "torch_transposed")


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: ``channels`` x ``height`` x ``width`` maps, parallel branch kernels, tile size."""

    name: str
    channels: int
    height: int
    width: int
    branches: Tuple[Tuple[int, int], ...]
    tile_size: int
    densities: Tuple[float, ...] = (1.0, 0.5, 0.25)

    @property
    def kernel(self) -> Tuple[int, int]:
        return max(k[0] for k in self.branches), max(k[1] for k in self.branches)


def _slak(name, c, hw, k):
    return Case(name, c, hw, hw, ((k, 5), (5, k), (5, 5)), 5)


def _replk(name, c, hw, k, small=5):
    return Case(name, c, hw, hw, ((k, k), (small, small)) if small else ((k, k),), 5 if k >= 5 else k)


PRESETS: Dict[str, Tuple[Case, ...]] = {
    # SLaK-T at 224: stages 1-4 (width 1.3, kernels 51/49/47/13 + 5x5, N = 5)
    "slak_t": (_slak("slak_t.s1", 124, 56, 51), _slak("slak_t.s2", 249, 28, 49), _slak("slak_t.s3", 499, 14, 47),
               _slak("slak_t.s4", 998, 7, 13)),
    # RepLKNet-31B at 224: K x K + 5 x 5 per stage
    "replknet_31b": (_replk("replknet_31b.s1", 128, 56, 31), _replk("replknet_31b.s2", 256, 28, 29),
                     _replk("replknet_31b.s3", 512, 14, 27), _replk("replknet_31b.s4", 1024, 7, 13)),
    # the shift-wise paper's operator case: C = 124, 128 x 128, 51 x 5, density 0.25
    "paper": (Case("paper", 124, 128, 128, ((51, 5),), 5),),
    # RepLKNet Table 1: depthwise layers of C = 384 at R x R (one layer of their stack of 24)
    "replk_stack": tuple(_replk(f"replk_stack.r{r}.k{k}", 384, r, k, small=0)
                         for r in (16, 32, 64) for k in (3, 7, 13, 19, 25, 31)),
}
# batch per preset and device kind: small on CPU (seconds per call), the papers' sizes on GPU
BATCH = {"cpu": {"slak_t": 4, "replknet_31b": 4, "paper": 4, "replk_stack": 4, "custom": 2},
         "cuda": {"slak_t": 64, "replknet_31b": 64, "paper": 64, "replk_stack": 64, "custom": 16}}


# inputs and weights -----------------------------------------------------------------------------
@dataclasses.dataclass
class Layer:
    """The random layer of a case: branch weights + eval BatchNorms, and its shift-wise form."""

    branch_weights: List[Tensor]  # (C, kh, kw) each
    bns: List[torch.nn.BatchNorm2d]
    folded: List[Tuple[Tensor, Tensor]]  # BN folded: (weight, bias) per branch
    dense: Tensor  # (C, KH, KW): the branches summed
    bias: Tensor  # (C,)
    tiles: Tensor  # (T, N, N)
    plan: TilePlan


def make_layer(case: Case, device, dtype, seed: int = 0) -> Layer:
    g = torch.Generator().manual_seed(seed)
    c = case.channels
    weights, bns, folded = [], [], []
    kh, kw = case.kernel
    dense = torch.zeros(c, kh, kw, dtype=dtype)
    bias = torch.zeros(c, dtype=dtype)
    for bh, bw in case.branches:
        w = torch.randn(c, bh, bw, generator=g, dtype=dtype) / math.sqrt(bh * bw)
        bn = torch.nn.BatchNorm2d(c).to(dtype).eval()
        with torch.no_grad():
            bn.weight.copy_(1 + 0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=dtype))
        fw, fb = fold_bn(w, None, bn)
        oy, ox = (kh - bh) // 2, (kw - bw) // 2
        dense[:, oy:oy + bh, ox:ox + bw] += fw
        bias += fb
        weights.append(w)
        bns.append(bn)
        folded.append((fw.detach(), fb.detach()))
    tiles, _, plan = split_branches(folded, case.tile_size)
    return Layer([w.to(device) for w in weights], [bn.to(device) for bn in bns],
                 [(w.to(device), b.to(device)) for w, b in folded], dense.to(device), bias.to(device),
                 tiles.to(device), plan.to(device))


def compact(tiles: Tensor, plan: TilePlan, density: float, seed: int = 0) -> Tuple[Tensor, TilePlan]:
    """Keep ``round(density * T)`` tiles chosen at random (per-channel counts vary), fixed seed."""
    if density >= 1:
        return tiles, plan
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(plan.num_tiles, dtype=torch.bool)
    keep[torch.randperm(plan.num_tiles, generator=g)[:round(density * plan.num_tiles)]] = True
    keep = keep.to(tiles.device)
    return tiles[keep].contiguous(), plan.select(keep)


# implementations ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable[[Tensor], Tensor]  # x -> y
    params: List[Tensor]  # leaves that get gradients in a training step
    plan: Optional[Tuple[Tensor, TilePlan]] = None  # tiles and plan it computes (None: the dense layer)
    ref_key: str = "dense"  # implementations with the same key compute the same layer (one reference each)
    tile_params: bool = False  # params are [tiles of `plan` (or the layer's), bias]: their gradients are checked
    layout: str = "nchw"  # "nhwc": takes and returns channels_last tensors
    stage: Optional[Callable[[Tensor], Tensor]] = None  # shift-add stage: x -> reference of the stage
    floor_bytes: Optional[Callable[[Tuple[int, ...], int], int]] = None  # (x shape, itemsize) -> bytes moved


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


def _branch_convs(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> Tensor:
    c = x.shape[1]
    y = None
    for w, b in zip(weights, biases):
        out = F.conv2d(x, w.unsqueeze(1), b, padding=(w.shape[1] // 2, w.shape[2] // 2), groups=c)
        y = out if y is None else y + out
    return y


def _shift_by_pad_slice(u: Tensor, sy: int, sx: int, h: int, w: int) -> Tensor:
    # rows sy..sy+h and columns sx..sx+w of u, zero where they leave u (pad first, then slice)
    hu, wu = u.shape[-2:]
    pads = (max(0, -sx), max(0, sx + w - wu), max(0, -sy), max(0, sy + h - hu))
    if any(pads):
        u = F.pad(u, pads)
    return u.narrow(-2, sy + pads[2], h).narrow(-1, sx + pads[0], w)


def build_impls(case: Case, layer: Layer, names: Sequence[str]) -> List[Impl]:
    """The implementations of ``names`` that apply to ``case`` (densities expanded)."""
    impls: List[Impl] = []
    c, n = case.channels, case.tile_size
    tiles, plan, bias = layer.tiles, layer.plan, layer.bias
    uniform = plan.info.uniform
    for name in names:
        if name == "torch_depthwise":
            w, b = _leaf(layer.dense), _leaf(bias)
            impls.append(Impl(name, lambda x, w=w, b=b: F.conv2d(x, w.unsqueeze(1), b, padding=(
                w.shape[1] // 2, w.shape[2] // 2), groups=c), [w, b]))
        elif name == "torch_branches_bn" and len(case.branches) > 1:
            ws = [_leaf(w) for w in layer.branch_weights]
            bns = [torch.nn.BatchNorm2d(c).to(w.device, w.dtype).eval() for w in ws]
            for bn, src in zip(bns, layer.bns):
                bn.load_state_dict(src.state_dict())

            def run(x, ws=ws, bns=bns):
                y = None
                for w, bn in zip(ws, bns):
                    out = bn(F.conv2d(x, w.unsqueeze(1), padding=(w.shape[1] // 2, w.shape[2] // 2), groups=c))
                    y = out if y is None else y + out
                return y
            impls.append(Impl(name, run, ws + [p for bn in bns for p in (bn.weight, bn.bias)]))
        elif name == "torch_nhwc":
            ws = [_leaf(w) for w, _ in layer.folded]
            bs = [_leaf(b) for _, b in layer.folded]
            impls.append(Impl(name, lambda x, ws=ws, bs=bs: _branch_convs(x, ws, bs), ws + bs, layout="nhwc"))
        elif name == "torch_transposed" and any(bw > bh for bh, bw in case.branches):
            ws = [_leaf(w) for w, _ in layer.folded]
            bs = [_leaf(b) for _, b in layer.folded]

            def run(x, ws=ws, bs=bs):
                tall = [(w, b) for w, b in zip(ws, bs) if w.shape[2] <= w.shape[1]]
                wide = [(w, b) for w, b in zip(ws, bs) if w.shape[2] > w.shape[1]]
                y = _branch_convs(x, *zip(*tall)) if tall else 0
                xt = x.transpose(2, 3).contiguous()
                yt = _branch_convs(xt, [w.transpose(1, 2) for w, _ in wide], [b for _, b in wide])
                return y + yt.transpose(2, 3)
            impls.append(Impl(name, run, ws + bs))
        elif name in ("pad_slice", "torch_roll") and uniform:
            w, b = _leaf(tiles), _leaf(bias)
            # small convs padded by N-1 ("full": every window touching the input), or for roll by
            # the plan's reach, so that the rolled crop never sees wrapped-around values
            ph, pw = plan.info.padding if name == "torch_roll" else (n - 1, n - 1)
            shifts = [(dy + ph - n // 2, dx + pw - n // 2)
                      for dy, dx in zip(plan.dy[:uniform].tolist(), plan.dx[:uniform].tolist())]

            def run(x, w=w, b=b, shifts=shifts, pad=(ph, pw), roll=name == "torch_roll"):
                bsz, _, h, wd = x.shape
                u = F.conv2d(x, w.unsqueeze(1), padding=pad, groups=c)
                u = u.view(bsz, c, uniform, *u.shape[-2:])
                y = b.view(1, c, 1, 1)
                for p, (sy, sx) in enumerate(shifts):
                    if roll:  # u is padded by the plan's reach: the crop never sees wrapped values
                        y = y + torch.roll(u[:, :, p], (-sy, -sx), (2, 3))[..., :h, :wd]
                    else:
                        y = y + _shift_by_pad_slice(u[:, :, p], sy, sx, h, wd)
                return y
            impls.append(Impl(name, run, [w, b], tile_params=True))
        elif name in ("sw_decomposed", "sw_fused", "sw_auto", "sw_shift_add"):
            for d in case.densities:
                t_d, p_d = compact(tiles, plan, d)
                label = f"{name}@{d:g}"
                if name == "sw_shift_add":
                    impls.append(_shift_add_impl(label, t_d, p_d, (case.height, case.width)))
                    continue
                backend = {"sw_fused": "taichi_fused", "sw_auto": "auto"}.get(name, "taichi_decomposed")
                w, b = _leaf(t_d), _leaf(bias)
                impls.append(Impl(label, lambda x, w=w, b=b, p=p_d, be=backend: shiftwise_conv2d(x, w, p, b, backend=be),
                                  [w, b], (t_d, p_d), ref_key="dense" if d >= 1 else f"d{d:g}", tile_params=True))
    return impls


def shift_add_stage(tiles: Tensor, plan: TilePlan, hw: Tuple[int, int]) -> Tuple[Tensor, TilePlan, Tensor, Tensor]:
    """``(tiles, plan, sy, sx)`` of the decomposed path's shift-add stage on an ``hw`` map: the
    tiles that reach it and their int32 shifts into the small convs' planes (as
    :func:`shiftwise.functional.decomposed_planes` makes them: ``PlanInfo.plane_layout``)."""
    keep, live = plan.live(*hw)
    if keep is not None:
        tiles, plan = tiles[keep], live
    _, (oy, ox) = plan.info.plane_layout
    return tiles, plan, (plan.dy + oy).to(torch.int32), (plan.dx + ox).to(torch.int32)


def shift_add_bytes(plan: TilePlan, x_shape: Tuple[int, ...], itemsize: int) -> int:
    """Bytes the shift-add stage of ``plan`` (its tiles all reaching the map) must move on an
    input of ``x_shape``: every plane value a tile's window covers is read once, every output
    written once (its bandwidth floor's size)."""
    b, _, h, w = x_shape
    n = plan.tile_size
    (pad_h, pad_w), (oy, ox) = plan.info.plane_layout
    hu, wu = h + 2 * pad_h - (n - 1), w + 2 * pad_w - (n - 1)
    sy_c, sx_c = plan.dy.cpu().long() + oy, plan.dx.cpu().long() + ox
    rows = ((sy_c + h).clamp(max=hu) - sy_c.clamp(min=0)).clamp(min=0)
    cols = ((sx_c + w).clamp(max=wu) - sx_c.clamp(min=0)).clamp(min=0)
    return int(b * (rows * cols).sum() + b * plan.channels * h * w) * itemsize


def _shift_add_impl(label: str, tiles: Tensor, plan: TilePlan, hw: Tuple[int, int]) -> Impl:
    """The shift-add stage of the decomposed path on its precomputed small-conv planes (of the
    tiles that reach an ``hw`` map, as the decomposed path runs it)."""
    tiles, plan, sy, sx = shift_add_stage(tiles, plan, hw)
    cache: Dict[str, Tensor] = {}

    def planes(x):  # the small convs, as the decomposed path runs them; not timed
        if "u" not in cache:
            with torch.no_grad():
                cache["u"] = decomposed_planes(x, tiles, plan)[0]
        return cache["u"]

    def run(x):  # into one preallocated output (the module docstring says why)
        u = planes(x)
        shape = (u.shape[0], plan.channels, *x.shape[-2:])
        if "y" not in cache or tuple(cache["y"].shape) != shape:
            cache["y"] = u.new_empty(shape)
        return ops.shift_add_fwd(u, plan.offsets, sy, sx, tuple(x.shape[-2:]), out=cache["y"])

    def stage_reference(x):
        return reference.shift_add(planes(x), plan.offsets, sy, sx, tuple(x.shape[-2:]))

    def moved(x_shape, itemsize):
        return shift_add_bytes(plan, x_shape, itemsize)

    return Impl(label, run, [], (tiles, plan), ref_key=f"stage {label}", stage=stage_reference, floor_bytes=moved)


# measurement -------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "can't allocate" in str(exc).lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
               clock: str = "wall", first_ms: Optional[float] = None) -> Dict[str, float]:
    """First call, then ``warmup`` untimed calls, then ``repeats`` timed: milliseconds.
    ``first_ms``: the first call was already made (and timed) by the caller.

    ``clock="cpu"`` (CPU device only) times with the process's CPU time: on a machine shared with
    other jobs a single-threaded run is then barely disturbed by them (with several threads,
    spinning thread pools make CPU time overstate the work).
    """
    first = first_ms if first_ms is not None else timed_first(fn, device, clock)[1]
    for _ in range(warmup):
        fn()
    return _summary([_time_once(fn, device, clock) for _ in range(repeats)], first)


def timed_first(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> Tuple[object, float]:
    """``(fn(), milliseconds)`` of a call that may compile (synchronised, after :func:`settle`)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    _sync(device)
    settle(device)
    t0 = now()
    out = fn()
    _sync(device)
    return out, (now() - t0) * 1e3


# PyTorch's OpenMP workers (libgomp, default wait policy) spin for a while after each parallel
# region before they sleep: 4-8 ms on the development VM (a Taichi shift-add run right after a
# torch copy took 7.9 ms, 8 ms later 5.8 ms; with OMP_WAIT_POLICY=PASSIVE 6.2 ms either way).
# Taichi's workers then share the cores with a spinner. Before a stage is timed after another
# one, the benchmark waits this long (busy, see settle), so that each is measured without the
# previous one's thread pool (what happens inside one implementation's calls is still timed).
SETTLE_S = 0.02


def settle(device: torch.device) -> None:
    """Wait until the thread pools of what ran before are idle (CPU; nothing to wait for on CUDA).
    The wait keeps this thread busy: after a sleep the next calls ran slower, as if the virtual
    CPUs had been handed to other work (paper d = 0.25 shift-add: 1.11-1.55x its floor with no
    pause, 1.20-1.58x after sleeping 20 ms, 1.38-1.52x after 50 ms)."""
    if device.type == "cpu":
        end = time.perf_counter() + SETTLE_S
        while time.perf_counter() < end:
            pass


def _summary(times: List[float], first: float) -> Dict[str, float]:
    """Median, spread and extremes of timed calls; ``compile_ms`` is the first call's excess."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_ms": med, "iqr_ms": q[2] - q[0], "min_ms": min(times), "max_ms": max(times),
            "first_ms": first, "compile_ms": max(0.0, first - med), "runs": len(times)}


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``step`` above what was allocated when it started."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

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


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory (no trimming; allocations up to 32 MiB, its
    maximum, from the heap), so that repeated calls reuse pages instead of faulting in new ones.
    Process-wide and permanent; returns what was done (``"system"`` if not glibc)."""
    if not sys.platform.startswith("linux"):
        return "system"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system"
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    trim = mallopt(m_trim_threshold, 2**31 - 1) == 1
    mmap = mallopt(m_mmap_threshold, 32 << 20) == 1
    return "glibc: freed memory kept" if trim and mmap else "system"


def bandwidths(device: torch.device, nbytes: int = 128 << 20, repeats: int = 10,
               clock: str = "wall") -> Dict[str, float]:
    """Bytes per second of a large ``copy_`` (read + write counted) and of a large ``sum`` (read)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_calls(lambda: dst.copy_(src), device, repeats, 2, clock)["median_ms"]
    read = time_calls(lambda: src.sum(), device, repeats, 2, clock)["median_ms"]
    return {"copy": 2 * nbytes / (copy / 1e3), "read": nbytes / (read / 1e3)}


# the floors move at least FLOOR_BUFFER_MIN bytes (more than any last-level cache here, so they
# measure memory, not cache, bandwidth) and at most FLOOR_BUFFER_MAX, scaled to the stage's bytes
FLOOR_BUFFER_MIN = 128 << 20
FLOOR_BUFFER_MAX = 1 << 30
# a stage timed against its floors gets at least this many timed calls (10 rounds of 3): with
# the default 10 (4 rounds), one disturbed round of a few-ms stage moved its median multiple by
# 0.3-0.5 between runs on the development VM; these stages take milliseconds, so this is cheap
FLOOR_REPEATS_MIN = 30
# untimed calls of a stage in each round, after settle(): the first calls after a pause or a
# switch of thread pool run slower (threads waking up, caches and TLBs refilled)
SETTLE_CALLS = 2
# the control of paired_floor sums at most this many inputs (RepLKNet-31B stage 1 reads 38 planes
# per output; a k far beyond that would stop being a like-for-like stream count anyway)
SUM_INPUTS_MAX = 64


def paired_floor(fn: Callable[[], object], moved: int, device: torch.device, repeats: int, warmup: int,
                 clock: str = "wall", block: int = 3, first_ms: Optional[float] = None,
                 written: Optional[int] = None) -> Dict[str, object]:
    """Time ``fn`` alternately with its bandwidth floors: a copy that moves ``moved`` bytes (half
    read, half written) and a sum that reads ``moved`` bytes. Rounds of ``block`` timed calls of
    each, until ``fn`` has been timed at least ``repeats`` times; in each round every one of the
    three starts after :func:`settle` and ``SETTLE_CALLS`` untimed calls (switching between
    PyTorch's thread pool and Taichi's: OpenMP workers still spinning, idle threads waking up).
    The multiples are medians over rounds of the per-round ratios of medians, so that the
    drifts of a shared machine's memory bandwidth (1.5-2x within minutes on the development
    VM) cancel.

    The floors move at least ``FLOOR_BUFFER_MIN`` bytes (memory, not cache, bandwidth, as the
    large copy of the report header) and are scaled to ``moved``.

    ``written`` (the bytes of ``moved`` that ``fn`` writes; the rest it reads) adds a control
    to the rounds: PyTorch's own reduction of ``k`` inputs into one output (``torch.sum`` over a
    ``(k, n)`` tensor, ``k`` the read-to-write ratio rounded half up, 1 to ``SUM_INPUTS_MAX``), moving the same number
    of bytes (scaled like the floors). Its multiple says how much of the distance to the copy
    floor a many-stream read costs on this machine whatever runs it: a stage that reads ``k``
    planes per output cannot stream like a copy, and on the development VM PyTorch's 3-input sum
    took 1.05-1.4x the copy in the same rounds.

    Returns ``fwd`` (``fn``'s statistics over all timed calls, as :func:`time_calls`),
    ``floor_ms`` / ``read_floor_ms`` (median floor times), ``floor_multiple`` /
    ``read_floor_multiple`` and ``floor_multiple_quartiles`` (first and third quartile of the
    per-round copy ratios: how much the multiple moved within the run); with ``written``,
    ``sum_inputs`` (``k``), ``sum_ms`` (its median time, scaled to ``moved``) and
    ``sum_multiple`` (median over rounds of ``fn`` / the sum) and ``sum_floor_multiple`` (the
    sum's own multiple of the copy floor). ``first_ms``: as :func:`time_calls`.
    """
    buffer = min(max(moved, FLOOR_BUFFER_MIN), FLOOR_BUFFER_MAX)  # bytes the floors move: out of cache
    scale = moved / buffer
    n = max(2, buffer // 8)  # float32 elements of the copy's source
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    whole = torch.ones(2 * n, device=device)
    stages = {"fn": fn, "copy": lambda: dst.copy_(src), "read": whole.sum}
    scales = {"fn": 1.0, "copy": scale, "read": scale}
    if written:
        k = min(SUM_INPUTS_MAX, max(1, int((moved - written) / written + 0.5)))
        n_out = max(2, buffer // (4 * (k + 1)))
        try:
            inputs, output = torch.ones(k, n_out, device=device), torch.empty(n_out, device=device)
        except torch.OutOfMemoryError:  # the control is context: the stage is timed without it
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            stages["sum"] = lambda: torch.sum(inputs, 0, out=output)
            scales["sum"] = moved / (4 * (k + 1) * n_out)
    first = first_ms if first_ms is not None else _time_once(fn, device, clock)
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
            got = [_time_once(stage, device, clock) * scales[name] for _ in range(block)]
            times[name] += got
            rounds[name].append(statistics.median(got))
    ratios = [f / c for f, c in zip(rounds["fn"], rounds["copy"])]
    quart = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    out = {"fwd": _summary(times["fn"], first),
           "floor_ms": statistics.median(times["copy"]), "read_floor_ms": statistics.median(times["read"]),
           "floor_multiple": statistics.median(ratios), "floor_multiple_quartiles": [quart[0], quart[2]],
           "read_floor_multiple": statistics.median(f / r for f, r in zip(rounds["fn"], rounds["read"]))}
    if "sum" in stages:
        out.update(sum_inputs=k, sum_ms=statistics.median(times["sum"]),
                   sum_multiple=statistics.median(f / r for f, r in zip(rounds["fn"], rounds["sum"])),
                   sum_floor_multiple=statistics.median(r / c for r, c in zip(rounds["sum"], rounds["copy"])))
    return out


def _time_once(fn: Callable[[], object], device: torch.device, clock: str) -> float:
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


def _rel_err(a: Tensor, b: Tensor) -> float:
    scale = b.detach().abs().max().item() if b.numel() else 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item() / max(scale, 1e-30) if b.numel() else 0.0


def run_case(case: Case, batch: int, device: torch.device, dtype: torch.dtype, names: Sequence[str],
             repeats: int, warmup: int, backward: bool = True, memory: bool = True,
             bandwidth: Optional[Dict[str, float]] = None, clock: str = "wall",
             tolerance: float = 1e-4, seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict:
    """Check then time every implementation of ``case``; returns the case's result record.

    Each implementation's first forward call (Taichi compiles there) is checked against the
    torch reference (``reference.shiftwise_conv2d`` of the layer or of its compacted plan) and
    timed as ``fwd.first_ms`` / ``compile_ms``; its first training step likewise, with the
    input gradient (and, for implementations that train the tiles, the tile and bias gradients)
    checked against the reference's. An implementation that runs out of memory is recorded as
    ``oom``, one that fails otherwise or disagrees with the reference as ``error`` (a failing
    reference as well, saying so); the other implementations still run. Each reference is freed
    after the last implementation that uses it.
    """
    record = {"case": dataclasses.asdict(case), "batch": batch, "results": []}
    try:
        layer = make_layer(case, device, dtype, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, case.channels, case.height, case.width, generator=g, dtype=dtype).to(device)
        gy = torch.randn(x.shape, generator=g, dtype=dtype).to(device)
        impls = build_impls(case, layer, names)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        record["error"] = "out of memory building the case's weights and inputs (try a smaller --batch)"
        record.update(fastest_dense={"fwd": None, "fwd_bwd": None}, targets={})
        return record
    record.update(tiles=layer.plan.num_tiles, tiles_per_channel=layer.plan.num_tiles / case.channels)
    refs: Dict[object, object] = {}  # ref_key -> output; ("grad", ref_key) -> (x, tiles, bias) gradients
    users = collections.Counter(impl.ref_key for impl in impls)  # references are dropped after their last user

    def reference_of(impl: Impl, grad: bool = False):
        key = ("grad", impl.ref_key) if grad else impl.ref_key
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
        if impl.floor_bytes is not None and bandwidth:
            moved = impl.floor_bytes(tuple(x.shape), x.element_size())
            with torch.no_grad():  # a stage writes its output (x's shape) once; the rest it reads
                res.update(paired_floor(lambda: impl.fn(xin), moved, device, max(repeats, FLOOR_REPEATS_MIN),
                                        warmup, clock, first_ms=first, written=x.numel() * x.element_size()))
            res["bytes_moved"] = moved
        else:
            with torch.no_grad():
                res["fwd"] = time_calls(lambda: impl.fn(xin), device, repeats, warmup, clock, first_ms=first)
        if not backward or impl.stage is not None:
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
        log(f"  {case.name} {impl.name}")
        res = {"impl": impl.name}
        record["results"].append(res)
        try:
            measure(impl, res)
        except _ReferenceFailed as exc:
            res["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 (recorded; the command exits 1 at the end)
            if _is_oom(exc):
                res["oom"] = True
                res["fwd"] = res.get("fwd") or {"median_ms": math.inf}
                res["fwd_bwd"] = {"median_ms": math.inf}
                res["peak_step_bytes"] = math.inf
            else:
                res["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
                traceback.print_exc()
        finally:
            for p in impl.params:
                p.grad = None
            users[impl.ref_key] -= 1
            if not users[impl.ref_key]:  # its last user: free the reference output and gradients
                refs.pop(impl.ref_key, None)
                refs.pop(("grad", impl.ref_key), None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["fastest_dense"] = {key: _fastest(record["results"], key, DENSE) for key in ("fwd", "fwd_bwd")}
    record["targets"] = targets(record)
    return record


class _ReferenceFailed(RuntimeError):
    """The torch reference of a case could not be computed (recorded, not blamed on the
    implementation being checked)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def targets(record: dict) -> Dict[str, float]:
    """The issue's target ratios that this case's results allow (absent when an input is missing).

    ``t1_floor_multiple``: shift-add stage time / its copy-bandwidth floor (dense plan;
    ``t1_d*_floor_multiple`` at the lowest density, compacted: the paper's case at 0.25);
    ``t2_vs_branches_*``: SLaK/RepLKNet module in PyTorch / fused shift-wise (dense, BN folded);
    ``t2_vs_pad_slice_*``: per-tile pad-and-slice / fused; ``t3_d*_vs_dense_*``: fastest dense
    PyTorch alternative / fastest shift-wise path at the lowest density;
    ``t4_peak_ratio``: training-step peak of the fused path / of ``torch_depthwise``.
    """
    by = {r["impl"]: r for r in record["results"] if "error" not in r}

    def med(name, key):
        v = by.get(name, {}).get(key, {}).get("median_ms")
        return v if v is not None and math.isfinite(v) and v > 0 else None

    out: Dict[str, float] = {}
    if "floor_multiple" in by.get("sw_shift_add@1", {}):
        out["t1_floor_multiple"] = by["sw_shift_add@1"]["floor_multiple"]
        out["t1_read_floor_multiple"] = by["sw_shift_add@1"]["read_floor_multiple"]
    low = min(record["case"]["densities"])
    if low < 1 and "floor_multiple" in by.get(f"sw_shift_add@{low:g}", {}):
        out[f"t1_d{low:g}_floor_multiple"] = by[f"sw_shift_add@{low:g}"]["floor_multiple"]
    for key in ("fwd", "fwd_bwd"):
        fused = med("sw_fused@1", key)
        for other, label in (("torch_branches_bn", "t2_vs_branches"), ("pad_slice", "t2_vs_pad_slice")):
            if fused and med(other, key):
                out[f"{label}_{key}"] = med(other, key) / fused
        low = min(record["case"]["densities"])
        sparse = [v for v in (med(f"sw_fused@{low:g}", key), med(f"sw_decomposed@{low:g}", key)) if v]
        dense = record["fastest_dense"].get(key)
        if sparse and dense and low < 1:
            out[f"t3_d{low:g}_vs_dense_{key}"] = dense["median_ms"] / min(sparse)
    fused_peak = by.get("sw_fused@1", {}).get("peak_step_bytes")
    dw_peak = by.get(BASELINE, {}).get("peak_step_bytes")
    if fused_peak and dw_peak and math.isfinite(fused_peak) and math.isfinite(dw_peak):
        out["t4_peak_ratio"] = fused_peak / dw_peak
    return out


# the thresholds: (key prefix, bound, "max" or "min"), the first matching prefix wins;
# a bound of None marks a ratio reported as context, not a target
TARGET_BOUNDS = (("t1_read_", None, ""), ("t1_", 1.3, "max"), ("t2_vs_branches_", 2.0, "min"),
                 ("t2_vs_pad_slice_", 3.0, "min"), ("t3_", 2.0, "min"), ("t4_", 1.25, "max"))


T2_CASE = "slak_t.s1"


def target_bound(key: str, case: str) -> Optional[Tuple[float, str]]:
    """``(bound, "max" | "min")`` the issue sets for the target ratio ``key`` of :func:`targets`
    in case ``case`` (T1 <= 1.3, T2 >= 2 against the branches and >= 3 against pad-and-slice,
    T3 >= 2, T4 <= 1.25), or None for a ratio reported as context: ``t1_read_floor_multiple``, and
    T2 outside SLaK-T stage 1 (the issue sets T2 for that module only; the ratios of other
    stages are measured all the same)."""
    if key.startswith("t2_") and case != T2_CASE:
        return None
    bound, kind = next(((b, k) for prefix, b, k in TARGET_BOUNDS if key.startswith(prefix)), (None, ""))
    return (bound, kind) if bound is not None else None


def _target_text(key: str, value: float, case: str) -> str:
    bound = target_bound(key, case)
    if bound is None:
        return f"{key} {value:.2f}"
    limit, kind = bound
    met = value <= limit if kind == "max" else value >= limit
    return f"{key} {value:.2f} ({'<=' if kind == 'max' else '>='} {limit:g}: {'met' if met else 'NOT met'})"


def _fastest(results: List[dict], key: str, prefixes: Sequence[str]) -> Optional[dict]:
    timed = [(r[key]["median_ms"], r["impl"]) for r in results if key in r and "error" not in r
             and r["impl"].split("@")[0] in prefixes and math.isfinite(r[key]["median_ms"])]
    return {"impl": min(timed)[1], "median_ms": min(timed)[0]} if timed else None


# reporting --------------------------------------------------------------------------------------
def device_tag(device: torch.device) -> str:
    """Short device name for file names: ``cpu2`` (cores) or the GPU's model (``h100``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in ("h200", "h100", "a100", "a10", "l40s", "l40", "l4", "t4", "v100", "4090", "3090", "2080"):
            if key in name:
                return key
        return name.split()[-1]
    return f"cpu{os.cpu_count()}"


def versions() -> Dict[str, str]:
    try:
        import taichi  # noqa: PLC0415
        ti_version = ".".join(str(v) for v in taichi.__version__)
    except ImportError:
        ti_version = "none"
    return {"shiftwise": __version__, "torch": torch.__version__, "taichi": ti_version,
            "python": platform.python_version(), "git": _git_commit()}


def _git_commit() -> str:
    """The commit of the checkout this package runs from (``+dirty`` with uncommitted or
    untracked Python code, ``pyproject.toml`` or ``setup.cfg``), or ``"unknown"`` (an installed
    wheel, no git)."""
    import subprocess  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=normal", "--",
                                "*.py", "pyproject.toml", "setup.cfg"],  # code only: results and docs change as runs go on
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def result_name(preset: str, device: torch.device) -> str:
    """``bench-<preset>-<device>-pt<major.minor>-ti<taichi>``, the stem of committed results."""
    v = versions()
    pt = ".".join(v["torch"].split("+")[0].split(".")[:2])
    return f"bench-{preset}-{device_tag(device)}-pt{pt}-ti{v['taichi']}"


def _winner(results: List[dict], key: str) -> Optional[str]:
    """The fastest implementation of the whole layer (compacted plans compute a sparser one)."""
    full = [r for r in results if "@" not in r["impl"] or r["impl"].endswith("@1")]
    best = _fastest(full, key, tuple(nm for nm in IMPLS if nm != "sw_shift_add"))
    return best["impl"] if best else None


def format_table(report: dict) -> str:
    """The terminal table: one block per case, the fastest marked ``*``, speedups vs depthwise."""
    lines = []
    for rec in report["cases"]:
        case = rec["case"]
        kern = " + ".join(f"{a}x{b}" for a, b in case["branches"])
        tiles = f", {rec['tiles_per_channel']:.0f} tiles/channel" if "tiles_per_channel" in rec else ""
        lines.append(f"\n{case['name']}: B={rec['batch']} C={case['channels']} {case['height']}x{case['width']} "
                     f"kernels {kern}, N={case['tile_size']}{tiles}")
        if rec.get("error"):
            lines.append(f"  {rec['error']}")
        lines.append(f"  {'implementation':<22} {'fwd ms':>10} {'iqr':>7} {'x dw':>6}  {'fwd+bwd ms':>10} {'iqr':>7} "
                     f"{'x dw':>6}  {'peak MB':>8} {'x dw':>5}  {'compile s':>11}  note")
        base = next((r for r in rec["results"] if r["impl"] == BASELINE), None)
        wins = {k: _winner(rec["results"], k) for k in ("fwd", "fwd_bwd")}
        for r in rec["results"]:
            cells = []
            for key in ("fwd", "fwd_bwd"):
                med = r.get(key, {}).get("median_ms")
                if med is None:
                    cells.append(f"{'-':>10} {'':>7} {'':>6}")
                    continue
                bmed = base.get(key, {}).get("median_ms") if base and "floor_ms" not in r else None
                ratio = f"{bmed / med:5.2f}" if bmed and math.isfinite(med) and med > 0 else "   - "
                mark = "*" if wins[key] == r["impl"] else " "
                cells.append(f"{med:9.2f}{mark} {r[key].get('iqr_ms', 0):7.2f} {ratio:>6}")
            peak = r.get("peak_step_bytes")
            bpeak = base.get("peak_step_bytes") if base else None
            peak_s = f"{peak / 2**20:8.1f}" if peak is not None and math.isfinite(peak) else f"{'inf' if peak else '-':>8}"
            pratio = (f"{peak / bpeak:5.2f}" if peak and bpeak and math.isfinite(peak) and math.isfinite(bpeak)
                      else "    -")
            comps = [r.get(key, {}).get("compile_ms") for key in ("fwd", "fwd_bwd")]
            comp_s = "/".join(f"{c / 1e3:.2f}" if c is not None and math.isfinite(c) else "-" for c in comps)
            note = r.get("error", "OOM" if r.get("oom") else "")
            if "floor_multiple" in r:
                lo, hi = r.get("floor_multiple_quartiles", (r["floor_multiple"],) * 2)
                note = (f"stage: {r['floor_multiple']:.2f}x its copy-bandwidth floor ({r['floor_ms']:.2f} ms; "
                        f"rounds' quartiles {lo:.2f}-{hi:.2f}x), "
                        f"{r['read_floor_multiple']:.2f}x at read bandwidth")
                if "sum_multiple" in r:
                    note += (f"; {r['sum_multiple']:.2f}x PyTorch's {r['sum_inputs']}-input sum of the same bytes "
                             f"(which ran at {r['sum_floor_multiple']:.2f}x the floor)")
            lines.append(f"  {r['impl']:<22} {cells[0]}  {cells[1]}  {peak_s} {pratio}  {comp_s:>11}  {note}")
        if rec.get("targets"):
            lines.append("  targets: " + ", ".join(_target_text(k, v, case["name"]) for k, v in rec["targets"].items()))
    return "\n".join(lines)


def save_plot(report: dict, path: str) -> None:
    """Bar chart per case of forward and forward+backward medians (needs matplotlib)."""
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    cases = report["cases"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for ax, rec in zip(axes[:, 0], cases):
        rows = [r for r in rec["results"] if math.isfinite(r.get("fwd", {}).get("median_ms", math.inf))]
        names = [r["impl"] for r in rows]
        fwd = [r["fwd"]["median_ms"] for r in rows]
        both = [r.get("fwd_bwd", {}).get("median_ms", float("nan")) for r in rows]
        both = [v if math.isfinite(v) else float("nan") for v in both]  # out of memory: no bar
        pos = range(len(rows))
        ax.barh([p + 0.2 for p in pos], fwd, 0.4, label="forward")
        ax.barh([p - 0.2 for p in pos], both, 0.4, label="forward + backward")
        ax.set_yticks(list(pos), names, fontsize=7)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, log scale)")
        ax.set_title(f"{rec['case']['name']} (B={rec['batch']}) on {report['device']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# command -------------------------------------------------------------------------------------
def _parse_kernels(spec: str) -> Tuple[Tuple[int, int], ...]:
    out = []
    for part in spec.split(","):
        a, _, b = part.lower().partition("x")
        try:
            out.append((int(a), int(b or a)))
        except ValueError:
            raise ValueError(f"--kernels wants KHxKW[,KHxKW...] such as 51x5,5x51,5x5, got {spec!r}") from None
    if any(min(k) < 1 or k[0] % 2 == 0 or k[1] % 2 == 0 for k in out):
        raise ValueError(f"--kernels must be odd and positive (output keeps the input size), got {spec!r}")
    return tuple(out)


def _cases(args) -> List[Case]:
    densities = tuple(float(d) for d in args.densities.split(",")) if args.densities else None
    if densities is not None and any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"--densities must lie in (0, 1], got {args.densities!r}")
    if args.preset == "custom":
        if not (args.shape and args.kernels):
            raise ValueError("--preset custom needs --shape C,H,W and --kernels KHxKW[,...]")
        try:
            c, h, w = (int(v) for v in args.shape.split(","))
        except ValueError:
            raise ValueError(f"--shape wants C,H,W such as 124,56,56, got {args.shape!r}") from None
        if min(c, h, w) < 1:
            raise ValueError(f"--shape must be positive, got {args.shape!r}")
        cases = [Case(f"custom.c{c}.{h}x{w}", c, h, w, _parse_kernels(args.kernels), args.tile_size)]
    else:
        cases = list(PRESETS[args.preset])
        if args.cases:
            wanted = args.cases.split(",")
            cases = [cs for cs in cases if any(cs.name.endswith(wk) or cs.name == wk for wk in wanted)]
            if not cases:
                raise ValueError(f"--cases {args.cases!r} matches none of "
                                 f"{[cs.name for cs in PRESETS[args.preset]]}")
    if densities is not None:
        cases = [dataclasses.replace(cs, densities=densities) for cs in cases]
    return cases


def register(sub) -> None:
    p = sub.add_parser("bench", help="time dense and shift-wise large-kernel layers side by side",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS) + ("custom",), default="paper")
    p.add_argument("--cases", help="comma-separated case names (or suffixes such as s1,s2) of the preset")
    p.add_argument("--shape", help="custom: C,H,W")
    p.add_argument("--kernels", help="custom: parallel branch kernels, e.g. 51x5,5x51,5x5")
    p.add_argument("--tile-size", type=int, default=5, help="custom: tile side N (default 5)")
    p.add_argument("--densities", help="tile densities after compaction, e.g. 1,0.5,0.25 (default per preset)")
    p.add_argument("--batch", type=int, help="batch size (default: sized for the device, see BATCH)")
    p.add_argument("--impls", help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after the first call (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and Taichi (default: PyTorch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time with the process's CPU time, for single-threaded runs on a shared machine")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--from-json", metavar="FILE", help="print the table (and --plot) of a saved run; measure nothing")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --plot files")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as configured (default: keep freed memory in the process, see "
                        "keep_freed_memory)")
    p.set_defaults(func=_run)


def _print_report(report: dict) -> None:
    before, after = report["loadavg_before"][0], report["loadavg_after"][0]
    print(f"shiftwise bench --preset {report['preset']} on {report['device_name']}, torch "
          f"{report['versions']['torch']}, taichi {report['versions']['taichi']}, {report['threads']} threads, "
          f"{report.get('clock', 'wall')} clock, bandwidth: copy {report['copy_bandwidth_gbs']:.1f} GB/s, read "
          f"{report['read_bandwidth_gbs']:.1f} GB/s; load average {before:.2f} -> {after:.2f}; "
          f"malloc: {report.get('malloc', 'system')}")
    print(format_table(report))
    print("\n* fastest implementation of the whole layer (the @0.5 / @0.25 rows compute a compacted one); "
          "x dw: speedup over torch_depthwise (time) or peak-memory ratio to it; compile s: first call's excess "
          "over the median, forward / training step (Taichi compiles there)")
    if report.get("repeats", 10) < 10:
        print(f"note: {report['repeats']} timed runs per measurement (fewer than 10: medians and spreads are rough)")


def _run(args) -> int:
    if args.from_json and args.json:
        raise ValueError("--from-json prints a saved run; there is nothing new for --json to write "
                         "(copy the file instead)")
    outputs.claim(args.json, args.force, "--json")
    outputs.claim(args.plot, args.force, "--plot")
    if args.from_json:
        with open(args.from_json) as f:
            report = _nonfinite(json.load(f))
        _print_report(report)
        if args.plot:
            _write_plot(report, args.plot)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    names = IMPLS if not args.impls else tuple(args.impls.split(","))
    unknown = [nm for nm in names if nm not in IMPLS]
    if unknown:
        raise ValueError(f"unknown --impls {unknown}; choose from {','.join(IMPLS)}")
    if BASELINE not in names:
        names = (BASELINE,) + tuple(names)
    cases = _cases(args)
    batch = args.batch or BATCH["cuda" if device.type == "cuda" else "cpu"][args.preset]
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    dtype = getattr(torch, args.dtype)
    if args.clock == "cpu" and device.type != "cpu":
        raise ValueError("--clock cpu times CPU runs only")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["SHIFTWISE_CPU_THREADS"] = str(args.threads)  # read when Taichi starts
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if device.type == "cuda":  # cuDNN's fastest algorithms (chosen during the warm-up), in full float32
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    malloc = "system" if args.system_malloc or device.type != "cpu" else keep_freed_memory()
    load_before = os.getloadavg()
    log(f"measuring memory bandwidth on {device} ...")
    bandwidth = bandwidths(device, clock=args.clock)
    report = {"preset": args.preset, "device": device_tag(device), "device_name": _device_name(device),
              "versions": versions(), "threads": torch.get_num_threads(), "dtype": args.dtype,
              "clock": args.clock, "repeats": args.repeats, "warmup": args.warmup, "malloc": malloc,
              "copy_bandwidth_gbs": bandwidth["copy"] / 1e9,
              "read_bandwidth_gbs": bandwidth["read"] / 1e9,
              "loadavg_before": load_before, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "SHIFTWISE_CPU_THREADS")},
              "cases": []}
    for i, case in enumerate(cases):
        log(f"{case.name} (batch {batch})")
        report["cases"].append(run_case(case, batch, device, dtype, names, args.repeats, args.warmup,
                                        backward=not args.no_backward, memory=not args.no_memory,
                                        bandwidth=bandwidth, clock=args.clock, seed=args.seed, log=log))
        report["loadavg_after"] = os.getloadavg()
        report["complete"] = i + 1 == len(cases)
        if args.json:  # after every case: an interrupted run keeps the cases it finished
            with outputs.atomic(args.json) as tmp, open(tmp, "w") as f:
                json.dump(_finite(report), f, indent=1, allow_nan=False)
    _print_report(report)
    print(f"stem for committed results: {result_name(args.preset, device)}")
    if args.plot:
        _write_plot(report, args.plot)
    failed = [f"{rec['case']['name']} {r['impl']}" for rec in report["cases"] for r in rec["results"] if "error" in r]
    failed += [rec["case"]["name"] for rec in report["cases"] if rec.get("error")]
    if failed:
        print(f"failed (see the table's notes): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _write_plot(report: dict, path: str) -> None:
    with outputs.atomic(path) as tmp:
        save_plot(report, tmp)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def _nonfinite(v):
    """Inverse of :func:`_finite` for a loaded report."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, dict):
        return {k: _nonfinite(a) for k, a in v.items()}
    if isinstance(v, list):
        return [_nonfinite(a) for a in v]
    return v


def _finite(v):
    """``v`` with non-finite floats as strings (``"inf"`` for an out-of-memory run): strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(a) for k, a in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(a) for a in v]
    return v
