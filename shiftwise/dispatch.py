"""Which backend runs a call, and why.

:func:`resolve_backend` turns a ``backend=`` name (else ``SHIFTWISE_BACKEND``, else ``"auto"``)
into what can run on the device; :func:`conv_path` picks the path of one
:func:`shiftwise.functional.shiftwise_conv2d` call and logs the reason at debug level.
``"auto"`` chooses between PyTorch's dense depthwise conv of the merged kernel
(:func:`dense_conv`) and the fused Taichi kernel with the cost rule of :func:`choose_auto_path`;
the constants below were fitted on measured shapes (``docs/backends.md``,
``benchmarks/auto_dispatch_sweep.py``). On CUDA it chooses between the fused kernel and the
decomposed path by the committed rule file ``data/cuda_auto_rule.json`` (:func:`cuda_auto_rule`,
written by ``benchmarks/cuda_auto_rule.py`` from ``shiftwise bench --device cuda`` results).
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import threading
import weakref
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _runtime
from .tiling import TilePlan, merge_tiles

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "taichi", "taichi_fused", "taichi_decomposed", "torch")
_warned: set = set()

# Inference on CPU, float32: the dense conv when its taps are fewer than
# AUTO_RATIO_AT_1 * side ** -AUTO_RATIO_EXP times the fused kernel's (side = sqrt(H * W)),
# that threshold times NCHW_RATIO_FACTOR where oneDNN's fast NCHW depthwise kernel applies
# (kernels at most DENSE_NCHW_MAX_WIDTH wide).
AUTO_RATIO_AT_1 = 24.0
AUTO_RATIO_EXP = 0.6
DENSE_NCHW_MAX_WIDTH = 13
NCHW_RATIO_FACTOR = 2.5
# Training steps on CPU, float32: the dense conv for merged kernels at most
# DENSE_TRAIN_MAX_EXTENT wide and tall on at most DENSE_TRAIN_MAX_ELEMENTS values per sample.
DENSE_TRAIN_MAX_EXTENT = 3
DENSE_TRAIN_MAX_ELEMENTS = 1 << 20
# The fused kernel's taps cost _GENERIC_FUSED_PENALTY times more for tile sizes the CPU kernels
# do not unroll (taichi_kernels.fused.STATIC_TILE_SIZES; not imported: importing Taichi is slow).
STATIC_FUSED_TILE_SIZES = (3, 5)
# Inference on CPU, float32, cross-shaped plans (tiles on the two axes through the centre only):
# two dense strips (cross_conv) when their taps, each costing CROSS_TAP_COST[N] * (side /
# CROSS_SIDE) ** AUTO_RATIO_EXP fused taps, cost less than the fused kernel; checked before the
# dense rule (the strips hold fewer taps than the merged cross). Measured on SW-T's and SLaK-T's
# converted layers, batch 4 at 224, channels_last input as inside the models (docs/backends.md):
# at 56 x 56 the strips ran at 0.9x the fused kernel's time for 3 x 3 tiles and 0.85x for 5 x 5
# (nearly as many taps), and gain on smaller maps.
CROSS_TAP_COST = {3: 0.9, None: 0.5}
CROSS_SIDE = 56.0
_GENERIC_FUSED_PENALTY = 4.0
# The rule of auto on CUDA (fused kernel or decomposed path), measured: see cuda_auto_rule().
CUDA_AUTO_RULE = Path(__file__).resolve().parent / "data" / "cuda_auto_rule.json"
CUDA_RULE_FORMAT = 1
CUDA_PATHS = {"fused": "taichi_fused", "decomposed": "taichi_decomposed"}


def _requested(backend: Optional[str]) -> str:
    return (backend if backend is not None else os.environ.get("SHIFTWISE_BACKEND", "auto")).lower()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that can run for ``device``: ``"torch"``, the requested Taichi backend, or
    ``"taichi"`` for ``"auto"`` where Taichi can run (its path is chosen per call by
    :func:`conv_path`). ``"auto"`` falls back to ``"torch"`` where Taichi cannot run (logged once
    per reason); an explicit Taichi backend raises :class:`~shiftwise._runtime.TaichiUnavailable`."""
    name = _requested(backend)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} (argument or SHIFTWISE_BACKEND)")
    if name == "torch":
        return "torch"
    try:
        _runtime.check_runnable(device)
    except _runtime.TaichiUnavailable as exc:
        if name != "auto" or isinstance(exc, _runtime.TaichiArchMismatch):
            raise
        if str(exc) not in _warned:
            _warned.add(str(exc))
            logger.warning("shiftwise: Taichi backend not used, falling back to PyTorch: %s", exc)
        return "torch"
    return "taichi" if name == "auto" else name


