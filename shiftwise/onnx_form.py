"""The forms a shift-wise conv takes in an exported graph, and the rule that picks one.

Under ``torch.onnx.export`` (either exporter) :func:`shiftwise.functional.shiftwise_conv2d`
does not call its custom ops: it calls :func:`export_graph`, which writes the layer with
standard torch ops that every exporter translates to standard ONNX operators:

* ``"dense"`` (:func:`dense_graph`): one depthwise convolution of the merged kernel;
* ``"shiftwise"`` (:func:`shiftwise_graph`): the tiles as depthwise ``N x N`` convolutions of
  blocks of channels, their shifts as row gathers on the input and the sum per channel as adds;
  no convolution larger than a tile is left in the graph.

:func:`choose` is the default rule (measured in onnxruntime by ``benchmarks/onnx_forms.py``);
:func:`forced` overrides it while a model is exported and :func:`recording` lists the form
each layer got. The rule lives at the functional level rather than as a symbolic function
of the custom ops because both forms are built from the plan, which is Python data.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import cropped_extent
from .tiling import ShiftAddPlan, TilePlan, merge_tiles

FORMS = ("auto", "dense", "shiftwise")
# onnxruntime runs a depthwise conv in its blocked channel layout (8 channels a block with AVX2,
# 16 with AVX-512) only when the channels are a multiple of the block: the shiftwise form's
# convs are cut into blocks of BLOCK_CHANNELS channels (8: fewer zero tiles than 16); the
# fallback for plans without values pads its one conv to CONV_CHANNEL_MULTIPLE
BLOCK_CHANNELS = 8
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
# compute-bound), the shiftwise form's with the tile planes per channel (each is one more
# gathered input and one more N x N conv per channel). The shiftwise form is chosen when a
# channel's planes are at most SHIFTWISE_MAX_PLANES_PER_TAP times the dense kernel's taps inside
# the map. benchmarks/onnx_forms.py --fit on benchmarks/results/onnx-forms-cpu2-ort1.32.0.jsonl:
# any constant between 0.0268 and 0.0309 gives the least total time of its picks, with the
# faster form in 48 of 50 layers (47 of 50 in sessions whose threads do not spin); the misses are
# layers within 1.5x of each other, most on 14 x 14 maps (docs/deployment.md).
SHIFTWISE_MAX_PLANES_PER_TAP = 0.028


def choose(plan: TilePlan, height: int, width: int) -> Tuple[str, str]:
    """``(form, reason)``: the ONNX form the rule gives a layer of ``plan`` on ``height x width``
    maps, ``"dense"`` or ``"shiftwise"``, and a short phrase saying why. Deterministic: from the
    plan's geometry and the map size only.

    Example::

        >>> from shiftwise.tiling import TilePlan
        >>> choose(TilePlan.grid(4, (13, 13), 3), 7, 7)
        ('dense', '25 tile planes per channel against 49 dense taps (shiftwise at most 1.4)')
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


class _Conv(NamedTuple):
    """One depthwise convolution of the shiftwise form: rows ``start:stop`` of its mode's index
    table (one per conv channel), the tile each conv channel applies (``num_tiles`` for a zero
    tile) and the bias entry of each (``channels`` for none)."""
    start: int
    stop: int
    tiles: List[int]
    bias: List[int]


class _Group(NamedTuple):
    """Tiles sharing one column offset (``mode == "rows"``: their rows are gathered from the
    input) or one row offset (``"columns"``: the same on the transposed maps). ``blocks``: per
    run of channel blocks with the same tile count, its convolutions (one per slot), summed;
    ``inverse``: the position of each channel in the concatenated block outputs (``size`` for a
    channel the group gives nothing and that has no zero dummy to read: a zero plane)."""
    mode: str
    shift: int
    blocks: List[List[_Conv]]
    size: int
    inverse: List[int]


