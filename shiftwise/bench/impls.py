"""The implementations the benchmark compares, each built for one case's layer.

* ``torch_depthwise``: one ``F.conv2d`` with the layer's dense kernel (the branches summed):
  the baseline every ratio refers to.
* ``torch_fft``: the same dense kernel applied by FFT (:func:`fft_depthwise_conv2d`), what a
  user with a large dense kernel might pick instead.
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
  after compaction (:func:`~shiftwise.bench.cases.compact`).
* ``sw_auto@d``: what ``backend="auto"`` (the default) runs.
* ``sw_shift_add@d``: the decomposed path's shift-add stage alone (forward), timed against its
  memory-bandwidth floor. It writes into an output allocated once, as the floor's copy does, so
  that the page faults of a fresh large output are not counted as the kernel's time.
* ``onnx_dense@d`` / ``onnx_shiftwise@d``: the layer at density ``d`` (a module holding one
  ``ShiftWiseConv2d``) exported to ONNX in the dense form (one depthwise conv of the merged
  kernel) or the shift-wise form (tiles as small convs, shifts and sums as standard ops) and run
  in onnxruntime on the CPU (:mod:`~shiftwise.bench.ort`), forward only. The export and the
  session are made on the first call (its time is the row's compile time); skipped, with the
  reason, on a GPU run or without onnxruntime.

An SW layer (``Case.sw``, training mode: BatchNorms on batch statistics) has its own three:

* ``sw_official``: what the official layer computes, in PyTorch: each path's ``k x k`` conv
  materialises its ``nk`` planes per channel, the paths' planes are summed, and the three shifted
  sums are read from them (:func:`shiftwise.reference.plane_shift_add`, with the reads built here
  from the layer's tables as the official op indexes them): the baseline of SW cases, for memory
  (what the official layer holds); its times are those of PyTorch gathers, not of the official
  CUDA op;
* ``sw_weights``: :class:`~shiftwise.models.sw.SWLayer` with ``path="weights"`` (three shift-wise
  convs of the merged tiles; no planes);
* ``sw_planes``: the same layer with ``path="planes"`` (one conv of the merged plane kernels, then
  :func:`shiftwise.functional.plane_shift_add`).

Each is checked against the layer computed with dense kernels (:func:`sw_reference`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, reference
from ..functional import decomposed_planes, shiftwise_conv2d
from ..models.sw import SWLayer
from ..modules import ShiftWiseConv2d
from ..tiling import ShiftAddPlan, TilePlan
from . import ort
from .cases import Case, Layer, compact

SW_IMPLS = ("sw_official", "sw_weights", "sw_planes")
ONNX_IMPLS = ("onnx_dense", "onnx_shiftwise")
IMPLS = ("torch_depthwise", "torch_fft", "torch_branches_bn", "torch_nhwc", "torch_transposed", "pad_slice",
         "torch_roll", "sw_decomposed", "sw_fused", "sw_auto", "sw_shift_add") + ONNX_IMPLS + SW_IMPLS
BASELINE = "torch_depthwise"
SW_BASELINE = "sw_official"
BASELINES = (BASELINE, SW_BASELINE)
DENSE = ("torch_depthwise", "torch_fft", "torch_branches_bn", "torch_nhwc", "torch_transposed")


def baseline_of(case) -> str:
    """The implementation every ratio of ``case`` (a :class:`Case` or its JSON dict) refers to."""
    sw = case.get("sw") if isinstance(case, dict) else case.sw
    return SW_BASELINE if sw else BASELINE


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= ``n`` (sizes FFT libraries handle fastest)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Depthwise convolution by FFT: ``F.conv2d(x, weight, bias, padding=(KH // 2, KW // 2),
    groups=C)`` (cross-correlation, any kernel size, larger than the map included).

    ``x``: ``(B, C, H, W)``; ``weight``: ``(C, KH, KW)`` or ``(C, 1, KH, KW)``; ``bias``: ``(C,)``.
    The input and the flipped kernel are zero-padded to a size of at least ``H + KH - 1`` by
    ``W + KW - 1`` (no circular wrap-around), transformed by ``rfft2``, multiplied, transformed
    back, and cropped to ``F.conv2d``'s output. Differentiable.

    >>> x, w = torch.randn(2, 3, 9, 9, dtype=torch.float64), torch.randn(3, 11, 4, dtype=torch.float64)
    >>> y = fft_depthwise_conv2d(x, w)
    >>> torch.allclose(y, F.conv2d(x, w.unsqueeze(1), padding=(5, 2), groups=3))
    True
    """
    if weight.dim() == 4:
        weight = weight.squeeze(1)
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"want x (B, C, H, W) and weight (C, KH, KW), got {tuple(x.shape)} and {tuple(weight.shape)}")
    h, w = x.shape[-2:]
    kh, kw = weight.shape[-2:]
    ph, pw = kh // 2, kw // 2
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    size = (_fast_len(h + kh - 1), _fast_len(w + kw - 1))
    # full linear convolution of x with the flipped kernel; output row i of the correlation
    # with padding ph is its row i + KH - 1 - ph
    spec = torch.fft.rfft2(x, s=size) * torch.fft.rfft2(weight.flip(-2, -1), s=size)
    full = torch.fft.irfft2(spec, s=size)
    y = full[..., kh - 1 - ph:kh - 1 - ph + ho, kw - 1 - pw:kw - 1 - pw + wo]
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous()


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
    # its own reference: (x, None) -> output; (x, gy) -> (input gradient, gradient of each of `params`)
    reference: Optional[Callable[[Tensor, Optional[Tensor]], object]] = None
    inference: bool = False  # forward only: no training step
    skipped: Optional[str] = None  # why it cannot run here (recorded, not an error)
    info: Dict[str, object] = dataclasses.field(default_factory=dict)  # copied into its result after the run


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
    """The implementations of ``names`` that apply to ``case`` (densities expanded); for an SW
    case ``layer`` is its :class:`~shiftwise.models.sw.SWLayer`."""
    if case.sw is not None:
        return build_sw_impls(layer, names)
    impls: List[Impl] = []
    c, n = case.channels, case.tile_size
    tiles, plan, bias = layer.tiles, layer.plan, layer.bias
    uniform = plan.info.uniform
    for name in names:
        if name == "torch_depthwise":
            w, b = _leaf(layer.dense), _leaf(bias)
            impls.append(Impl(name, lambda x, w=w, b=b: F.conv2d(x, w.unsqueeze(1), b, padding=(
                w.shape[1] // 2, w.shape[2] // 2), groups=c), [w, b]))
        elif name == "torch_fft":
            w, b = _leaf(layer.dense), _leaf(bias)
            impls.append(Impl(name, lambda x, w=w, b=b: fft_depthwise_conv2d(x, w, b), [w, b]))
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
                    if roll:
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
        elif name in ONNX_IMPLS:
            for d in case.densities:
                t_d, p_d = compact(tiles, plan, d)
                impls.append(_onnx_impl(f"{name}@{d:g}", name[len("onnx_"):], t_d, p_d, bias, case,
                                        "dense" if d >= 1 else f"d{d:g}"))
    return impls


def _onnx_impl(label: str, form: str, tiles: Tensor, plan: TilePlan, bias: Tensor, case: Case, ref_key: str) -> Impl:
    """The layer of ``tiles`` laid out by ``plan`` exported in ``form`` and run in onnxruntime
    (export and session on the first call, for the input's shape; batch dynamic)."""
    skipped = ort.unavailable(tiles.device)
    if skipped is None and tiles.dtype != torch.float32:
        skipped = f"the ONNX rows run in float32 only (this run: {str(tiles.dtype).replace('torch.', '')})"
    if skipped:
        def refuse(x: Tensor) -> Tensor:
            raise RuntimeError(skipped)
        return Impl(label, refuse, [], (tiles, plan), ref_key=ref_key, inference=True, skipped=skipped)
    layer = torch.nn.Sequential(ShiftWiseConv2d.from_tiles(tiles.detach(), plan, bias.detach(),
                                                           kernel_size=case.kernel)).eval()
    info: Dict[str, object] = {}
    session: List[ort.OrtModule] = []

    def run(x: Tensor) -> Tensor:
        if not session:
            session.append(ort.ort_model(layer, tuple(x.shape), form))
            info.update(session[0].info)
        return session[0](x)
    return Impl(label, run, [], (tiles, plan), ref_key=ref_key, inference=True, info=info)


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

    def run(x):  # into one preallocated output (see the module docstring)
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


# SW layers ---------------------------------------------------------------------------------------
def official_plan(layer: SWLayer) -> ShiftAddPlan:
    """The reads of the three sums as the official shift op indexes the planes, from the layer's
    tables: output pixel ``(h, w)`` of shift-wise channel ``r`` adds, for each of its planes ``p``
    and copy ``i``, plane pixel ``(h + e, w - pad_h[p, i])`` (horizontal sum, output ``r``) and
    ``(h - pad_v[p, i], w + e)`` (vertical, ``repN + r``), and its picked plane
    ``idx_identity[r, i]`` at ``(h + e, w + e)`` (identity, ``2 repN + r``); ``e = k - 1 - k // 2``
    is the planes' margin."""
    n, nk, nr, e = layer.rep_n, layer.nk, layer.n_rep, layer.small_kernel - 1 - layer.small_kernel // 2
    pad = layer.pad_hv.detach().cpu().long()
    ident = layer.idx_identity.detach().cpu().long()
    planes = torch.arange(layer.num_planes)
    channels = torch.arange(n)
    out, plane, dy, dx = [], [], [], []
    for i in range(nr):
        for o, p, y, x in ((planes // nk, planes, torch.full_like(planes, e), -pad[:, i]),
                           (n + planes // nk, planes, -pad[:, nr + i], torch.full_like(planes, e)),
                           (2 * n + channels, ident[:, i], torch.full_like(channels, e), torch.full_like(channels, e))):
            out.append(o)
            plane.append(p)
            dy.append(y)
            dx.append(x)
    return ShiftAddPlan.from_entries(torch.cat(out), torch.cat(plane), torch.cat(dy), torch.cat(dx), 3 * n,
                                     layer.num_planes).to(layer.pad_hv.device)


def _sw_leaves(layer: SWLayer) -> List[Tensor]:
    """The parameters of ``layer`` in the order every SW implementation lists them: the paths'
    plane kernels, then weight and bias of ``bn_lora1``, ``bn_lora2``, ``bn_small``."""
    return list(layer.path_weights()) + [p for bn in _sw_bns(layer) for p in (bn.weight, bn.bias)]


def _sw_bns(layer: SWLayer) -> List[torch.nn.BatchNorm2d]:
    return [layer.bn_lora1, layer.bn_lora2, layer.bn_small]


def _sw_output(x: Tensor, layer: SWLayer, sums: Sequence[Tensor], bns) -> Tensor:
    """BatchNorms of the three sums, plus the shift-wise channels' input, then the ghost channels."""
    x_rep = x.index_select(1, layer.rep_ids)
    y = x_rep
    for s, bn in zip(sums, bns):
        y = y + bn(s)
    return torch.cat([y, x.index_select(1, layer.ghost_ids)], 1) if layer.ghost_ids.numel() else y


def sw_reference(layer: SWLayer) -> Callable[[Tensor, Optional[Tensor]], object]:
    """The reference of an SW layer in training mode: each sum as one depthwise ``F.conv2d`` of
    its merged kernel (the tiles of :meth:`~shiftwise.models.sw.SWLayer.sum_tiles`, merged by
    :func:`shiftwise.reference.shiftwise_conv2d`), BatchNorms on batch statistics. ``(x, None)``
    gives the output, ``(x, gy)`` the gradients of ``x`` and of the parameters (in
    :func:`_sw_leaves` order)."""
    def run(x: Tensor, gy: Optional[Tensor]):
        leaves = [t.detach().requires_grad_(gy is not None) for t in [x] + _sw_leaves(layer)]
        with torch.set_grad_enabled(gy is not None):
            xr, rest = leaves[0], leaves[1:]
            n_path = len(layer.path_weights())
            kernels = rest[0]
            for w in rest[1:n_path]:
                kernels = kernels + w
            sums = layer.sum_tiles(kernels[:, 0])
            x_rep = xr.index_select(1, layer.rep_ids)
            parts = [reference.shiftwise_conv2d(x_rep, *sums[name]) for name in ("h", "v", "i")]
            affine = rest[n_path:]
            bns = [lambda t, w=affine[2 * j], b=affine[2 * j + 1], eps=bn.eps: F.batch_norm(
                t, None, None, w, b, training=True, eps=eps) for j, bn in enumerate(_sw_bns(layer))]
            y = _sw_output(xr, layer, parts, bns)
            if gy is None:
                return y.detach()
            return torch.autograd.grad(y, leaves, gy)
    return run


def build_sw_impls(layer: SWLayer, names: Sequence[str]) -> List[Impl]:
    """The SW implementations of ``names`` (:data:`SW_IMPLS`), each on its own copy of ``layer``."""
    impls: List[Impl] = []
    ref = sw_reference(layer)
    for name in names:
        if name == "sw_official":
            own = copy.deepcopy(layer)
            plan, k, rep_n = official_plan(own), own.small_kernel, own.rep_n

            def run(x, own=own, plan=plan, k=k, rep_n=rep_n):
                x_rep = x.index_select(1, own.rep_ids)
                u = None
                for w in own.path_weights():  # every path's planes, then their sum, as the official layer
                    out = F.conv2d(x_rep, w, padding=k - 1, groups=rep_n)
                    u = out if u is None else u + out
                sums = reference.plane_shift_add(u, plan, tuple(x.shape[-2:])).chunk(3, 1)
                return _sw_output(x, own, sums, _sw_bns(own))
            impls.append(Impl(name, run, _sw_leaves(own), ref_key="sw", reference=ref))
        elif name in ("sw_weights", "sw_planes"):
            own = copy.deepcopy(layer)
            own.path = name[3:]
            impls.append(Impl(name, own, _sw_leaves(own), ref_key="sw", reference=ref))
    return impls