def conv_path(backend: Optional[str], x: Tensor, weight: Tensor, plan: TilePlan,
              bias: Optional[Tensor] = None) -> str:
    """What a shift-wise conv call runs: ``"torch"`` (the reference), ``"dense"``
    (:func:`dense_conv`), ``"cross"`` (:func:`cross_conv`), ``"taichi_fused"`` or
    ``"taichi_decomposed"``. Logs why (debug). Where Taichi cannot run, ``"auto"`` runs the
    reference, or on CUDA :func:`dense_conv` (cuDNN's depthwise conv of the cached merged kernel)."""
    name = resolve_backend(backend, x.device)
    requested = _requested(backend)
    if name == "taichi" and requested == "auto":
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        path, *why = _auto_choice(x.device, plan, x.shape, x.dtype, needs_grad, weight)
    elif name == "taichi":
        path, *why = "taichi_fused", "backend 'taichi' runs the fused kernel"
    elif name == "torch" and requested == "auto":
        path = "dense" if x.device.type == "cuda" else "torch"
        why = ("Taichi cannot run on %s", x.device)
    else:
        path, *why = name, "backend %r asked for", requested
    if not torch.compiler.is_compiling():  # a logging call would break a torch.compile graph
        logger.debug("shiftwise_conv2d: %s for input %s, %r: " + why[0], path, tuple(x.shape), plan, *why[1:])
    return path


def choose_auto_path(device: torch.device, plan: TilePlan, input_shape, dtype: torch.dtype = torch.float32,
                     needs_grad: bool = False, weight: Optional[Tensor] = None) -> str:
    """What ``backend="auto"`` runs where Taichi can run: ``"dense"`` (:func:`dense_conv`),
    ``"cross"`` (:func:`cross_conv`) or ``"taichi_fused"``.

    ``"cross"`` for float32 CPU inference of a cross-shaped plan (:func:`cross_strips`) where the
    two strips' taps, weighted by ``CROSS_TAP_COST`` and the map size, cost less than the fused
    kernel's; then the dense rule:
    ``"dense"`` for float32 CPU inference where the dense conv's taps are fewer than the fused
    kernel's by the threshold of the module constants (small maps, dense plans of square kernels,
    late stages), and for float32 CPU training steps of merged kernels at most
    ``DENSE_TRAIN_MAX_EXTENT`` wide and tall on at most ``DENSE_TRAIN_MAX_ELEMENTS`` values per
    sample; ``"taichi_fused"`` otherwise. ``weight`` (the tiles), when given, sizes the
    dense kernel as :func:`dense_conv` runs it (:func:`cropped_extent`); else the plan's extent.
    On CUDA, float32: ``"taichi_fused"`` or ``"taichi_decomposed"`` as the committed rule says
    (:func:`cuda_rule_choice`); other dtypes on CUDA: ``"taichi_fused"``.

    Example::

        >>> from shiftwise.tiling import split_kernel
        >>> plan = split_kernel(torch.randn(2, 13, 13), 5)[1]
        >>> choose_auto_path(torch.device("cpu"), plan, (4, 2, 7, 7))
        'dense'
    """
    return _auto_choice(device, plan, input_shape, dtype, needs_grad, weight)[0]