def _cover(dy: Sequence[int], dx: Sequence[int]) -> List[Tuple[str, int, List[int]]]:
    """Tiles partitioned into groups that share a column offset (``"rows"``) or a row offset
    (``"columns"``), chosen greedily: each time the offset holding most of the tiles left (ties:
    rows first, then the smallest shift). SLaK's 51 x 5 + 5 x 51 + 5 x 5 gives two groups."""
    left = set(range(len(dy)))
    groups = []
    while left:
        count: Dict[Tuple[int, int, int], int] = {}
        for t in left:
            count[(0, abs(dx[t]), dx[t])] = count.get((0, abs(dx[t]), dx[t]), 0) + 1
            count[(1, abs(dy[t]), dy[t])] = count.get((1, abs(dy[t]), dy[t]), 0) + 1
        mode, _, shift = min(count, key=lambda key: (-count[key], key))
        tiles = sorted(t for t in left if (dx[t] if mode == 0 else dy[t]) == shift)
        groups.append(("rows" if mode == 0 else "columns", shift, tiles))
        left.difference_update(tiles)
    return groups


class _Layout:
    """The shiftwise form's structure for one plan (Python values only, so that it can be kept
    for the dynamo exporter, which traces the plan's buffers without their values).

    Per group of :func:`_cover`, the channels holding its tiles (every channel in the first
    group, which carries the bias) are ranked by tile count (most first), padded with zero
    dummies to a multiple of ``BLOCK_CHANNELS`` and cut into blocks of that many channels; a
    block's slot count is the largest tile count in it (at least 1) and consecutive blocks with
    the same count are convolved together: per slot, one depthwise convolution whose channel
    ``p`` holds the slot's tile of channel ``p`` (a zero tile where it has none), its input rows
    gathered at that tile's offset along the group's axis."""

    def __init__(self, plan: TilePlan):
        if plan.info.tile_lists is not None:  # read when the plan was made: valid under any exporter
            off, dy, dx = (list(v) for v in plan.info.tile_lists)
        else:
            off = plan.offsets.detach().cpu().tolist()
            dy, dx = plan.dy.detach().cpu().tolist(), plan.dx.detach().cpu().tolist()
        c, t = plan.channels, plan.num_tiles
        channel = [ch for ch in range(c) for _ in range(off[ch + 1] - off[ch])]
        # per mode, the index table's rows: the channel read and the offset along the gathered axis
        self.table: Dict[str, Tuple[List[int], List[int]]] = {"rows": ([], []), "columns": ([], [])}
        self.groups: List[_Group] = []
        for number, (mode, shift, tiles) in enumerate(_cover(dy, dx)):
            along = dy if mode == "rows" else dx
            per: Dict[int, List[int]] = {ch: [] for ch in range(c)} if number == 0 else {}
            for i in sorted(tiles, key=lambda i: (along[i], i)):
                per.setdefault(channel[i], []).append(i)
            ranked: List[Optional[int]] = sorted(per, key=lambda ch: (-len(per[ch]), ch))
            ranked += [None] * (-len(ranked) % BLOCK_CHANNELS)
            runs: List[Tuple[int, List[Optional[int]]]] = []
            for b in range(0, len(ranked), BLOCK_CHANNELS):
                block = ranked[b:b + BLOCK_CHANNELS]
                k = max([1] + [len(per[ch]) for ch in block if ch is not None])
                if runs and runs[-1][0] == k:
                    runs[-1][1].extend(block)
                else:
                    runs.append((k, list(block)))
            chans, offsets = self.table[mode]
            blocks = []
            for k, members in runs:
                convs = []
                for slot in range(k):
                    picked = [per[ch][slot] if ch is not None and slot < len(per[ch]) else None for ch in members]
                    start = len(chans)
                    chans.extend(-1 if ch is None else ch for ch in members)  # dummies read the zero row
                    offsets.extend(0 if i is None else along[i] for i in picked)
                    convs.append(_Conv(start, len(chans), [t if i is None else i for i in picked],
                                       [ch if slot == 0 and number == 0 and ch is not None else c for ch in members]))
                blocks.append(convs)
            position = {ch: p for p, ch in enumerate(ranked) if ch is not None}
            zero = ranked.index(None) if None in ranked else len(ranked)
            self.groups.append(_Group(mode, shift, blocks, len(ranked), [position.get(ch, zero) for ch in range(c)]))


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
    if plan.info.tile_lists is None and torch.compiler.is_compiling():
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


