"""The forms a shift-wise conv takes in an exported graph, and the rule that picks one.

Under ``torch.onnx.export`` (either exporter) :func:`shiftwise.functional.shiftwise_conv2d`
does not call its custom ops: it calls :func:`export_graph`, which writes the layer with
standard torch ops that every exporter translates to standard ONNX operators:

* ``"dense"`` (:func:`dense_graph`): one depthwise convolution of the merged kernel;
* ``"shiftwise"`` (:func:`shiftwise_graph`): the tiles as one grouped ``N x N`` convolution,
  their shifts as slices with constant bounds and the sum per channel as gathers and adds; no
  convolution larger than a tile is left in the graph.

:func:`choose` is the default rule (measured in onnxruntime by ``benchmarks/onnx_forms.py``);
:func:`forced` overrides it while a model is exported and :func:`recording` lists the form
each layer got. The rule lives at the functional level rather than as a symbolic function
of the custom ops because both forms are built from the plan, which is Python data.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import cropped_extent
from .tiling import ShiftAddPlan, TilePlan, merge_tiles

FORMS = ("auto", "dense", "shiftwise")
CONV_CHANNEL_MULTIPLE = 16

_state = threading.local()


def _get(name: str, default):
    return getattr(_state, name, default)


def exporting() -> bool:
    """Whether a ``torch.onnx.export`` (TorchScript or dynamo exporter) is tracing now. The
    exporters trace (TorchScript) or compile (dynamo): checked first, as the ONNX flag costs
    microseconds per call."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def forced(form: str) -> Iterator[None]:
    """Within the block, layers exported by ``torch.onnx.export`` take ``form``: ``"auto"`` (the
    rule of :func:`choose`), ``"dense"`` or ``"shiftwise"``.

    Example::

        >>> with forced("shiftwise"):
        ...     torch.onnx.export(model, (x,), "model.onnx")  # doctest: +SKIP
    """
    if form not in FORMS:
        raise ValueError(f"ONNX form must be one of {FORMS}, got {form!r}")
    previous = _get("form", "auto")
    _state.form = form
    try:
        yield
    finally:
        _state.form = previous


@contextlib.contextmanager
def recording() -> Iterator[List[dict]]:
    """Collect, while a model is exported in the block, one record per shift-wise layer exported:
    ``{"channels", "tiles", "kernel", "map", "form", "reason"}`` (``kernel``: the merged kernel's
    ``[KH, KW]``; ``map``: the traced ``[H, W]``)."""
    previous = _get("records", None)
    records: List[dict] = []
    _state.records = records
    try:
        yield records
    finally:
        _state.records = previous


# the rule ------------------------------------------------------------------------------------
# In onnxruntime the dense form's cost grows with its taps per output (its depthwise conv is
# compute-bound), the shiftwise form's with the tile planes per channel (each is gathered,
# convolved, sliced and summed: memory-bound). The shiftwise form is chosen when a channel's
# planes are at most SHIFTWISE_MAX_PLANES_PER_TAP times the dense kernel's taps inside the map.
# benchmarks/onnx_forms.py --fit: 0.0112 picks the faster form in 50 of 50 measured layers, the
# paper's layer at density 0.25 (0.0113, dense 2x faster) right above it; rounded down, 0.011
# picks it in 49 (docs/deployment.md).
SHIFTWISE_MAX_PLANES_PER_TAP = 0.011


def choose(plan: TilePlan, height: int, width: int) -> Tuple[str, str]:
    """``(form, reason)``: the ONNX form the rule gives a layer of ``plan`` on ``height x width``
    maps, ``"dense"`` or ``"shiftwise"``, and a short phrase saying why. Deterministic: from the
    plan's geometry and the map size only.

    Example::

        >>> from shiftwise.tiling import TilePlan
        >>> choose(TilePlan.grid(4, (13, 13), 3), 7, 7)
        ('dense', '25 tile planes per channel against 49 dense taps (shiftwise at most 0.54)')
    """
    info = plan.info
    h, w = int(height), int(width)
    if info.num_tiles == 0:
        return "dense", "no tiles"
    planes = info.num_tiles / info.channels
    taps = info.dense_taps(h, w)
    limit = SHIFTWISE_MAX_PLANES_PER_TAP * taps
    form = "shiftwise" if planes <= limit else "dense"
    return form, f"{planes:.3g} tile planes per channel against {taps:.0f} dense taps (shiftwise at most {limit:.2g})"


def _hint(size) -> int:
    """A concrete value for a (possibly symbolic) size: the example input's."""
    if isinstance(size, torch.SymInt):
        node = size.node
        return int(node.hint if node.hint is not None else node.shape_env.size_hint(node.expr))
    return int(size)