def _auto_choice(device, plan, input_shape, dtype, needs_grad, weight) -> tuple:
    """``(path, reason format, *its arguments)`` for :func:`choose_auto_path` (formatted only
    when logged)."""
    if device.type not in ("cpu", "cuda") or dtype != torch.float32 or len(input_shape) != 4:
        return "taichi_fused", "auto: the fused kernel on %s %s", device.type, dtype
    h, w = input_shape[-2], input_shape[-1]
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):  # dynamic torch.compile / export
        return "taichi_fused", "auto: symbolic map size"
    if device.type == "cuda":
        if torch.compiler.is_compiling():  # the rule's file and search stay out of the graph
            side, taps = rule_features(plan, h, w)
            path = _compiled_cuda_choice(side, taps, needs_grad)
            return path, "auto on CUDA under torch.compile: the rule's %s path", path
        return cuda_rule_choice(plan, h, w, needs_grad)
    if needs_grad:
        c = input_shape[1]
        extent = max(plan.info.extent)
        small = (extent <= DENSE_TRAIN_MAX_EXTENT and not isinstance(c, torch.SymInt)
                 and c * h * w <= DENSE_TRAIN_MAX_ELEMENTS and plan.info.tile_taps(h, w) > 0)
        return ("dense" if small else "taichi_fused",
                "auto, training step: merged kernel %d wide (dense at most %d), %s values per sample (at most %d)",
                extent, DENSE_TRAIN_MAX_EXTENT, c * h * w, DENSE_TRAIN_MAX_ELEMENTS)
    dense, fused, side, nchw = auto_cost_terms(plan, h, w, None if weight is None else cropped_extent(weight, plan))
    if fused == 0:
        return "taichi_fused", "auto: no tile reaches the map (the output is the bias)"
    threshold = AUTO_RATIO_AT_1 * side ** -AUTO_RATIO_EXP * (NCHW_RATIO_FACTOR if nchw else 1.0)
    strips = None if torch.compiler.is_compiling() else cross_strips(plan)  # its split reads values
    if strips is not None:
        info = plan.info
        taps = info.dense_taps(h, w, strips[0]) + info.dense_taps(h, w, strips[1])
        cost = CROSS_TAP_COST.get(info.tile_size, CROSS_TAP_COST[None]) * (side / CROSS_SIDE) ** AUTO_RATIO_EXP
        if taps * cost < fused:
            return "cross", "auto: two dense strips of %.4g taps at %.3g x the fused kernel's %.4g", taps, cost, fused
    if dense < threshold * fused:
        return "dense", "auto: dense taps %.4g against %.3g x fused taps %.4g", dense, threshold, fused
    return "taichi_fused", "auto: dense taps %.4g against %.3g x fused taps %.4g", dense, threshold, fused


@functools.lru_cache(maxsize=None)
def cuda_auto_rule(path: Optional[str] = None) -> dict:
    """The rule of ``backend="auto"`` on CUDA (default: the committed ``data/cuda_auto_rule.json``),
    read once and checked.

    ``measured`` is ``null`` until a GPU measured it (then: the GPU, versions and result files);
    ``forward`` and ``training`` list measured cases, each ``{"case", "side", "taps", "fused_ms",
    "decomposed_ms", "path"}`` (``side = sqrt(H * W)``, ``taps`` = tiles per channel times
    ``N * N``); a call takes the path of the nearest case in ``(log2 side, log2 taps)`` within
    ``max_distance``, else ``default``. Written by ``benchmarks/cuda_auto_rule.py``.
    """
    where = Path(path) if path is not None else CUDA_AUTO_RULE
    try:
        rule = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        fix = "; reinstall shiftwise" if path is None else ""
        raise ValueError(f"cannot read the CUDA auto rule {where} ({exc}){fix}") from None
    check_cuda_rule(rule, str(where))
    return rule