def _shift_columns(x: Tensor, shift: int, n: int) -> Tensor:
    """Columns ``shift - n // 2 .. W - 1 + shift + n // 2`` of ``x`` (zero outside the map): what
    an ``n``-wide convolution without padding reads for outputs ``0 .. W - 1`` of tiles at column
    offset ``shift``. A pad and a slice with constant bounds, right for any width."""
    left, right = n // 2 - shift, n // 2 + shift
    x = F.pad(x, (max(left, 0), max(right, 0)))
    return x[..., max(-left, 0):right if right < 0 else None]


def shiftwise_graph(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as standard ops with no convolution larger than a tile.

    The tiles are grouped by a shared column offset (or a shared row offset, on the transposed
    maps; :func:`_cover`) and, within a group, channels are ranked by tile count and cut into
    blocks (:class:`_Layout`). Each depthwise ``N x N`` convolution convolves one tile per
    channel of a run of blocks, on rows gathered at that tile's row offset from the input
    flattened to ``(B, C * H, W)`` with one zero row appended (rows outside the map read it): its
    output needs no slicing. A run's convolutions are summed with adds, the runs concatenated,
    one gather puts the channels back in order, and the groups are added. Exact: the same
    products and sums as the dense convolution, in another order.

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
    lay = _layout(plan)
    if lay is None:
        return _traced_shiftwise(x, weight, plan, bias)
    with _untraced():  # constants under TorchScript; traced on initializers (folded) under dynamo
        tiles = torch.cat([weight.detach(), weight.new_zeros(1, n, n)])
        biases = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(1)])
        tables = {mode: (torch.tensor(chans, dtype=torch.long, device=x.device)[:, None],
                         torch.tensor(offsets, dtype=torch.long, device=x.device)[:, None] - n // 2)
                  for mode, (chans, offsets) in lay.table.items() if chans}
    y = None
    indices: Dict[str, Tensor] = {}
    for group in lay.groups:
        xm = x if group.mode == "rows" else x.transpose(2, 3)
        b, _, h, _ = xm.shape
        rows = h + n - 1
        if group.mode not in indices:
            # gathered row r of table row i: input row offset_i - n // 2 + r of channel chan_i, or
            # the zero row C * H outside the map and for dummy channels (chan_i = -1); one table
            # for all of the mode's convs
            chans, offsets = tables[group.mode]
            r = offsets + torch.arange(rows, device=x.device)[None, :]
            indices[group.mode] = torch.where((r >= 0) & (r < h) & (chans >= 0), chans * h + r, c * h)
        index = indices[group.mode]
        # the column offset: the conv's padding, or the input's columns shifted by a pad and a slice
        xs = xm if group.shift == 0 else _shift_columns(xm, group.shift, n)
        flat = torch.cat([xs.reshape(b, c * h, -1), xs.new_zeros(b, 1, xs.shape[-1])], 1)
        outs = []
        for convs in group.blocks:
            acc = None
            for conv in convs:
                with _untraced():
                    kernel = tiles.index_select(0, _constant_index(conv.tiles, x.device))
                    kernel = (kernel if group.mode == "rows" else kernel.transpose(1, 2)).unsqueeze(1).contiguous()
                    bias_part = None if biases is None or all(i == c for i in conv.bias) else \
                        biases.index_select(0, _constant_index(conv.bias, x.device))
                g = flat[:, index[conv.start:conv.stop]]  # one Gather: (B, size, rows, W)
                part = F.conv2d(g, kernel, bias_part, padding=(0, n // 2 if group.shift == 0 else 0), groups=conv.stop - conv.start)
                # onnxruntime fuses an add into the convolution before it only when it knows both
                # shapes: rows gathered by an index computed from the traced height have a length
                # it does not know, so these adds stay separate nodes (about 10 % of the time)
                acc = part if acc is None else acc + part
            outs.append(acc)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        if group.size in group.inverse:
            out = torch.cat([out, torch.zeros_like(out[:, :1])], 1)
        if group.inverse != list(range(group.size)):
            out = out.index_select(1, _constant_index(group.inverse, x.device))
        out = out if group.mode == "rows" else out.transpose(2, 3)
        y = out if y is None else y + out
    return y


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
