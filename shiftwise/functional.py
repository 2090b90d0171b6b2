"""Public ops: check arguments, pick a backend, run it.

Backends (``backend=`` argument, else the ``SHIFTWISE_BACKEND`` environment variable, else
``"auto"``):

* ``"taichi_fused"``: the whole conv in one Taichi kernel (no per-tile planes); its backward
  is the same kernel (input gradient) and a weight-gradient kernel.
* ``"taichi_decomposed"``: small convs by PyTorch, then the Taichi shift-add. Holds ``T``
  planes of the input's size (11-21x the activation for SLaK shapes).
* ``"taichi"``: the faster Taichi path for the device and shape (:func:`choose_taichi_path`).
  Raises if Taichi cannot run.
* ``"torch"``: the pure-PyTorch reference (:mod:`shiftwise.reference`).
* ``"auto"``: the faster path for the device, shape and pass (:func:`choose_auto_path`): for
  CPU inference where measurements say so (small maps, dense square kernels), and CPU training
  steps of kernels of at most 3 x 3 on small activations, PyTorch's depthwise conv of the merged kernel
  (:func:`dense_conv`), else ``"taichi"``; the torch reference where Taichi cannot run (the
  reason is logged).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _runtime, ops, reference
from .tiling import TilePlan, merge_tiles

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "taichi", "taichi_fused", "taichi_decomposed", "torch")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set = set()


def _requested(backend: Optional[str]) -> str:
    return (backend if backend is not None else os.environ.get("SHIFTWISE_BACKEND", "auto")).lower()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that will run for ``device``: ``"torch"``, ``"taichi"`` (path chosen per call
    by :func:`choose_taichi_path`, or for ``"auto"`` by :func:`choose_auto_path`) or the
    explicitly requested ``"taichi_fused"`` / ``"taichi_decomposed"``."""
    name = _requested(backend)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} (argument or SHIFTWISE_BACKEND)")
    if name == "torch":
        return "torch"
    try:
        _runtime.check_runnable(device)
    except _runtime.TaichiUnavailable as exc:
        if name != "auto":
            raise
        if str(exc) not in _warned:
            _warned.add(str(exc))
            logger.warning("shiftwise: Taichi backend not used, falling back to torch: %s", exc)
        return "torch"
    return "taichi" if name == "auto" else name


def choose_taichi_path(device: torch.device, plan: TilePlan, input_shape) -> str:
    """``"taichi_fused"`` or ``"taichi_decomposed"``: the faster Taichi path for this call.

    Measured on a 2-core CPU (``benchmarks/NOTES.md``): the fused kernel wins on every SLaK-T,
    RepLKNet-31B and paper shape forward and backward, dense and compacted, except forward
    passes on 7x7 maps at densities <= 0.5 (SLaK-T stage 4: 2.2 vs 1.2 ms; ``"auto"`` runs
    the dense conv there), and it holds no per-tile planes (the decomposed path peaks at
    6-27x the memory), so it is the choice on CPU. On CUDA the fused kernel is also chosen;
    neither path has been timed on a GPU yet.
    """
    return "taichi_fused"