def check_cuda_rule(rule, where: str = "the CUDA auto rule") -> None:
    """Raise ``ValueError`` naming what is wrong if ``rule`` is not a rule of format
    :data:`CUDA_RULE_FORMAT` (see :func:`cuda_auto_rule`)."""
    def bad(what):
        raise ValueError(f"{where} is not a CUDA auto rule of format {CUDA_RULE_FORMAT}: {what}")

    if not isinstance(rule, dict) or rule.get("format") != CUDA_RULE_FORMAT:
        bad(f"format {rule.get('format') if isinstance(rule, dict) else rule!r}")
    if rule.get("default") not in CUDA_PATHS:
        bad(f"default {rule.get('default')!r} (fused or decomposed)")
    distance = rule.get("max_distance")
    if not isinstance(distance, (int, float)) or not distance >= 0:
        bad(f"max_distance {distance!r}")
    if rule.get("measured") is not None and not isinstance(rule["measured"], dict):
        bad("measured is neither null nor an object")
    for pass_ in ("forward", "training"):
        points = rule.get(pass_)
        if not isinstance(points, list):
            bad(f"{pass_} is not a list")
        for point in points:
            ok = (isinstance(point, dict) and point.get("path") in CUDA_PATHS
                  and all(isinstance(point.get(k), (int, float)) and point[k] > 0 for k in ("side", "taps")))
            if not ok:
                bad(f"{pass_} case {point!r}")


def rule_features(plan: TilePlan, height: int, width: int) -> Tuple[float, float]:
    """``(side, taps)`` of a call for the CUDA rule: ``sqrt(H * W)`` and the plan's tiles per
    channel times ``N * N``."""
    info = plan.info
    return max(1.0, (height * width) ** 0.5), info.num_tiles / max(1, info.channels) * info.tile_size ** 2


def cuda_rule_choice(plan: TilePlan, height: int, width: int, needs_grad: bool, rule: Optional[dict] = None) -> tuple:
    """``(path, reason format, *its arguments)`` of ``backend="auto"`` on CUDA: the path of the
    nearest measured case of the pass (forward or training step) in ``(log2 side, log2 taps)``
    (:func:`rule_features`) when it lies within the rule's ``max_distance``, else the rule's
    default. Deterministic: nothing is timed at run time."""
    side, taps = rule_features(plan, height, width)
    return _cuda_choice_from_features(cuda_auto_rule() if rule is None else rule, side, taps, needs_grad)


def _cuda_choice_from_features(rule: dict, side: float, taps: float, needs_grad: bool) -> tuple:
    pass_ = "training" if needs_grad else "forward"
    if taps <= 0 or not rule[pass_]:
        why = "no tiles" if taps <= 0 else ("not measured" if rule["measured"] is None else f"no {pass_} case")
        return CUDA_PATHS[rule["default"]], "auto on CUDA (%s rule): %s, the %s path", pass_, why, rule["default"]
    here = (math.log2(side), math.log2(taps))
    best = min(rule[pass_], key=lambda p: math.dist(here, (math.log2(p["side"]), math.log2(p["taps"]))))
    distance = math.dist(here, (math.log2(best["side"]), math.log2(best["taps"])))
    if distance > rule["max_distance"]:
        return (CUDA_PATHS[rule["default"]], "auto on CUDA (%s rule): nearest measured case %s is %.2f away "
                "(more than %.2g), the %s path", pass_, best.get("case"), distance, rule["max_distance"],
                rule["default"])
    return (CUDA_PATHS[best["path"]], "auto on CUDA (%s rule): as the nearest measured case %s (%.2f away), the "
            "%s path", pass_, best.get("case"), distance, best["path"])


