"""Tile plans: which small ``N x N`` kernels a shift-wise conv holds, and where they sit.

A plan lists tiles grouped by channel (CSR ``offsets``: channel ``c`` owns tiles
``offsets[c]:offsets[c+1]``) with the offset ``(dy, dx)`` of each tile's centre from the
large kernel's centre. With tile weights ``w`` of shape ``(T, N, N)`` the layer computes::

    y[b,c,h,w] = bias[c] + sum_{t in c} sum_{i,j<N} w[t,i,j] * x[b,c, h+dy_t+i-N//2, w+dx_t+j-N//2]

This module splits dense kernels into tiles (single or multi-branch, with BatchNorm folded),
merges tiles back, and chooses the layout with the fewest tiles.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

LAYOUTS = ("auto", "centered", "compact")


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """Python-side geometry of a plan, computed once so forward passes never sync."""

    channels: int
    num_tiles: int
    tile_size: int
    # rows/cols of the input each output pixel reaches, relative to itself: [lo, hi]
    reach_y: Tuple[int, int]
    reach_x: Tuple[int, int]
    uniform: Optional[int]  # tiles per channel if every channel has the same count
    # ((dy, dx, count), ...): how many tiles sit at each position, sorted; feeds cost estimates
    positions: Tuple[Tuple[int, int, int], ...] = ()
    # (offsets, dy, dx) as Python ints: the plan's tiles where its tensors cannot be read (an
    # exporter tracing them as fake tensors); not part of the info's identity
    tile_lists: Optional[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]] = dataclasses.field(
        default=None, compare=False, hash=False, repr=False)

    @property
    def plane_layout(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """``((pad_h, pad_w), (oy, ox))`` of the decomposed path's per-tile planes: its small convs
        run with padding ``(pad_h, pad_w)`` and tile ``t`` reads its plane at row ``h + dy[t] + oy``
        and column ``w + dx[t] + ox`` for output ``(h, w)`` (zero beyond the plane).

        "Full" padding ``N - 1`` keeps every position whose window touches the input (an
        ``(H + N - 1) x (W + N - 1)`` plane, tile windows starting at ``dy + N - 1 - N // 2``);
        rows and columns that no tile's window reaches, on both sides, are cropped (the padding
        lowered by as much, the same on both sides so that the conv's padding stays symmetric):
        centred tall strips (every ``dx`` 0, ``N`` odd) read exactly ``W`` columns, so their
        planes are ``W`` wide and their rows start at the window. A tile's window ``[s, s + S)`` clipped to the plane ``[0, S + N - 1)``
        stays clear of ``a`` positions on each side iff ``a <= max(s, 0)`` and
        ``a <= max(N - 1 - s, 0)``."""
        n = self.tile_size
        if self.num_tiles == 0:
            return (n - 1, n - 1), (n - 1 - n // 2, n - 1 - n // 2)
        # window starts s = d + N - 1 - N // 2: min over tiles reach[0] + N - 1, max reach[1]
        ay, ax = (min(max(r[0] + n - 1, 0), max(n - 1 - r[1], 0)) for r in (self.reach_y, self.reach_x))
        return (n - 1 - ay, n - 1 - ax), (n - 1 - n // 2 - ay, n - 1 - n // 2 - ax)

    @property
    def padding(self) -> Tuple[int, int]:
        """Symmetric ``(pad_h, pad_w)`` under which every tile's small conv is a valid conv."""
        return (max(0, -self.reach_y[0], self.reach_y[1]), max(0, -self.reach_x[0], self.reach_x[1]))

    @property
    def extent(self) -> Tuple[int, int]:
        """Smallest odd, centred dense kernel ``(KH, KW)`` that holds every tile."""
        ph, pw = self.padding
        return (2 * ph + 1, 2 * pw + 1)

    def tile_taps(self, height: int, width: int) -> float:
        """Tile taps that land inside an ``height x width`` input, per output pixel (mean over
        pixels and channels): the multiply-adds a kernel that skips the zero padding does."""
        if torch.compiler.is_compiling():  # sizes may be symbolic: traced arithmetic, guarded
            return _count_tile_taps(self, height, width)
        return _tile_taps(self, int(height), int(width))

    def dense_taps(self, height: int, width: int, extent: Optional[Tuple[int, int]] = None) -> float:
        """The same for a dense centred kernel of size ``extent`` (default: the plan's extent;
        a depthwise conv of the merged kernel)."""
        kh, kw = self.extent if extent is None else extent
        return _mean_inside(-(kh // 2), kh, height) * _mean_inside(-(kw // 2), kw, width)


def _mean_inside(first: int, k: int, size: int) -> float:
    """Mean over ``p in [0, size)`` of how many of ``p + first ... p + first + k - 1`` lie in ``[0, size)``."""
    if size <= 0:
        return 0.0
    # offset j of the window lies inside for size - |j| of the positions (none when |j| >= size)
    return sum(max(0, size - abs(j)) for j in range(first, first + k)) / size


_TAPS: dict = {}  # (info, height, width) -> tile taps; PlanInfo is frozen and hashable


def _tile_taps(info: "PlanInfo", height: int, width: int) -> float:
    key = (info, height, width)
    if key not in _TAPS:
        if len(_TAPS) > 4096:
            _TAPS.clear()
        _TAPS[key] = _count_tile_taps(info, height, width)
    return _TAPS[key]


def _count_tile_taps(info: "PlanInfo", height: int, width: int) -> float:
    n, o = info.tile_size, -(info.tile_size // 2)
    rows = {d: _mean_inside(d + o, n, height) for d in {p[0] for p in info.positions}}
    cols = {d: _mean_inside(d + o, n, width) for d in {p[1] for p in info.positions}}
    total = sum(rows[dy] * cols[dx] * k for dy, dx, k in info.positions)
    return total / max(1, info.channels)


class TilePlan:
    """Tile positions of a shift-wise conv, grouped by channel.

    Args:
        offsets: int32 ``(C + 1,)``, non-decreasing, ``offsets[0] == 0``: channel ``c`` owns
            tiles ``offsets[c]:offsets[c+1]``.
        dy, dx: int32 ``(T,)`` offsets of each tile's centre from the kernel centre.
        tile_size: ``N``, the side of every tile.
        info: precomputed :class:`PlanInfo` (computed from the tensors when omitted).

    Example::

        >>> plan = TilePlan.grid(channels=4, kernel_size=(51, 5), tile_size=5)
        >>> plan.num_tiles, plan.info.uniform
        (44, 11)
    """

    def __init__(self, offsets: Tensor, dy: Tensor, dx: Tensor, tile_size: int, info: Optional[PlanInfo] = None):
        self.offsets = offsets
        self.dy = dy
        self.dx = dx
        self.tile_size = int(tile_size)
        self.info = info if info is not None else self._compute_info()

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_lists(cls, per_channel: Sequence[Sequence[Tuple[int, int]]], tile_size: int,
                   device: Optional[torch.device] = None) -> "TilePlan":
        """Build a plan from, for each channel, its list of ``(dy, dx)`` tile positions."""
        counts = [len(p) for p in per_channel]
        offsets = torch.zeros(len(per_channel) + 1, dtype=torch.int32, device="cpu")
        if counts:
            offsets[1:] = torch.tensor(counts, dtype=torch.int64, device="cpu").cumsum(0).to(torch.int32)
        flat = [pos for p in per_channel for pos in p]
        dy = torch.tensor([p[0] for p in flat], dtype=torch.int32, device="cpu")
        dx = torch.tensor([p[1] for p in flat], dtype=torch.int32, device="cpu")
        return cls(offsets, dy, dx, tile_size).to(device) if device is not None else cls(offsets, dy, dx, tile_size)

    @classmethod
    def uniform(cls, channels: int, positions: Sequence[Tuple[int, int]], tile_size: int) -> "TilePlan":
        """Every channel holds the same tiles at ``positions`` (built on the CPU, whatever the default device)."""
        _check_tile_size(tile_size)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        k = len(positions)
        check_memory(channels * k * (tile_size * tile_size * 4 + 12),
                     f"{channels} channels x {k} tiles of {tile_size}x{tile_size}",
                     "use a smaller kernel_size or a larger small_kernel")
        offsets = torch.arange(channels + 1, dtype=torch.int32, device="cpu") * k
        dy = torch.tensor([p[0] for p in positions], dtype=torch.int32, device="cpu").repeat(channels)
        dx = torch.tensor([p[1] for p in positions], dtype=torch.int32, device="cpu").repeat(channels)
        return cls(offsets, dy, dx, tile_size)

    @classmethod
    def grid(cls, channels: int, kernel_size, tile_size: int, layout: str = "auto") -> "TilePlan":
        """The plan that covers a dense ``kernel_size`` kernel in every channel."""
        kh, kw = _pair(kernel_size, "kernel_size")
        my, mx = choose_layout([(kh, kw)], tile_size, layout)[0]
        ys, xs = axis_grid(kh, tile_size, my), axis_grid(kw, tile_size, mx)
        check_memory(channels * len(ys) * len(xs) * (tile_size * tile_size * 4 + 12),
                     f"{channels} channels x {len(ys) * len(xs)} tiles of {tile_size}x{tile_size}",
                     "use a smaller kernel_size or a larger small_kernel")
        return cls.uniform(channels, list(itertools.product(ys, xs)), tile_size)

    def _compute_info(self) -> PlanInfo:
        _check_tile_size(self.tile_size)
        off = self.offsets.detach().to("cpu", torch.int64)
        dy = self.dy.detach().to("cpu", torch.int64)
        dx = self.dx.detach().to("cpu", torch.int64)
        if off.dim() != 1 or off.numel() < 2:
            raise ValueError(f"plan offsets must be 1-D of length channels+1 >= 2, got shape {tuple(off.shape)}")
        if int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()):
            raise ValueError("plan offsets must start at 0 and be non-decreasing")
        if dy.shape != dx.shape or dy.dim() != 1 or dy.numel() != int(off[-1]):
            raise ValueError(f"plan dy/dx must be 1-D of length offsets[-1]={int(off[-1])}, "
                             f"got {tuple(dy.shape)} and {tuple(dx.shape)}")
        n = self.tile_size
        lo, hi = -(n // 2), n - 1 - n // 2
        if dy.numel():
            reach_y = (int(dy.min()) + lo, int(dy.max()) + hi)
            reach_x = (int(dx.min()) + lo, int(dx.max()) + hi)
        else:
            reach_y = reach_x = (0, 0)
        counts = off[1:] - off[:-1]
        uniform = int(counts[0]) if bool((counts == counts[0]).all()) else None
        positions: Tuple[Tuple[int, int, int], ...] = ()
        if dy.numel():
            pos, num = torch.unique(torch.stack([dy, dx], 1), dim=0, return_counts=True)
            positions = tuple((int(a), int(b), int(k)) for (a, b), k in zip(pos.tolist(), num.tolist()))
        lists = (tuple(off.tolist()), tuple(dy.tolist()), tuple(dx.tolist()))
        return PlanInfo(off.numel() - 1, int(dy.numel()), n, reach_y, reach_x, uniform, positions, lists)

    # accessors ----------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def num_tiles(self) -> int:
        return self.info.num_tiles

    def counts(self) -> Tensor:
        """Tiles per channel, int64 ``(C,)``."""
        return (self.offsets[1:] - self.offsets[:-1]).long()

    def tile_channel(self) -> Tensor:
        """Owning channel of every tile, int32 ``(T,)`` (computed once per plan object, outside
        ``torch.compile``; 29 us per call for SLaK-T stage 3's 10479 tiles)."""
        if torch.compiler.is_compiling():
            return self._tile_channel()
        if "_tile_channel_cache" not in self.__dict__:
            self.__dict__["_tile_channel_cache"] = self._tile_channel()
        return self.__dict__["_tile_channel_cache"]

    def _tile_channel(self) -> Tensor:
        c = torch.arange(self.channels, device=self.offsets.device)
        return torch.repeat_interleave(c, self.counts(), output_size=self.num_tiles).to(torch.int32)

    def to(self, device) -> "TilePlan":
        """The plan on ``device`` (``self`` when it is already there)."""
        if device is None or self.offsets.device == torch.device(device):
            return self
        return TilePlan(self.offsets.to(device), self.dy.to(device), self.dx.to(device), self.tile_size, self.info)

    def positions(self) -> list:
        """For each channel, its list of ``(dy, dx)``."""
        off = self.offsets.tolist()
        dy, dx = self.dy.tolist(), self.dx.tolist()
        return [list(zip(dy[a:b], dx[a:b])) for a, b in zip(off[:-1], off[1:])]

    def select(self, keep: Tensor) -> "TilePlan":
        """The plan of the tiles where the boolean ``keep`` ``(T,)`` is true (order kept)."""
        keep = keep.to(torch.bool)
        if keep.shape != (self.num_tiles,):
            raise ValueError(f"keep must have shape ({self.num_tiles},), got {tuple(keep.shape)}")
        tc = self.tile_channel().long()
        counts = torch.zeros(self.channels, dtype=torch.int64, device=keep.device)
        counts.index_add_(0, tc.to(keep.device), keep.long())
        offsets = torch.zeros(self.channels + 1, dtype=torch.int32, device=self.offsets.device)
        offsets[1:] = counts.cumsum(0).to(torch.int32).to(self.offsets.device)
        return TilePlan(offsets, self.dy[keep], self.dx[keep], self.tile_size)

    def live(self, height: int, width: int) -> Tuple[Optional[Tensor], "TilePlan"]:
        """``(index, plan)`` of the tiles that reach a ``height x width`` input: a tile whose
        window lies wholly in the zero padding for every output pixel (a kernel wider than the
        map, e.g. SLaK's 47-long strips on 14 x 14 maps) adds exactly nothing. ``(None, self)``
        when every tile reaches the input (decided from :attr:`info`, no device sync). The
        answer is cached per size (the plan's tensors are not expected to change in place)."""
        h, w = int(height), int(width)
        cache = self.__dict__.setdefault("_live", {})
        if (h, w) not in cache:
            # a tile reaches the map iff its window offsets dy + o .. dy + o + n - 1 (relative to
            # the output pixel) hold one j with |j| < h, i.e. lo - h <= dy <= h - 1 - o; same for x
            n, o = self.tile_size, -(self.tile_size // 2)
            lo, hi_y, hi_x = 2 - n - o, h - 1 - o, w - 1 - o
            if all(lo - h <= dy <= hi_y and lo - w <= dx <= hi_x for dy, dx, _ in self.info.positions):
                cache[(h, w)] = (None, self)
            else:
                keep = (self.dy >= lo - h) & (self.dy <= hi_y) & (self.dx >= lo - w) & (self.dx <= hi_x)
                if len(cache) >= 8:
                    cache.clear()
                cache[(h, w)] = (keep.nonzero().squeeze(1), self.select(keep))
        return cache[(h, w)]

    def __eq__(self, other) -> bool:
        return (isinstance(other, TilePlan) and self.tile_size == other.tile_size
                and torch.equal(self.offsets.cpu(), other.offsets.cpu())
                and torch.equal(self.dy.cpu(), other.dy.cpu()) and torch.equal(self.dx.cpu(), other.dx.cpu()))

    def __repr__(self) -> str:
        per = f"{self.info.uniform}/channel" if self.info.uniform is not None else "variable"
        return (f"TilePlan(channels={self.channels}, tiles={self.num_tiles} ({per}), tile_size={self.tile_size}, "
                f"extent={self.info.extent})")


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, anything larger than this machine's physical memory."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: fall back to 1 TiB
        limit = 1 << 40
    if nbytes > limit:
        raise MemoryError(f"{what} needs about {nbytes / 2**30:.1f} GiB, more than this machine's "
                          f"{limit / 2**30:.1f} GiB of memory; {fix}")


# geometry -----------------------------------------------------------------------------------
def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return v


def _check_tile_size(n) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"tile size (small_kernel) must be a positive int, got {n!r}")


def axis_grid(k: int, n: int, mode: str) -> list:
    """Tile-centre offsets along one axis that cover a centred kernel of length ``k``.

    ``"centered"`` puts a tile on the kernel centre (offsets are multiples of ``n``) so that a
    small kernel merges into it; ``"compact"`` uses ``ceil(k/n)`` tiles embedded symmetrically
    (one fewer tile when ``ceil(k/n)`` is even).
    """
    _check_tile_size(n)
    lo_k, hi_k = -(k // 2), k - 1 - k // 2  # rows the kernel covers
    lo_n, hi_n = -(n // 2), n - 1 - n // 2  # rows a tile covers around its centre
    if mode == "centered":
        j_lo = max(0, math.ceil((lo_n - lo_k) / n))
        j_hi = max(0, math.ceil((hi_k - hi_n) / n))
        return [j * n for j in range(-j_lo, j_hi + 1)]
    if mode == "compact":
        count = math.ceil(k / n)
        o = (count * n - k) // 2  # where the kernel starts inside the embedding
        return [p * n + n // 2 - o - k // 2 for p in range(count)]
    raise ValueError(f"unknown axis layout {mode!r}; expected 'centered' or 'compact'")


def choose_layout(shapes: Sequence[Tuple[int, int]], tile_size: int, layout: str = "auto") -> list:
    """Per branch ``(mode_y, mode_x)`` that gives the fewest distinct tiles when branches merge.

    Ties go to ``"centered"`` (its tiles line up across branches and with the small kernel).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return [(layout, layout)] * len(shapes)
    if len(shapes) == 1:  # one branch: the axes are independent
        return [tuple(min(_dedupe_modes(k, tile_size), key=lambda m: len(axis_grid(k, tile_size, m)))
                      for k in shapes[0])]
    options = []
    for kh, kw in shapes:
        ys = _dedupe_modes(kh, tile_size)
        xs = _dedupe_modes(kw, tile_size)
        options.append([(my, mx) for my in ys for mx in xs])
    best, best_key = None, None
    for combo in itertools.product(*options):
        union = set()
        for (kh, kw), (my, mx) in zip(shapes, combo):
            union.update(itertools.product(axis_grid(kh, tile_size, my), axis_grid(kw, tile_size, mx)))
        key = (len(union), sum(m != "centered" for pair in combo for m in pair))
        if best_key is None or key < best_key:
            best, best_key = list(combo), key
    return best


def _dedupe_modes(k: int, n: int) -> list:
    c = axis_grid(k, n, "centered")
    return ["centered"] if axis_grid(k, n, "compact") == c else ["centered", "compact"]


# split / merge --------------------------------------------------------------------------------
def _as_kernel(weight: Tensor, name: str = "weight") -> Tensor:
    if weight.dim() == 4 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 3:
        raise ValueError(f"{name} must be a depthwise kernel (C, KH, KW) or (C, 1, KH, KW), got {tuple(weight.shape)}")
    return weight


def _tile_index(plan: TilePlan, kh: int, kw: int):
    """Flat indices into a ``(C, KH, KW)`` centred kernel of every tile element, and validity."""
    n = plan.tile_size
    dev = plan.dy.device
    i = torch.arange(n, device=dev)
    rows = plan.dy.long()[:, None] + i[None, :] - n // 2 + kh // 2  # (T, N)
    cols = plan.dx.long()[:, None] + i[None, :] - n // 2 + kw // 2
    valid = ((rows >= 0) & (rows < kh))[:, :, None] & ((cols >= 0) & (cols < kw))[:, None, :]
    ch = plan.tile_channel().long()[:, None, None]
    flat = (ch * kh + rows.clamp(0, kh - 1)[:, :, None]) * kw + cols.clamp(0, kw - 1)[:, None, :]
    return flat, valid


def extract_tiles(weight: Tensor, plan: TilePlan) -> Tensor:
    """Read the tiles of ``plan`` out of a centred dense kernel ``(C, KH, KW)``; zero outside it.

    Exact (a gather). Kernel entries that no tile covers are not represented, so check with
    :func:`merge_tiles` when the plan may not cover the kernel.
    """
    weight = _as_kernel(weight)
    c, kh, kw = weight.shape
    if c != plan.channels:
        raise ValueError(f"kernel has {c} channels but the plan has {plan.channels}")
    flat, valid = _tile_index(plan.to(weight.device), kh, kw)
    tiles = weight.reshape(-1)[flat]
    return tiles * valid.to(tiles.dtype) if not bool(valid.all()) else tiles


def merge_tiles(tiles: Tensor, plan: TilePlan, kernel_size=None) -> Tensor:
    """Sum the tiles into the dense centred kernel ``(C, KH, KW)`` they compute (differentiable).

    ``kernel_size`` defaults to the plan's extent; a smaller one is refused if a non-zero tile
    entry would fall outside it.
    """
    _check_tiles(tiles, plan)
    kh, kw = _pair(kernel_size, "kernel_size") if kernel_size is not None else plan.info.extent
    flat, valid = _tile_index(plan.to(tiles.device), kh, kw)
    vals = tiles
    # the extent holds every tile by definition: no check, so no sync (and no graph break)
    if (kh, kw) != plan.info.extent and not bool(valid.all()):
        outside = tiles.detach()[~valid]
        if bool((outside != 0).any()):
            raise ValueError(f"non-zero tile entries fall outside kernel_size {(kh, kw)}; "
                             f"use kernel_size >= {plan.info.extent}")
        vals = tiles * valid.to(tiles.dtype)
    out = tiles.new_zeros(plan.channels * kh * kw)
    out = out.index_add(0, flat.reshape(-1), vals.reshape(-1))
    return out.view(plan.channels, kh, kw)


def _check_tiles(tiles: Tensor, plan: TilePlan) -> None:
    n = plan.tile_size
    if tiles.dim() != 3 or tiles.shape != (plan.num_tiles, n, n):
        raise ValueError(f"tile weights must have shape (T, N, N) = ({plan.num_tiles}, {n}, {n}) "
                         f"for this plan, got {tuple(tiles.shape)}")


def split_kernel(weight: Tensor, tile_size: int, layout: str = "auto") -> Tuple[Tensor, TilePlan]:
    """Split a depthwise kernel ``(C, KH, KW)`` (or ``(C, 1, KH, KW)``) into ``N x N`` tiles.

    Returns ``(tiles (T, N, N), plan)`` with ``merge_tiles(tiles, plan, (KH, KW)) == weight``
    exactly. Odd and even sides, ``K % N == 0`` and ``K < N`` all work.

    Example::

        >>> w = torch.randn(8, 51, 5)
        >>> tiles, plan = split_kernel(w, 5)
        >>> torch.equal(merge_tiles(tiles, plan, (51, 5)), w)
        True
    """
    tiles, _, plan = split_branches([(weight, None)], tile_size, layout)
    return tiles, plan


def split_branches(branches: Iterable[Tuple[Tensor, Optional[Tensor]]], tile_size: int,
                   layout: str = "auto", drop_zero: bool = False) -> Tuple[Tensor, Optional[Tensor], TilePlan]:
    """Split parallel depthwise branches, all centred, into one tile set.

    Each branch is ``(weight (C, kh, kw), bias (C,) or None)``, already BN-folded (see
    :func:`fold_bn`). Branches are summed: tiles that land on the same ``(c, dy, dx)`` add up and
    biases add up. The per-branch layout is chosen to minimise the merged tile count (e.g.
    SLaK 51x5 + 5x51 + 5x5 with N=5: 11 + 11 + 1 - 2 = 21 tiles per channel).
    ``drop_zero`` removes tiles that are exactly zero (per channel), giving variable counts.

    Returns ``(tiles (T, N, N), bias (C,) or None, plan)``.
    """
    _check_tile_size(tile_size)
    branches = [(_as_kernel(w, f"branch {i} weight"), b) for i, (w, b) in enumerate(branches)]
    if not branches:
        raise ValueError("split_branches needs at least one branch")
    c = branches[0][0].shape[0]
    for i, (w, _) in enumerate(branches):
        if w.shape[0] != c:
            raise ValueError(f"branch {i} has {w.shape[0]} channels, branch 0 has {c}")
    shapes = [tuple(w.shape[1:]) for w, _ in branches]
    modes = choose_layout(shapes, tile_size, layout)
    union: dict = {}
    grids = []
    for (kh, kw), (my, mx) in zip(shapes, modes):
        pos = list(itertools.product(axis_grid(kh, tile_size, my), axis_grid(kw, tile_size, mx)))
        grids.append(pos)
        for p in pos:
            union.setdefault(p, len(union))
    positions = sorted(union)  # row-major by (dy, dx)
    index = {p: k for k, p in enumerate(positions)}
    plan = TilePlan.uniform(c, positions, tile_size).to(branches[0][0].device)
    p = len(positions)
    w0 = branches[0][0]
    tiles = w0.new_zeros(c, p, tile_size, tile_size)
    bias = None
    for (w, b), pos in zip(branches, grids):
        sub = TilePlan.uniform(c, pos, tile_size).to(w.device)
        t = extract_tiles(w, sub).view(c, len(pos), tile_size, tile_size)
        idx = torch.tensor([index[q] for q in pos], device=w.device)
        tiles = tiles.index_add(1, idx, t.to(tiles.dtype))
        if b is not None:
            bias = b.to(tiles.dtype) if bias is None else bias + b.to(tiles.dtype)
    tiles = tiles.reshape(c * p, tile_size, tile_size)
    if drop_zero:
        keep = tiles.detach().reshape(c * p, -1).ne(0).any(1)
        tiles, plan = tiles[keep], plan.select(keep)
    return tiles, bias, plan


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm (its running statistics and own ``eps``) into a conv.

    ``bn`` is an ``nn.BatchNorm2d`` or a tuple ``(gamma, beta, mean, var, eps)``; ``gamma``/``beta``
    may be ``None`` (affine=False). Returns ``(weight * t, beta + (bias - mean) * t)`` with
    ``t = gamma / sqrt(var + eps)`` broadcast over ``weight``'s leading (channel) dim.
    """
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
        gamma, beta, mean, var, eps = bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    else:
        gamma, beta, mean, var, eps = bn
    c = weight.shape[0]
    if mean.shape != (c,):
        raise ValueError(f"BatchNorm has {mean.shape[0]} channels but the weight has {c}")
    std = (var.to(weight.dtype) + eps).sqrt()
    t = (gamma.to(weight.dtype) if gamma is not None else torch.ones_like(std)) / std
    b = bias.to(weight.dtype) if bias is not None else torch.zeros_like(std)
    shift = (beta.to(weight.dtype) if beta is not None else torch.zeros_like(std)) + (b - mean.to(weight.dtype)) * t
    return weight * t.view(-1, *([1] * (weight.dim() - 1))), shift


def dilate_kernel(weight: Tensor, rate: int) -> Tensor:
    """Dense equivalent of a dilated kernel: ``(C, k, k)`` at rate ``r`` -> ``(C, r(k-1)+1, ...)``."""
    weight = _as_kernel(weight)
    if rate < 1:
        raise ValueError(f"dilation rate must be >= 1, got {rate}")
    c, kh, kw = weight.shape
    out = weight.new_zeros(c, rate * (kh - 1) + 1, rate * (kw - 1) + 1)
    out[:, ::rate, ::rate] = weight
    return out


# general shift-add --------------------------------------------------------------------------
_SHIFT_LIMIT = 1 << 30  # |dy|, |dx| bound: h + dy stays inside int32 in the kernels


class ShiftAddPlan:
    """Entries of a general shift-add, in the three orders its computations read them.

    An entry ``e = (out[e], plane[e], dy[e], dx[e])`` adds plane ``plane[e]``, shifted, to output
    channel ``out[e]``; a plane may feed several entries (other outputs, other shifts, repeats)::

        y[b, o, h, w] = sum_{e: out[e] == o} planes[b, plane[e], h + dy[e], w + dx[e]]

    reading zero outside ``planes`` (:func:`shiftwise.functional.plane_shift_add`). Build it with
    :meth:`from_entries`. Views (int32 tensors unless stated):

    * by output channel (the forward gather): ``out_offsets`` ``(O + 1,)`` CSR, output ``o``
      owns entries ``out_offsets[o]:out_offsets[o+1]`` of ``out_channel``, ``plane``, ``dy``,
      ``dx`` ``(E,)``;
    * by plane (the backward, a transposed gather): ``plane_offsets`` ``(P + 1,)`` CSR over
      ``plane_out``, ``plane_dy``, ``plane_dx`` ``(E,)`` (each entry's output channel and shifts);
    * by shift (the PyTorch twin): ``shift_plane``, ``shift_out`` int64 ``(E,)``, and
      ``shift_groups``, ``((dy, dx, start, end), ...)`` in Python ints: the entries
      ``start:end`` share the shift ``(dy, dx)``.

    Within each group entries keep the order they were given in. ``num_outputs``,
    ``num_planes``, ``num_entries`` are Python ints, so calls never read the tensors back.

    Example::

        >>> plan = ShiftAddPlan.from_entries(out_channel=[1, 0, 1], plane=[0, 0, 1], dy=[0, 2, -1],
        ...                                  dx=[1, 0, 0], num_outputs=2, num_planes=2)
        >>> plan.out_offsets.tolist(), plan.plane.tolist(), plan.plane_offsets.tolist(), plan.plane_out.tolist()
        ([0, 1, 3], [0, 0, 1], [0, 2, 3], [1, 0, 1])
    """

    _TENSORS = ("out_offsets", "out_channel", "plane", "dy", "dx", "plane_offsets", "plane_out", "plane_dy",
                "plane_dx", "shift_plane", "shift_out")

    def __init__(self, tensors: dict, num_outputs: int, num_planes: int, shift_groups: Tuple[Tuple[int, ...], ...]):
        for name in self._TENSORS:
            setattr(self, name, tensors[name])
        self.num_outputs = int(num_outputs)
        self.num_planes = int(num_planes)
        self.num_entries = int(tensors["plane"].numel())
        self.shift_groups = shift_groups

    @classmethod
    def from_entries(cls, out_channel, plane, dy, dx, num_outputs: int, num_planes: int) -> "ShiftAddPlan":
        """The plan of the entries ``(out_channel[e], plane[e], dy[e], dx[e])``: four 1-D integer
        tensors (or sequences) of one length, in any order, repeats allowed. The plan lives on the
        device of ``out_channel`` (the CPU for a sequence)."""
        num_outputs, num_planes = int(num_outputs), int(num_planes)
        if num_outputs < 0 or num_planes < 0:
            raise ValueError(f"num_outputs and num_planes must be >= 0, got {num_outputs} and {num_planes}")
        device = out_channel.device if isinstance(out_channel, Tensor) else torch.device("cpu")
        cols = {}
        for name, v in (("out_channel", out_channel), ("plane", plane), ("dy", dy), ("dx", dx)):
            t = torch.as_tensor(v).detach()
            if t.numel() == 0:
                t = t.reshape(-1).to(torch.int64)
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D (one value per entry), got shape {tuple(t.shape)}")
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
            cols[name] = t.to("cpu", torch.int64)
        e = cols["out_channel"].numel()
        if any(t.numel() != e for t in cols.values()):
            raise ValueError("out_channel, plane, dy and dx must have one value per entry, got lengths "
                             + ", ".join(str(t.numel()) for t in cols.values()))
        for name, n, what in (("out_channel", num_outputs, "num_outputs"), ("plane", num_planes, "num_planes")):
            t = cols[name]
            if e and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ValueError(f"{name} values must lie in [0, {what}={n}), got [{int(t.min())}, {int(t.max())}]")
        for name in ("dy", "dx"):
            t = cols[name]
            if e and int(t.abs().max()) > _SHIFT_LIMIT:
                raise ValueError(f"{name} values must lie in [-{_SHIFT_LIMIT}, {_SHIFT_LIMIT}], got "
                                 f"[{int(t.min())}, {int(t.max())}]")
        out, pl, sy, sx = cols["out_channel"], cols["plane"], cols["dy"], cols["dx"]

        def offsets_of(keys, n):
            off = torch.zeros(n + 1, dtype=torch.int64, device=keys.device)
            off[1:] = torch.bincount(keys, minlength=n).cumsum(0)
            return off.to(torch.int32)

        def i32(t):
            return t.to(torch.int32).contiguous()

        by_out = torch.sort(out, stable=True).indices
        by_plane = torch.sort(pl, stable=True).indices
        by_shift = torch.sort(sx, stable=True).indices
        by_shift = by_shift[torch.sort(sy[by_shift], stable=True).indices]
        groups: Tuple[Tuple[int, ...], ...] = ()
        if e:
            pairs, counts = torch.unique_consecutive(torch.stack([sy[by_shift], sx[by_shift]], 1), dim=0,
                                                     return_counts=True)
            ends = counts.cumsum(0).tolist()
            groups = tuple((a, b, end - k, end) for (a, b), k, end in zip(pairs.tolist(), counts.tolist(), ends))
        tensors = {
            "out_offsets": offsets_of(out, num_outputs), "out_channel": i32(out[by_out]), "plane": i32(pl[by_out]),
            "dy": i32(sy[by_out]), "dx": i32(sx[by_out]),
            "plane_offsets": offsets_of(pl, num_planes), "plane_out": i32(out[by_plane]),
            "plane_dy": i32(sy[by_plane]), "plane_dx": i32(sx[by_plane]),
            "shift_plane": pl[by_shift].contiguous(), "shift_out": out[by_shift].contiguous(),
        }
        return cls(tensors, num_outputs, num_planes, groups).to(device)

    def to(self, device) -> "ShiftAddPlan":
        """The plan on ``device`` (``self`` when it is already there)."""
        if device is None or self.out_offsets.device == torch.device(device):
            return self
        tensors = {name: getattr(self, name).to(device) for name in self._TENSORS}
        return ShiftAddPlan(tensors, self.num_outputs, self.num_planes, self.shift_groups)

    @property
    def device(self) -> torch.device:
        return self.out_offsets.device

    def __eq__(self, other) -> bool:
        return (isinstance(other, ShiftAddPlan) and self.num_outputs == other.num_outputs
                and self.num_planes == other.num_planes
                and all(torch.equal(getattr(self, n).cpu(), getattr(other, n).cpu()) for n in self._TENSORS))

    def __repr__(self) -> str:
        return (f"ShiftAddPlan(outputs={self.num_outputs}, planes={self.num_planes}, entries={self.num_entries}, "
                f"shifts={len(self.shift_groups)})")