# CPU inference: dense conv or fused kernel (``choose_auto_path``). Measured on the 2-core CPU
# (torch 2.13 / oneDNN, float32, batch 4) over 75 shapes: SLaK-T and RepLKNet-31B stages, the
# paper's case, RepLKNet's R x R stacks (R = 16/32/64, K = 7..31) and four others, densities
# 1 / 0.5 / 0.25 (benchmarks/NOTES.md, "Auto dispatch"):
# * oneDNN's NCHW depthwise kernel is fast (35-57 G multiply-add/s) only when the kernel is at
#   most DENSE_NCHW_MAX_WIDTH wide (14 and wider: 10-20x slower); its channels_last kernel
#   does 4-63 G/s at any width, less on small maps; the fused kernel does 1-34 G/s, much less
#   on small maps (work items of 7-16 columns);
# * so the fused kernel wins when the dense kernel has more than
#   ``AUTO_RATIO_AT_1 * side ** -AUTO_RATIO_EXP`` times its taps inside the map (side =
#   sqrt(H * W): 7.5x at 7x7, 3x at 32x32, 1.3x at 128x128), that threshold times
#   NCHW_RATIO_FACTOR when the NCHW kernel applies. Fitted on those shapes, the rule picked the
#   faster path in 73 of 75 (the other two: 1.01x and 1.32x slower than the best); over all 75
#   forward passes it took 1040 ms against 1455 ms for the fused kernel everywhere.
# * Re-measured in session 8 (benchmarks/results/auto-dispatch-sweep-s8-*.jsonl: per-layer medians
#   of three sweeps, the dense path as it now runs, its kernel cropped and cached), with the dense
#   kernel sized as it runs (cropped_extent; a 13 x 13 kernel in tiles of 5 qualifies for the
#   NCHW factor): 70 of 75 on the faster path (64 sized by the plan's extent), 1114 ms against
#   1771 ms for the fused kernel everywhere and 1102 ms for the faster path everywhere; a new grid
#   search of the three constants gained 0.5% (1108 ms), so they were kept.
# Training steps (needs_grad): the fused kernel, except where the merged kernel is at most
# DENSE_TRAIN_MAX_EXTENT wide and tall and one sample's activation has at most
# DENSE_TRAIN_MAX_ELEMENTS values. benchmarks/auto_dispatch_sweep.py --backward on 26 small- and
# medium-map layers x 3 densities, batch 4 (session 9; the dense conv as auto runs it, NCHW for
# these): 3 x 3 kernels trained 1.2-4x faster as PyTorch's conv up to 0.6M values per sample
# (C = 384 at 16 x 16 and 32 x 32, C = 192 at 56 x 56), 0.6-1.6x from 1.2M to 1.6M (the same
# layer's dense step moved 1.5x between densities, which do not change its work), and 1.6-3x
# slower from 2.4M on (C = 256-384 at 80 x 80 - 128 x 128); over those 30 3 x 3 steps a cap
# between 0.6M and 1.2M gave the least total (1650 ms; 1672 ms at 2M, 1692 ms never dense,
# 3104 ms always dense). 5 x 5 and larger plans trained slower than, or as fast as, the fused kernel.
DENSE_TRAIN_MAX_EXTENT = 3
DENSE_TRAIN_MAX_ELEMENTS = 1 << 20
AUTO_RATIO_AT_1 = 24.0
AUTO_RATIO_EXP = 0.6
DENSE_NCHW_MAX_WIDTH = 13
NCHW_RATIO_FACTOR = 2.5
# the runtime-N fused kernels are ~4x slower than the unrolled float32 ones for these N
# (taichi_kernels.fused.STATIC_TILE_SIZES, not imported here: importing Taichi takes seconds)
STATIC_FUSED_TILE_SIZES = (3, 5)
_GENERIC_FUSED_PENALTY = 4.0