@torch.compiler.assume_constant_result
def _compiled_cuda_choice(side: float, taps: float, needs_grad: bool) -> str:
    """The path of :func:`cuda_rule_choice` for a call's features, a constant of the compiled
    graph (map sizes are static there: a dynamic size takes the fused kernel above)."""
    return _cuda_choice_from_features(cuda_auto_rule(), side, taps, needs_grad)[0]


def cross_strips(plan: TilePlan) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """For a plan whose tiles all sit on the two axes through the kernel centre (a cross: SLaK's
    strips, an SW layer's horizontal and vertical sums) with tiles on both, the sizes
    ``((KH, N), (N, KW))`` of its vertical strip (tiles with ``dx == 0``) and of its horizontal
    one (the others, ``dy == 0``); else ``None``. From the plan's info, no device sync."""
    positions = plan.info.positions
    n = plan.tile_size
    if not positions or any(dy != 0 and dx != 0 for dy, dx, _ in positions):
        return None
    vertical = [abs(dy) for dy, dx, _ in positions if dx == 0]
    horizontal = [abs(dx) for dy, dx, _ in positions if dx != 0]
    if not vertical or not horizontal or n > DENSE_NCHW_MAX_WIDTH:
        return None
    return (2 * max(vertical) + n, n), (n, 2 * max(horizontal) + n)