def export_graph(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> Tensor:
    """The shift-wise conv in the form :func:`forced` names (else the one :func:`choose` gives),
    noted for :func:`recording`. What :func:`shiftwise.functional.shiftwise_conv2d` runs while a
    model is exported to ONNX."""
    h, w = _hint(x.shape[-2]), _hint(x.shape[-1])
    form = _get("form", "auto")
    if form == "auto":
        form, reason = choose(plan, h, w)
    else:
        reason = "asked for"
    records = _get("records", None)
    if records is not None:
        records.append({"channels": plan.channels, "tiles": plan.num_tiles, "kernel": list(plan.info.extent),
                        "map": [h, w], "form": form, "reason": reason})
    return dense_graph(x, weight, plan, bias) if form == "dense" else shiftwise_graph(x, weight, plan, bias)


# constants -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Tensors computed in the block enter a TorchScript trace as constants (initializers), not as
    the ops that made them. Under the dynamo exporter parameters are fake tensors: the ops are
    traced there, on initializers, and onnxruntime folds them when it loads the file."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.no_grad():
            yield
    finally:
        torch._C._set_tracing_state(state)


def dense_graph(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as one depthwise convolution of the merged kernel, cropped to the taps
    some tile holds (:func:`shiftwise.dispatch.cropped_extent`); the kernel is one constant.

    Example::

        >>> from shiftwise.tiling import split_kernel
        >>> k = torch.randn(4, 13, 5)
        >>> tiles, plan = split_kernel(k, 5)
        >>> x = torch.randn(1, 4, 16, 16)
        >>> torch.allclose(dense_graph(x, tiles, plan), F.conv2d(x, k[:, None], padding=(6, 2), groups=4), atol=1e-5)
        True
    """
    if torch.compiler.is_compiling():  # the dynamo exporter: fake weights, the merge is traced
        return F.conv2d(x, _traced_merge(weight, plan).unsqueeze(1), bias, padding=plan.info.padding,
                        groups=plan.channels)
    with _untraced():
        kernel = merge_tiles(weight.detach(), plan)
        kh, kw = cropped_extent(weight.detach(), plan)
        ch, cw = (kernel.shape[1] - kh) // 2, (kernel.shape[2] - kw) // 2
        kernel = kernel[:, ch:kernel.shape[1] - ch, cw:kernel.shape[2] - cw].unsqueeze(1).contiguous()
    pad = plan.info.padding
    return F.conv2d(x, kernel, bias, padding=(pad[0] - ch, pad[1] - cw), groups=plan.channels)


def _traced_merge(weight: Tensor, plan: TilePlan) -> Tensor:
    """:func:`~shiftwise.tiling.merge_tiles` with ops every exporter translates (no
    ``repeat_interleave``), on tensors that may hold no values: a scatter-add of initializers,
    which onnxruntime folds into one constant when it loads the file."""
    t, n, c = plan.num_tiles, plan.tile_size, plan.channels
    (kh, kw), (ph, pw) = plan.info.extent, plan.info.padding
    taps = torch.arange(n, device=weight.device) - n // 2
    channel = (torch.arange(t, device=weight.device)[:, None] >= plan.offsets[1:].long()[None, :]).sum(1)
    rows = plan.dy.long()[:, None] + taps + ph
    cols = plan.dx.long()[:, None] + taps + pw
    flat = (channel[:, None, None] * kh + rows[:, :, None]) * kw + cols[:, None, :]
    return weight.new_zeros(c * kh * kw).index_add(0, flat.reshape(-1), weight.reshape(-1)).view(c, kh, kw)


class _Layout:
    """The shiftwise form's index data for one plan (Python lists)."""

    def __init__(self, plan: TilePlan):
        off = plan.offsets.detach().cpu().tolist()
        dy, dx = plan.dy.detach().cpu().tolist(), plan.dx.detach().cpu().tolist()
        channel = [ch for ch in range(plan.channels) for _ in range(off[ch + 1] - off[ch])]
        # tiles ordered by position, so that each position's planes are one slice
        self.order = sorted(range(plan.num_tiles), key=lambda t: (dy[t], dx[t], channel[t]))
        self.groups: List[Tuple[int, int, int, int]] = []
        for i, t in enumerate(self.order):
            if self.groups and self.groups[-1][:2] == (dy[t], dx[t]):
                self.groups[-1] = self.groups[-1][:3] + (i + 1,)
            else:
                self.groups.append((dy[t], dx[t], i, i + 1))
        self.channel = [channel[t] for t in self.order]


# id(plan.info) -> (weak reference to the info, layout): the dynamo exporter traces a module's
# plan buffers as fake tensors, but its PlanInfo is the same object as in eager runs
_LAYOUTS: Dict[int, tuple] = {}


def _layout(plan: TilePlan) -> Optional[_Layout]:
    """The plan's layout; ``None`` when its tensors hold no values (fake tensors while the dynamo
    exporter traces) and no eager run of the same plan left one (:func:`remember`): then the
    layer is written by :func:`_traced_shiftwise`."""
    hit = _LAYOUTS.get(id(plan.info))
    if hit is not None and hit[0]() is plan.info:
        return hit[1]
    if torch.compiler.is_compiling():
        return None
    with _untraced():
        lay = _Layout(plan)
    if len(_LAYOUTS) > 4096:
        _LAYOUTS.clear()
    _LAYOUTS[id(plan.info)] = (weakref.ref(plan.info), lay)
    return lay


def remember(model: torch.nn.Module) -> None:
    """Note the tile positions of every shift-wise layer of ``model``, so that the dynamo
    exporter, which traces the plans' buffers without their values, writes the same graph as the
    TorchScript exporter. :func:`shiftwise.export.export_onnx` calls it."""
    for module in model.modules():
        plan = getattr(module, "plan", None)
        if isinstance(plan, TilePlan):
            _layout(plan)


def _window(shift: int, pad: int, n: int) -> slice:
    """Rows (or columns) of a conv output with padding ``pad`` that a tile at ``shift`` reads for
    outputs ``0 .. S - 1``: a constant start and a constant non-positive end, so that the slice
    needs no shape ops when the map size is dynamic."""
    start = pad + shift - n // 2
    end = shift + (n - 1 - n // 2) - pad
    return slice(start, end if end < 0 else None)


def shiftwise_graph(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as standard ops with no convolution larger than a tile: the input
    channels gathered once per tile, one grouped ``N x N`` convolution of the tiles (ordered by
    position, padded by the plan's reach), one slice per tile position, and the sum per channel
    as gathers and adds (:func:`_channel_sum`; a channel without tiles gives its bias). Exact:
    the same products and sums as the dense convolution, in another order.

    Example::

        >>> from shiftwise.tiling import split_kernel
        >>> k = torch.randn(4, 13, 5)
        >>> tiles, plan = split_kernel(k, 5)
        >>> x = torch.randn(1, 4, 16, 16)
        >>> torch.allclose(shiftwise_graph(x, tiles, plan), F.conv2d(x, k[:, None], padding=(6, 2), groups=4),
        ...                atol=1e-5)
        True
    """
    c, n = plan.channels, plan.tile_size
    if plan.num_tiles == 0:
        y = torch.zeros_like(x)
        return y + bias.view(1, c, 1, 1) if bias is not None else y
    info = plan.info
    lay = _layout(plan)
    pad = info.padding
    if lay is None:
        return _traced_shiftwise(x, weight, plan, bias)
    # onnxruntime runs a depthwise conv in its blocked layout only when the channels are a
    # multiple of the block (8 with AVX2, 16 with AVX-512): zero tiles fill the conv up to it
    extra = -plan.num_tiles % CONV_CHANNEL_MULTIPLE
    with _untraced():
        order = torch.tensor(lay.order, dtype=torch.long, device=weight.device)
        kernel = weight.detach().index_select(0, order)
        kernel = torch.cat([kernel, kernel.new_zeros(extra, n, n)]).unsqueeze(1).contiguous()
        tile_channel = torch.tensor(lay.channel + [0] * extra, dtype=torch.long, device=x.device)
    xg = x if lay.channel + [0] * extra == list(range(c)) else x.index_select(1, tile_channel)
    u = F.conv2d(xg, kernel, padding=pad, groups=plan.num_tiles + extra)
    sizes = [b - a for _, _, a, b in lay.groups] + ([extra] if extra else [])
    chunks = u.split(sizes, 1)  # one Split, not a slice per group
    parts = [chunk[:, :, _window(dy, pad[0], n), _window(dx, pad[1], n)]
             for chunk, (dy, dx, _, _) in zip(chunks, lay.groups)]
    y = _channel_sum(parts, lay.channel, c)
    return y + bias.view(1, c, 1, 1) if bias is not None else y


def _traced_shiftwise(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> Tensor:
    """:func:`shiftwise_graph` for a plan whose tensors hold no values (the dynamo exporter traces
    a module's buffers as fake tensors): the order of the tiles by position is traced (onnxruntime
    folds it when it loads the file) and the sum per channel is a scatter-add. The sizes come
    from the plan's :class:`~shiftwise.tiling.PlanInfo`, which holds Python values."""
    info = plan.info
    c, t, n = plan.channels, plan.num_tiles, plan.tile_size
    pad = info.padding
    extra = -t % CONV_CHANNEL_MULTIPLE
    dy, dx = plan.dy.long(), plan.dx.long()
    span = info.reach_x[1] - info.reach_x[0] + 1
    # positions sort as info.positions does (by dy, then dx), so its counts size the groups
    index = torch.arange(t, device=x.device)
    order = torch.sort(((dy - info.reach_y[0]) * span + (dx - info.reach_x[0])) * t + index).indices  # keys unique
    channel = (index[:, None] >= plan.offsets[1:].long()[None, :]).sum(1)
    channel = channel.index_select(0, order)
    kernel = weight.index_select(0, order)
    kernel = torch.cat([kernel, kernel.new_zeros(extra, n, n)]).unsqueeze(1)
    xg = x.index_select(1, torch.cat([channel, channel.new_zeros(extra)]))
    u = F.conv2d(xg, kernel, padding=pad, groups=t + extra)
    chunks = u.split([k for _, _, k in info.positions] + ([extra] if extra else []), 1)
    s = torch.cat([chunk[:, :, _window(py, pad[0], n), _window(px, pad[1], n)]
                   for chunk, (py, px, _) in zip(chunks, info.positions)], 1)
    y = torch.zeros_like(x).index_add(1, channel, s)
    return y + bias.view(1, c, 1, 1) if bias is not None else y


def _channel_sum(parts: List[Tensor], channel: Sequence[int], channels: int) -> Tensor:
    """``y[:, c] = sum of s[:, e] over e with channel[e] == c`` (zero for a channel with none),
    ``s`` the planes of ``parts`` concatenated.

    Channels are ranked by plane count (most first); slot ``k`` gathers the ``k``-th plane of the
    ``C_k`` channels holding more than ``k`` (so every plane is gathered once) and is added to
    the first ``C_k`` channels of the running sum, whose other channels are final and set
    aside; one concatenation and one gather put the channels back in order (channels without
    planes read a zero plane)."""
    per: Dict[int, List[int]] = {}
    for e, ch in enumerate(channel):
        per.setdefault(ch, []).append(e)
    ranked = sorted(per, key=lambda ch: (-len(per[ch]), ch))
    s = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    y, done, size = None, [], 0  # sizes as Python ints: traced sizes would add shape ops
    for slot in range(len(per[ranked[0]])):
        index = [per[ch][slot] for ch in ranked if len(per[ch]) > slot]
        part = s if index == list(range(len(channel))) else s.index_select(1, _constant_index(index, s.device))
        if y is not None and size > len(index):
            y, rest = y.split([len(index), size - len(index)], 1)
            done.append(rest)
        y, size = (part if y is None else y + part), len(index)
    pieces = [y] + done[::-1]
    if len(ranked) < channels:
        pieces.append(torch.zeros_like(y[:, :1]))  # read by every channel without planes
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
    if ranked != list(range(channels)):
        rank = {ch: i for i, ch in enumerate(ranked)}
        y = y.index_select(1, _constant_index([rank.get(ch, len(ranked)) for ch in range(channels)], y.device))
    return y


def _constant_index(values: Sequence[int], device) -> Tensor:
    with _untraced():
        return torch.tensor(values, dtype=torch.long, device=device)


def plane_graph(planes: Tensor, plan: ShiftAddPlan, output_size: Tuple[int, int]) -> Tensor:
    """:func:`shiftwise.functional.plane_shift_add` as standard ops: per shift, the planes it reads
    (a gather) and their window (a slice with constant bounds on the zero-padded planes), then the
    sum per output channel as in :func:`shiftwise_graph`. ``planes.shape[-2:] - output_size`` is
    taken as fixed when the map size is dynamic (the planes come from a padded conv)."""
    b, _, hu, wu = planes.shape
    h, w = _hint(output_size[0]), _hint(output_size[1])
    hu, wu = _hint(hu), _hint(wu)
    if plan.num_entries == 0:
        return planes.new_zeros(b, plan.num_outputs, output_size[0], output_size[1])
    dys = [g[0] for g in plan.shift_groups]
    dxs = [g[1] for g in plan.shift_groups]
    top, left = max(0, -min(dys)), max(0, -min(dxs))
    bottom, right = max(0, max(dys) + h - hu), max(0, max(dxs) + w - wu)
    padded = F.pad(planes, (left, right, top, bottom)) if top or bottom or left or right else planes
    with _untraced():
        shift_plane = plan.shift_plane.detach().cpu().tolist()
        shift_out = plan.shift_out.detach().cpu().tolist()
    parts = []
    for dy, dx, a, bnd in plan.shift_groups:
        with _untraced():
            idx = torch.tensor(shift_plane[a:bnd], dtype=torch.long, device=planes.device)
        rows = slice(top + dy, (dy + h - hu - bottom) or None)
        cols = slice(left + dx, (dx + w - wu - right) or None)
        parts.append(padded.index_select(1, idx)[:, :, rows, cols])
    return _channel_sum(parts, shift_out, plan.num_outputs)
