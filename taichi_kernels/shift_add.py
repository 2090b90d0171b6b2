"""Shift-add: ``y[b,c,h,w] = sum_{t in c} u[b, t, h + sy[t], w + sx[t]]`` (zero outside ``u``).

Forward is a gather over each channel's tiles (deterministic, no atomics); backward is the
transposed gather ``gu[b,t,a,e] = gy[b, c(t), a - sy[t], e - sx[t]]``.

``"cpu"`` style: the forward's work item is ``ROWS`` output rows of one channel, each row
summed in segments of ``WC`` columns in a local array (a ``+=`` on a global array in the column
loop is not vectorised: every store might alias the argument buffer), with the valid column
range of each tile computed once per row so that the column loop is branch-free and contiguous;
float32 rows are stored several values at a time where the output allows (``fused.STORE_MODES``).
The backward's work item is one row of ``gu``. ``"gpu"`` style: one thread per element.

``shift_add_aligned_kernel``: a CPU forward for plans whose tiles all cover every output
column (``0 <= shift_x <= Wu - W``, e.g. tall strips such as 51x5, dense or compacted): the loop
over tiles is unrolled inside the column loop, so each output vector is one pass of ``K`` loads
and adds instead of ``K`` loops with their setup (paper case, 124 x 128 x 128, 51x5: 32 -> 25 ms
on one thread; ``benchmarks/NOTES.md``).

``shift_add_rowvec_kernel``: the aligned kernel's case where every tile reads whole, aligned
8-float vectors (shifts multiples of 8, rows a multiple of 8 wide: tall strips, whose planes the
decomposed path crops to the output's columns): ``u`` and the output are read and written as
vectors, one load per tile and output vector, no local accumulator (paper case at density 0.25:
0.86-0.91x the aligned kernel's time per round, 2 threads; ``benchmarks/NOTES.md``, session 11).
"""
import functools

import taichi as ti

from .fused import VEC, for_stores, output_type, store_row
from .launch import Launcher

WC = 64  # output columns a CPU forward accumulates at a time (local arrays of 96+ are not vectorised)
ROWS = 32  # output rows per CPU forward work item (one (b, c) plane per item was slower:
# channels own 0-8 tiles in sparse plans, and 4 * 124 items balance badly over the threads)