def cross_conv(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv of a cross-shaped plan (:func:`cross_strips`) as two PyTorch
    depthwise convs: the vertical strip, ``N`` wide, on ``x`` as it is, and the horizontal strip
    as a vertical one on the transposed maps (oneDNN's NCHW depthwise kernel is fast for narrow
    kernels only). What ``backend="auto"`` runs when :func:`choose_auto_path` says ``"cross"``."""
    def compute():
        vertical = (plan.dx == 0).to(weight.device)
        parts = []
        for keep, flip in ((vertical, False), (~vertical, True)):
            sub = plan.select(keep)
            kernel = merge_tiles(weight[keep], sub)
            pad = sub.info.padding
            if flip:
                kernel, pad = kernel.transpose(1, 2), (pad[1], pad[0])
            parts.append((kernel.unsqueeze(1).contiguous(), pad))
        return parts

    (kv, pv), (kh, ph) = _per_weight("cross", weight, plan, compute)
    groups = plan.channels
    y = F.conv2d(x, kv, bias, padding=pv, groups=groups)
    return y + F.conv2d(x.transpose(2, 3), kh, padding=ph, groups=groups).transpose(2, 3)


def auto_cost_terms(plan: TilePlan, height: int, width: int,
                    extent: Optional[Tuple[int, int]] = None) -> Tuple[float, float, float, bool]:
    """The inputs of :func:`choose_auto_path`'s rule: ``(dense taps, fused taps weighted by the
    kernel's speed, map side, NCHW kernel applies)`` for a dense kernel of size ``extent``
    (default: the plan's extent). ``benchmarks/auto_dispatch_sweep.py --fit`` fits the constants
    on them."""
    info = plan.info
    extent = info.extent if extent is None else extent
    fused = info.tile_taps(height, width)
    if info.tile_size not in STATIC_FUSED_TILE_SIZES:
        fused *= _GENERIC_FUSED_PENALTY
    return (info.dense_taps(height, width, extent), fused, max(1.0, (height * width) ** 0.5),
            extent[1] <= DENSE_NCHW_MAX_WIDTH)


def dense_conv(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as PyTorch's depthwise conv of the merged kernel, laid out for speed.

    Kernels at most ``DENSE_NCHW_MAX_WIDTH`` wide run on ``x`` as it is; wider ones on a
    channels_last copy (oneDNN's NCHW depthwise kernel is 10-20x slower there), and the output
    comes back in ``x``'s layout. Exact up to float rounding; what ``backend="auto"`` runs when
    :func:`choose_auto_path` says ``"dense"``.
    """
    kernel, pad = _merged_kernel(weight, plan)
    groups = plan.channels
    if kernel.shape[-1] <= DENSE_NCHW_MAX_WIDTH:
        return F.conv2d(x, kernel, bias, padding=pad, groups=groups)
    xl = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(xl, kernel, bias, padding=pad, groups=groups)
    return y if xl is x else y.contiguous()


# Per-(weight, plan) results for inference: the merged kernel (merging costs more than the conv
# on small maps: RepLKNet-31B stage 4, 1024 channels of 9 tiles, 1.24 ms against a 0.46 ms conv)
# and its cropped size. (what, id(weight), id(plan)) -> (weight ref, weight version, plan ref,
# value); an entry goes when its weight is freed or when more than _CACHE_MAX are held.
_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CACHE_MAX = 128
_cache_lock = threading.Lock()


def _cacheable(weight: Tensor) -> bool:
    return not (torch.is_grad_enabled() and weight.requires_grad) and not torch.compiler.is_compiling()


def _per_weight(what: str, weight: Tensor, plan: TilePlan, compute):
    """``compute()``, cached per weight tensor (and its version counter: in-place updates) and
    plan object when nothing needs it differentiable and nothing is being compiled."""
    if not _cacheable(weight):
        return compute()
    key = (what, id(weight), id(plan))
    with _cache_lock:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2]() is plan:
            _CACHE.move_to_end(key)
            return hit[3]
    value = compute()

    def forget(_, key=key):
        with _cache_lock:
            _CACHE.pop(key, None)

    with _cache_lock:
        _CACHE[key] = (weakref.ref(weight, forget), weight._version, weakref.ref(plan), value)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return value


def cropped_extent(weight: Tensor, plan: TilePlan) -> Tuple[int, int]:
    """``(KH, KW)`` of the merged kernel with its all-zero outer rows and columns cropped
    symmetrically (as :func:`dense_conv` runs it): the plan's extent shrunk to the taps that some
    tile holds non-zero (NaN counts as non-zero). Computed from the tiles, without merging;
    the plan's extent under ``torch.compile``."""
    if torch.compiler.is_compiling():  # the sizes would depend on values: the extent's guard
        return plan.info.extent

    def compute():
        n = plan.tile_size
        if weight.numel() == 0:
            return plan.info.extent
        used = weight.detach() != 0  # (T, N, N)
        taps = torch.arange(n, device=weight.device) - n // 2
        sizes = []
        for axis, shift in ((2, plan.dy), (1, plan.dx)):  # rows: any over columns, and vice versa
            hit = used.any(axis)  # (T, N)
            offset = (shift.to(weight.device).view(-1, 1) + taps).abs()
            reach = int(torch.where(hit, offset, -1).max())
            sizes.append(2 * reach + 1 if reach >= 0 else 1)
        return (min(sizes[0], plan.info.extent[0]), min(sizes[1], plan.info.extent[1]))

    return _per_weight("extent", weight, plan, compute)


def _merged_kernel(weight: Tensor, plan: TilePlan) -> Tuple[Tensor, Tuple[int, int]]:
    """``(kernel (C, 1, KH, KW), padding)``: the plan's merged dense kernel, cropped to
    :func:`cropped_extent` for inference only (with autograd through ``weight`` every tap needs
    its gradient; under ``torch.compile`` the crop would read values), and cached so."""
    def compute():
        kernel = merge_tiles(weight, plan)
        pad = plan.info.padding
        if _cacheable(weight):
            kh, kw = cropped_extent(weight, plan)
            ch, cw = (kernel.shape[1] - kh) // 2, (kernel.shape[2] - kw) // 2
            kernel = kernel[:, ch:kernel.shape[1] - ch, cw:kernel.shape[2] - cw]
            pad = (pad[0] - ch, pad[1] - cw)
        return kernel.unsqueeze(1), pad

    return _per_weight("merged", weight, plan, compute)