def choose_auto_path(device: torch.device, plan: TilePlan, input_shape, dtype: torch.dtype = torch.float32,
                     needs_grad: bool = False, weight: Optional[Tensor] = None) -> str:
    """What ``backend="auto"`` runs where Taichi can run: ``"dense"`` or a Taichi path.

    ``"dense"`` is PyTorch's depthwise conv of the merged kernel (:func:`dense_conv`). It is
    chosen for float32 CPU inference where the cost rule above says it is faster: small maps,
    dense plans of square kernels (RepLKNet), late stages. Training steps (gradients needed)
    run the fused kernel, except for plans whose merged kernel is at most
    ``DENSE_TRAIN_MAX_EXTENT`` (3) wide and tall on inputs of at most
    ``DENSE_TRAIN_MAX_ELEMENTS`` values per sample: PyTorch's depthwise backward of the merged
    kernel (uncropped whenever the tiles need gradients: every tap gets one) was slower than the
    fused one, or as fast, on every measured plan of 5 x 5 or more, and on 3 x 3 kernels 2-4x
    faster on small activations but slower on large ones (NOTES, session 9).

    ``weight`` (the tiles), when given, sizes the dense kernel as :func:`dense_conv` runs it:
    its all-zero outer ring cropped (a 13 x 13 kernel in tiles of 5 has a 15 x 15 extent but
    runs as 13 x 13, on oneDNN's fast NCHW path); else the plan's extent is used.
    """
    if device.type != "cpu" or dtype != torch.float32 or len(input_shape) != 4:
        return choose_taichi_path(device, plan, input_shape)
    h, w = input_shape[-2], input_shape[-1]
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):  # dynamic torch.compile / export
        return choose_taichi_path(device, plan, input_shape)
    if needs_grad:
        c = input_shape[1]
        small = (max(plan.info.extent) <= DENSE_TRAIN_MAX_EXTENT and not isinstance(c, torch.SymInt)
                 and c * h * w <= DENSE_TRAIN_MAX_ELEMENTS and plan.info.tile_taps(h, w) > 0)
        return "dense" if small else choose_taichi_path(device, plan, input_shape)
    dense, fused, side, nchw = auto_cost_terms(plan, h, w, None if weight is None else cropped_extent(weight, plan))
    if fused == 0:  # no tile reaches the map: the output is the bias
        return choose_taichi_path(device, plan, input_shape)
    threshold = AUTO_RATIO_AT_1 * side ** -AUTO_RATIO_EXP * (NCHW_RATIO_FACTOR if nchw else 1.0)
    return "dense" if dense < threshold * fused else choose_taichi_path(device, plan, input_shape)


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
    :func:`cropped_extent` (the tiles of a 13 x 13 kernel cover 15 x 15; the cropped kernel runs
    on oneDNN's fast NCHW path). Cropped and cached for inference only (no autograd through
    ``weight``, not under ``torch.compile``: the crop reads values), per weight tensor, its version
    counter and plan object."""
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


def _check_same_device(**tensors) -> torch.device:
    devices = {k: t.device for k, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def shift_add(input: Tensor, offsets: Tensor, shift_y: Tensor, shift_x: Tensor, output_size: Tuple[int, int],
              backend: Optional[str] = None) -> Tensor:
    """Sum shifted planes per channel: the shift-add stage of a shift-wise conv.

    ``y[b, c, h, w] = sum_{t = offsets[c]}^{offsets[c+1]-1} input[b, t, h + shift_y[t], w + shift_x[t]]``,
    reading zero outside ``input``.

    Args:
        input: ``(B, T, Hu, Wu)`` float tensor, one plane per tile.
        offsets: int ``(C + 1,)`` CSR offsets grouping tiles by output channel.
        shift_y, shift_x: int ``(T,)`` shifts.
        output_size: ``(H, W)`` of the output.
        backend: one of :data:`BACKENDS` (see module docs); all Taichi ones run the same kernel.

    Returns:
        ``(B, C, H, W)`` tensor of ``input``'s dtype.

    Example::

        >>> u = torch.randn(2, 6, 9, 9)
        >>> offsets = torch.tensor([0, 3, 6], dtype=torch.int32)
        >>> s = torch.tensor([0, 2, 4, 0, 2, 4], dtype=torch.int32)
        >>> shift_add(u, offsets, s, s, (5, 5)).shape
        torch.Size([2, 2, 5, 5])
    """
    if input.dim() != 4:
        raise ValueError(f"shift_add input must be (B, T, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in _FLOAT:
        raise TypeError(f"shift_add input must be a float tensor, got {input.dtype}")
    t = input.shape[1]
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be 1-D with C + 1 >= 2 entries, got shape {tuple(offsets.shape)}")
    if shift_y.shape != (t,) or shift_x.shape != (t,):
        raise ValueError(f"shift_y and shift_x must have shape ({t},) (one per input plane), "
                         f"got {tuple(shift_y.shape)} and {tuple(shift_x.shape)}")
    h, w = (int(s) for s in output_size)
    if h < 0 or w < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    dev = _check_same_device(input=input, offsets=offsets, shift_y=shift_y, shift_x=shift_x)
    off_cpu = offsets.detach().cpu()
    if int(off_cpu[0]) != 0 or int(off_cpu[-1]) != t or bool((off_cpu[1:] < off_cpu[:-1]).any()):
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at T={t}")
    if resolve_backend(backend, dev) == "torch":
        return reference.shift_add(input, offsets, shift_y, shift_x, (h, w))
    # every Taichi backend runs the same shift-add kernel
    c = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tile_channel = torch.repeat_interleave(torch.arange(c, device=dev, dtype=torch.int32), counts, output_size=t)
    return ops.shift_add(input, offsets.to(torch.int32), tile_channel, shift_y.to(torch.int32),
                         shift_x.to(torch.int32), h, w)


def check_conv_args(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first argument that does not fit."""
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan must be a shiftwise.TilePlan, got {type(plan).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != plan.channels:
        raise ValueError(f"input has {x.shape[1]} channels but the plan has {plan.channels}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"input must be a float tensor, got {x.dtype}")
    n = plan.tile_size
    if weight.shape != (plan.num_tiles, n, n):
        raise ValueError(f"weight must have shape (T, N, N) = ({plan.num_tiles}, {n}, {n}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (plan.channels,):
            raise ValueError(f"bias must have shape ({plan.channels},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from input dtype {x.dtype}")
    _check_same_device(input=x, weight=weight, bias=bias)


def shiftwise_conv2d(input: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Shift-wise depthwise convolution (stride 1, zero padding, output the size of the input).

    ``y[b,c,h,w] = bias[c] + sum_{t in c} sum_{i,j<N} weight[t,i,j] * input[b,c, h+dy_t+i-N//2, w+dx_t+j-N//2]``

    which equals ``F.conv2d(input, merge_tiles(weight, plan)[:, None], bias, padding=P, groups=C)``.

    Args:
        input: ``(B, C, H, W)``.
        weight: ``(T, N, N)`` tile weights, grouped by channel as ``plan`` says.
        plan: :class:`~shiftwise.tiling.TilePlan` with ``C`` channels and ``T`` tiles.
        bias: optional ``(C,)``.
        backend: one of :data:`BACKENDS` (see module docs).

    Example::

        >>> from shiftwise.tiling import split_kernel
        >>> k = torch.randn(4, 51, 5)
        >>> tiles, plan = split_kernel(k, 5)
        >>> x = torch.randn(1, 4, 20, 20)
        >>> y = shiftwise_conv2d(x, tiles, plan)
        >>> torch.allclose(y, F.conv2d(x, k[:, None], padding=(25, 2), groups=4), atol=1e-4)
        True

    Under ``torch.autocast`` it is a float32 op (autocast has no low-precision rule for it and the
    Taichi kernels have no half arithmetic): float16/bfloat16 arguments are cast up and the output
    is float32, as for the ops autocast runs in float32.
    """
    if input.device.type != "meta" and torch.is_autocast_enabled(input.device.type):
        def up(t):
            return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t

        with torch.autocast(input.device.type, enabled=False):
            return shiftwise_conv2d(up(input), up(weight), plan, up(bias), backend)
    check_conv_args(input, weight, plan, bias)
    if plan.offsets.device != input.device:
        plan = plan.to(input.device)
    if input.device.type == "meta":  # shapes only: the custom op's fake implementation
        return ops.fused_conv(input, weight, bias, plan.offsets, plan.dy, plan.dx, plan.tile_channel(),
                              plan.tile_size // 2)
    name = resolve_backend(backend, input.device)
    if name == "taichi" and _requested(backend) == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias))
        name = choose_auto_path(input.device, plan, input.shape, input.dtype, needs_grad, weight)
        if name == "dense":
            return dense_conv(input, weight, plan, bias)
    if name == "torch":
        return reference.shiftwise_conv2d(input, weight, plan, bias)
    if name == "taichi":
        name = choose_taichi_path(input.device, plan, input.shape)
        if not torch.compiler.is_compiling():  # a logging call would break a torch.compile graph
            logger.debug("shiftwise_conv2d: %s for input %s, %r", name, tuple(input.shape), plan)
    if not torch.compiler.is_compiling():  # tiles that only ever meet the zero padding add nothing
        keep, live = plan.live(input.shape[-2], input.shape[-1])
        if keep is not None:
            weight, plan = weight.index_select(0, keep), live
    if name == "taichi_fused":
        return ops.fused_conv(input, weight, bias, plan.offsets, plan.dy, plan.dx, plan.tile_channel(),
                              plan.tile_size // 2)
    return _decomposed(input, weight, plan, bias)


def decomposed_planes(x: Tensor, weight: Tensor, plan: TilePlan) -> Tuple[Tensor, Tensor, Tensor]:
    """``(u, sy, sx)``: the decomposed path's per-tile small-conv planes of ``x`` (``(B, T, Hu,
    Wu)``) and each tile's row and column shift into them, as :func:`shift_add` takes them.

    The planes hold every position whose window touches the input ("full" padding ``N - 1``;
    the shift-add reads zero beyond them, and the plan's whole reach would make them up to 3x
    larger), less the rows and columns no tile reads (``PlanInfo.plane_layout``)."""
    info = plan.info
    (pad_h, pad_w), (oy, ox) = info.plane_layout
    if info.uniform is not None:
        u = F.conv2d(x, weight.unsqueeze(1), padding=(pad_h, pad_w), groups=info.channels)
    else:
        gathered = x.index_select(1, plan.tile_channel().long())
        u = F.conv2d(gathered, weight.unsqueeze(1), padding=(pad_h, pad_w), groups=info.num_tiles)
    return u, plan.dy + oy, plan.dx + ox


def _decomposed(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> Tensor:
    info = plan.info
    b, c, h, w = x.shape
    if info.num_tiles == 0:
        y = x.new_zeros(b, c, h, w)
        return y + bias.view(1, c, 1, 1) if bias is not None else y
    u, sy, sx = decomposed_planes(x, weight, plan)
    y = ops.shift_add(u, plan.offsets, plan.tile_channel(), sy, sx, h, w)
    return y + bias.view(1, c, 1, 1) if bias is not None else y