@functools.lru_cache(maxsize=None)
def shift_add_kernels(dtype_name: str, style: str = "cpu", stores: str = "one"):
    """``(fwd, bwd)`` kernels for ``dtype_name`` in {"float32", "float64"}; ``stores``: how the
    CPU forward writes its output (``fused.STORE_MODES``)."""
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    if style not in ("cpu", "gpu"):
        raise ValueError(f"unknown kernel style {style!r}")
    if stores != "one" and style != "cpu":
        raise ValueError(f"{stores} stores are for the cpu style")
    out1 = output_type(dt, stores)
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    arr1 = ti.types.ndarray(dtype=dt, ndim=1)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.kernel
    def fwd_cpu(u: arr4,  # (B, T, Hu, Wu) per-tile small-conv outputs
                offsets: idx1,  # (C + 1,) CSR: channel c owns tiles offsets[c]:offsets[c+1]
                sy: idx1, sx: idx1,  # (T,) row / column shift of each tile
                height: ti.i32, width: ti.i32,
                y: out1):  # (B, C, H, W) output flattened (fused.STORE_MODES), overwritten
        hu, wu = u.shape[2], u.shape[3]
        channels = offsets.shape[0] - 1
        for b, c, hb in ti.ndrange(u.shape[0], channels, (height + ROWS - 1) // ROWS):
            for h in range(hb * ROWS, ti.min(height, hb * ROWS + ROWS)):
                for chunk in range((width + WC - 1) // WC):
                    w0 = chunk * WC
                    wn = ti.min(WC, width - w0)
                    acc = ti.Vector.zero(dt, WC)
                    for t in range(offsets[c], offsets[c + 1]):
                        r = h + sy[t]
                        if 0 <= r < hu:
                            s = w0 + sx[t]
                            for q in range(ti.max(0, -s), ti.min(wn, wu - s)):
                                acc[q] += u[b, t, r, q + s]
                    store_row(y, ((b * channels + c) * height + h) * width + w0, acc, wn, ti.cast(0, dt), stores)

    @ti.kernel
    def bwd_cpu(gy: arr4,  # (B, C, H, W) gradient of the output
                tile_channel: idx1,  # (T,) owning channel of each tile
                sy: idx1, sx: idx1,
                hu: ti.i32, wu: ti.i32,
                gu: arr1):  # (B, T, Hu, Wu) gradient of u flattened (fused.STORES), fully overwritten
        height, width = gy.shape[2], gy.shape[3]
        tiles = tile_channel.shape[0]
        for b, t, a in ti.ndrange(gy.shape[0], tiles, hu):
            c = tile_channel[t]
            h = a - sy[t]
            s = sx[t]
            lo = ti.min(ti.max(0, s), wu)
            hi = ti.max(ti.min(wu, width + s), lo)
            base = ((b * tiles + t) * hu + a) * wu
            if 0 <= h < height:
                for e in range(lo):
                    gu[base + e] = ti.cast(0, dt)
                for e in range(lo, hi):
                    gu[base + e] = gy[b, c, h, e - s]
                for e in range(hi, wu):
                    gu[base + e] = ti.cast(0, dt)
            else:
                for e in range(wu):
                    gu[base + e] = ti.cast(0, dt)

    @ti.kernel
    def fwd_gpu(u: arr4, offsets: idx1, sy: idx1, sx: idx1, y: arr4):
        hu, wu = u.shape[2], u.shape[3]
        for b, c, h, w in ti.ndrange(y.shape[0], y.shape[1], y.shape[2], y.shape[3]):
            acc = ti.cast(0, dt)
            for t in range(offsets[c], offsets[c + 1]):
                r = h + sy[t]
                e = w + sx[t]
                if 0 <= r < hu and 0 <= e < wu:
                    acc += u[b, t, r, e]
            y[b, c, h, w] = acc

    @ti.kernel
    def bwd_gpu(gy: arr4, tile_channel: idx1, sy: idx1, sx: idx1, gu: arr4):
        height, width = gy.shape[2], gy.shape[3]
        for b, t, a, e in ti.ndrange(gu.shape[0], gu.shape[1], gu.shape[2], gu.shape[3]):
            h = a - sy[t]
            w = e - sx[t]
            v = ti.cast(0, dt)
            if 0 <= h < height and 0 <= w < width:
                v = gy[b, tile_channel[t], h, w]
            gu[b, t, a, e] = v

    return (for_stores(fwd_cpu, stores), Launcher(bwd_cpu)) if style == "cpu" else (Launcher(fwd_gpu), Launcher(bwd_gpu))


MAX_ALIGNED_TILES = 32  # the aligned kernel unrolls its tile loop; more tiles compile too slowly
ALIGNED_GROUP = 8  # tiles per unrolled pass when the plan's channels own different numbers of tiles


@functools.lru_cache(maxsize=None)
def shift_add_aligned_kernel(dtype_name: str, k: int, variable: bool = False, stores: str = "one"):
    """CPU forward for plans whose tiles all satisfy ``0 <= sx <= Wu - W``.

    ``variable=False``: a uniform plan of ``k`` tiles per channel (tile ``c * k + j``), one
    unrolled pass of ``k`` loads per output vector. ``variable=True``: any tile counts, read
    from ``offsets`` (the CSR of the generic kernel; compacted sparse plans): a channel's
    ``n % k`` first tiles in one unrolled pass specialised for that count, the rest in passes of
    ``k``, so every output vector costs ``n`` loads and ``ceil(n / k)`` accumulator passes.
    A work item is ``ROWS`` output rows of one channel. ``stores``: how the output is passed and
    written (``fused.STORE_MODES``).
    """
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    if not 1 <= k <= MAX_ALIGNED_TILES:
        raise ValueError(f"k must be in 1..{MAX_ALIGNED_TILES}, got {k}")
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    out1 = output_type(dt, stores)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.func
    def add_tiles(u: ti.template(), sy: ti.template(), sx: ti.template(), acc: ti.template(),
                  b, t0, h, w0, wn, n: ti.template(), first: ti.template()):
        """``acc[q] (+)= sum_j u[b, t0 + j, h + sy, w0 + q + sx]`` over ``n`` tiles, unrolled."""
        hu = u.shape[2]
        row = ti.Vector.zero(ti.i32, n)  # the row of u each tile reads (0 for tiles off the map)
        col = ti.Vector.zero(ti.i32, n)  # its column for acc[0]
        inside = ti.Vector.zero(ti.i32, n)
        for j in ti.static(range(n)):
            r = h + sy[t0 + j]
            if 0 <= r < hu:
                row[j] = r
                inside[j] = 1
            col[j] = w0 + sx[t0 + j]
        for q in range(wn):  # reads stay inside each row: sx in [0, Wu - W]
            v = ti.cast(0, dt)  # (constants made inside the kernel: a taichi Expr shared by two
            if ti.static(not first):  # kernels crashed the second one's compilation)
                v = acc[q]
            for j in ti.static(range(n)):  # select, not multiply: a NaN off the map stays out
                v += ti.select(inside[j] != 0, u[b, t0 + j, row[j], q + col[j]], ti.cast(0, dt))
            acc[q] = v

    @ti.func
    def rows(u: ti.template(), sy: ti.template(), sx: ti.template(), y: ti.template(), b, c, channels,
             t0, n, h0, height, width, m: ti.template()):
        """Output rows ``h0 .. h0 + ROWS - 1`` of channel ``c``: its first ``m`` tiles in one pass,
        then ``(n - m) // k`` passes of ``k``."""
        for h in range(h0, ti.min(height, h0 + ROWS)):
            for chunk in range((width + WC - 1) // WC):
                w0 = chunk * WC
                wn = ti.min(WC, width - w0)
                acc = ti.Vector.zero(dt, WC)
                if ti.static(m > 0):
                    add_tiles(u, sy, sx, acc, b, t0, h, w0, wn, m, True)
                for g in range((n - m) // k):
                    add_tiles(u, sy, sx, acc, b, t0 + m + g * k, h, w0, wn, k, False)
                store_row(y, ((b * channels + c) * height + h) * width + w0, acc, wn, ti.cast(0, dt), stores)

    @ti.kernel
    def fwd_aligned(u: arr4,  # (B, C * k, Hu, Wu); channel c owns tiles c*k .. c*k + k - 1
                    sy: idx1, sx: idx1,  # (C * k,) shifts; every sx in [0, Wu - W]
                    height: ti.i32, width: ti.i32,
                    y: out1):  # (B, C, H, W) flattened (fused.STORE_MODES), overwritten
        channels = sy.shape[0] // k
        for b, c, hb in ti.ndrange(u.shape[0], channels, (height + ROWS - 1) // ROWS):
            rows(u, sy, sx, y, b, c, channels, c * k, k, hb * ROWS, height, width, k)

    @ti.kernel
    def fwd_aligned_variable(u: arr4,  # (B, T, Hu, Wu)
                             offsets: idx1,  # (C + 1,) channel c owns tiles offsets[c]:offsets[c+1]
                             sy: idx1, sx: idx1,  # (T,) shifts; every sx in [0, Wu - W]
                             height: ti.i32, width: ti.i32,
                             y: out1):  # (B, C, H, W) flattened (as fwd_aligned), overwritten
        channels = offsets.shape[0] - 1
        for b, c, hb in ti.ndrange(u.shape[0], channels, (height + ROWS - 1) // ROWS):
            t0 = offsets[c]
            n = offsets[c + 1] - t0
            rest = n % k
            for m in ti.static(range(k)):  # the first n % k tiles: one pass specialised for m
                if rest == m:
                    rows(u, sy, sx, y, b, c, channels, t0, n, hb * ROWS, height, width, m)

    return for_stores(fwd_aligned_variable if variable else fwd_aligned, stores)


@functools.lru_cache(maxsize=None)
def shift_add_rowvec_kernel(k: int, variable: bool = False):
    """CPU float32 forward for plans whose tiles read whole, aligned 8-float vectors of ``u``:
    every ``sx`` a multiple of ``VEC`` in ``[0, Wu - W]``, ``Wu`` and ``W`` multiples of ``VEC``
    (tall strips on maps a multiple of 8 wide, once the decomposed path's planes are cropped to
    the columns the tiles read: ``sx = 0``, ``Wu = W``).

    ``u`` and the output are passed flattened as ``VEC``-float vectors, so each output vector is
    the sum of one aligned vector load per tile, stored at once: no local accumulator. Each
    tile's vector index is computed once per row (through a 4-d ``u`` LLVM recomputed all of
    them after every store, which might have changed ``u``'s shape: ``STORES`` in ``fused``).
    ``variable=False``: a uniform plan of ``k`` tiles per channel (tile ``c * k + j``).
    ``variable=True``: tile counts from ``offsets``; a channel's first ``n % k`` tiles (``k`` if
    that is 0 and ``n > 0``) in one pass specialised for that count, the rest in passes of ``k``
    that add into the item's rows just written (16 KB, in cache). A work item is ``ROWS`` output
    rows of one channel. Compiled with vector code generation (``launch.Launcher``).
    """
    if not 1 <= k <= MAX_ALIGNED_TILES:
        raise ValueError(f"k must be in 1..{MAX_ALIGNED_TILES}, got {k}")
    vec1 = ti.types.ndarray(dtype=ti.types.vector(VEC, ti.f32), ndim=1)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.func
    def add_rows(u: ti.template(), sy: ti.template(), sx: ti.template(), y: ti.template(), tiles, hu, wu, b, t0,
                 h, base, wv, n: ti.template(), first: ti.template()):
        """``y[base + v] (+)= sum_j u[b, t0 + j, h + sy, v + sx / VEC]`` (vectors) for ``v < wv``,
        ``n`` tiles unrolled; ``u`` is ``(B, tiles, hu, wu)`` vectors, flattened."""
        at = ti.Vector.zero(ti.i32, max(n, 1))  # each tile's first vector of the row (row 0 when off the map)
        inside = ti.Vector.zero(ti.i32, max(n, 1))
        for j in ti.static(range(n)):
            r = h + sy[t0 + j]
            if 0 <= r < hu:
                inside[j] = 1
            else:
                r = 0
            at[j] = ((b * tiles + t0 + j) * hu + r) * wu + sx[t0 + j] // VEC
        for v in range(wv):
            s = ti.Vector.zero(ti.f32, VEC)
            if ti.static(not first):
                s = y[base + v]
            for j in ti.static(range(n)):  # select, not multiply: a NaN off the map stays out
                s += ti.select(inside[j] != 0, u[at[j] + v], ti.Vector.zero(ti.f32, VEC))
            y[base + v] = s

    @ti.kernel
    def fwd_rowvec(u: vec1,  # (B, C * k, Hu, Wu / VEC) vectors, flattened; channel c owns tiles c*k .. c*k + k - 1
                   sy: idx1, sx: idx1,  # (C * k,) shifts; every sx a multiple of VEC in [0, Wu - W]
                   batch: ti.i32, hu: ti.i32, wu: ti.i32,  # u's batch, rows, vectors per row
                   height: ti.i32, wv: ti.i32,  # output rows, output vectors per row (W / VEC)
                   y: vec1):  # (B * C * H * W / VEC,) vectors, overwritten
        tiles = sy.shape[0]
        channels = tiles // k
        for b, c, hb in ti.ndrange(batch, channels, (height + ROWS - 1) // ROWS):
            for h in range(hb * ROWS, ti.min(height, hb * ROWS + ROWS)):
                add_rows(u, sy, sx, y, tiles, hu, wu, b, c * k, h, ((b * channels + c) * height + h) * wv, wv, k,
                         True)

    @ti.kernel
    def fwd_rowvec_variable(u: vec1,  # (B, T, Hu, Wu / VEC) vectors, flattened
                            offsets: idx1,  # (C + 1,) channel c owns tiles offsets[c]:offsets[c+1]
                            sy: idx1, sx: idx1,  # (T,) shifts, as fwd_rowvec
                            batch: ti.i32, hu: ti.i32, wu: ti.i32, height: ti.i32, wv: ti.i32,
                            y: vec1):  # as fwd_rowvec
        tiles = sy.shape[0]
        channels = offsets.shape[0] - 1
        for b, c, hb in ti.ndrange(batch, channels, (height + ROWS - 1) // ROWS):
            t0 = offsets[c]
            n = offsets[c + 1] - t0
            lead = n % k
            if lead == 0 and n > 0:
                lead = k
            h1 = ti.min(height, hb * ROWS + ROWS)
            for m in ti.static(range(k + 1)):  # the first pass, specialised for its count
                if lead == m:
                    for h in range(hb * ROWS, h1):
                        add_rows(u, sy, sx, y, tiles, hu, wu, b, t0, h, ((b * channels + c) * height + h) * wv, wv,
                                 m, True)
            for g in range((n - lead) // k):  # the rest: rows of this item, still in cache
                for h in range(hb * ROWS, h1):
                    add_rows(u, sy, sx, y, tiles, hu, wu, b, t0 + lead + g * k, h,
                             ((b * channels + c) * height + h) * wv, wv, k, False)

    return Launcher(fwd_rowvec_variable if variable else fwd_rowvec, vector_codegen=True)
