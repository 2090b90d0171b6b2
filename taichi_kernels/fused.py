"""Fused shift-wise convolution: the whole sum over tiles in one kernel, no per-tile planes.

    y[b,c,h,w] = bias[c] + sum_{t in c} sum_{i,j<N} wt[t,i,j] * x[b,c, h+dy[t]+i-o, w+dx[t]+j-o]

``o`` (the origin) is ``N//2`` for the convolution itself; the input gradient is the same sum
with the tiles flipped, the offsets negated and ``o = N-1-N//2``. ``wgrad`` is the weight
gradient ``gw[t,i,j] = sum_{b,h,w} gy[b,c,h,w] * x[b,c, h+dy[t]+i-o, w+dx[t]+j-o]``.

Two styles:

* ``"cpu"``: one work item per two output rows (they share N of their N+1 input rows per
  tile) and ``WC`` columns, accumulated in local arrays so that LLVM vectorises the loop over
  columns (a ``+=`` on a global array in that loop
  is not vectorised: every store might alias the argument buffer). The output is written
  through a flat view at an index computed once per row (``STORES``). The input comes in
  channel chunks with ``N-1`` zero columns on the left and ``N-1+VL-1`` on the right (see
  :func:`column_padding`), so the column loop has no bounds checks and its trip count can be
  rounded up to a multiple of ``VL`` (no scalar remainder); rows are checked once per tile
  row. In float32, tile sizes in ``STATIC_TILE_SIZES`` are unrolled (all ``N x N`` taps of a
  tile in one loop body when its rows are inside the input, else one loop per row); other
  sizes and float64 run a loop per tap, ~4x slower but compiled once for every ``N`` (an
  unrolled kernel takes seconds to compile per tile size and dtype).
* ``"gpu"``: one thread per output element, unpadded input, bounds checked per tap. The
  weight gradient is a blocked reduction in two passes, without atomics (bitwise the same
  from run to run): the rows ``(b, h)`` of each tap's ``B x H x W`` sum are split into blocks
  of ``rows`` rows (:func:`wgrad_blocks`); pass one runs a thread per (tile, block, i, j) that
  sums its block (a partial sum per row, then the rows) into a partials buffer
  ``(nblocks, T, N, N)``; pass two runs a thread per tap that adds its ``nblocks`` partials
  pairwise (a tree of depth ``ceil(log2 nblocks)``). Written for CUDA; not measured on a GPU.
"""
import functools

import taichi as ti

from .launch import Launcher

VL = 8  # vector loops run in multiples of VL columns; inputs carry VL - 1 extra zero columns
WC = 64  # output columns one CPU work item accumulates
STATIC_TILE_SIZES = (3, 5)  # unrolled in the CPU style; others use the runtime-N loops
# The GPU weight gradient's blocks (wgrad_blocks): a thread sums at least BLOCK_TERMS products
# (enough that writing its partial and the second pass cost little beside them: the partials
# hold at most 1/BLOCK_TERMS of the products), and the partials take at most 1/PARTIAL_SHARE of
# the input's elements (a block grows with the taps per channel). On the paper's case at batch
# 64 (C = 124, 128 x 128, 51 x 5 in 5 x 5 tiles) that is 512 blocks of 16 rows at density 0.25
# (4.4 M threads) and 456 blocks of 18 rows at density 1 (15.5 M threads), against 8.5 k and
# 34 k threads of one tap each summing all 1 M products. The float32 rounding error grows with
# the additions on one chain: a row's W, the block's rows and the tree's depth, not B x H x W.
BLOCK_TERMS = 2048
PARTIAL_SHARE = 8
# STORES: LLVM must assume that a store into an ndarray may overwrite the argument buffer that
# holds the array's data pointer and shape, so it reloads them after every store and recomputes
# the 4-d index: writing a (4, 124, 128, 128) float32 array element by element ran at ~5 GB/s
# on 2 threads. Through a 1-d view with the row's index computed before the loop only the data
# pointer is reloaded (2-3x faster). The CPU kernels therefore take their outputs flattened.


# How a CPU forward writes its float32 output (``stores`` of the kernel factories; the caller
# picks the mode the output allows, ``shiftwise.ops._flat_output``):
# "one": element by element through a flat view (STORES);
# "pairs": two values per 64-bit store through a float64 view (rows of even width, 8-byte
#   aligned): half the stores and pointer reloads (a 31 MiB output: 2.75 -> 1.52 ms, 2 threads).
STORE_MODES = ("one", "pairs")


@ti.func
def store_row(y: ti.template(), base, acc: ti.template(), wn, shift, stores: ti.template()):
    """``y[base + q] = acc[q] + shift`` for ``q < wn``, written as ``stores`` says (see
    STORE_MODES; "pairs": ``base`` and ``wn`` even)."""
    if ti.static(stores == "pairs"):
        for v in range(wn // 2):
            lo = ti.cast(ti.bit_cast(acc[2 * v] + shift, ti.u32), ti.u64)
            hi = ti.cast(ti.bit_cast(acc[2 * v + 1] + shift, ti.u32), ti.u64)
            y[base // 2 + v] = ti.bit_cast(lo | (hi << 32), ti.f64)  # little-endian: acc[2v] first
    else:
        for q in range(wn):
            y[base + q] = acc[q] + shift


def output_type(dt, stores: str):
    """The ndarray type of a CPU forward's flattened output for the store mode ``stores``."""
    if stores not in STORE_MODES:
        raise ValueError(f"unknown store mode {stores!r}; expected one of {STORE_MODES}")
    if stores != "one" and dt != ti.f32:
        raise ValueError(f"{stores} stores are for float32 outputs")
    return ti.types.ndarray(dtype=ti.f64 if stores == "pairs" else dt, ndim=1)


def column_padding(tile_size: int):
    """``(left, right)`` zero columns the CPU-style kernels expect around each input row."""
    return tile_size - 1, tile_size - 1 + VL - 1


def wgrad_blocks(batch: int, channels: int, height: int, width: int, taps: int):
    """``(rows, nblocks)``: the GPU-style weight gradient of ``taps`` tile taps (``T x N x N``) on
    a ``(batch, channels, height, width)`` input sums blocks of ``rows`` rows ``(b, h)``, of which
    there are ``nblocks``; each block holds at least ``BLOCK_TERMS`` products (or all of them) and
    the partials ``(nblocks, T, N, N)`` at most ``1/PARTIAL_SHARE`` of the input's elements."""
    terms = max(BLOCK_TERMS, -(-taps * PARTIAL_SHARE // max(1, channels)))
    rows = max(1, min(batch * height, -(-terms // max(1, width))))
    return rows, -(-batch * height // rows)


def fused_kernels(dtype_name: str, tile_size: int, style: str = "cpu", stores: str = "one"):
    """``(fwd, wgrad)`` for ``dtype_name`` in {"float32", "float64"}, tile side ``tile_size``;
    ``stores``: how the CPU forward writes its output (STORE_MODES)."""
    if dtype_name not in ("float32", "float64"):
        raise ValueError(f"unsupported dtype {dtype_name!r}")
    if style == "gpu":
        return _gpu_kernels(dtype_name)
    if style != "cpu":
        raise ValueError(f"unknown kernel style {style!r}")
    if tile_size in STATIC_TILE_SIZES and dtype_name == "float32":
        return _cpu_static_kernels(dtype_name, tile_size, stores)
    return _cpu_generic_kernels(dtype_name, stores)


def _types(dtype_name: str):
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    return (dt, ti.types.ndarray(dtype=dt, ndim=4), ti.types.ndarray(dtype=dt, ndim=3),
            ti.types.ndarray(dtype=dt, ndim=1), ti.types.ndarray(dtype=ti.i32, ndim=1))


@functools.lru_cache(maxsize=None)
def _cpu_static_kernels(dtype_name: str, n: int, stores: str = "one"):
    dt, arr4, arr3, arr1, idx = _types(dtype_name)
    out1 = output_type(dt, stores)
    pad = n - 1

    @ti.kernel
    def fwd(xp: arr4,  # (B, cc, H, W + 2(N-1) + VL-1): channels c0..c0+cc of x, zero-padded columns
            wt: arr3,  # (T, N, N)
            offsets: idx,  # (C + 1,) CSR: channel c owns tiles offsets[c]:offsets[c+1]
            dy: idx, dx: idx,  # (T,) tile centre offsets
            bias: arr1,  # (C,)
            c0: ti.i32, origin: ti.i32, channels: ti.i32, width: ti.i32,
            y: out1):  # (B, C, H, W) flattened (see STORE_MODES); channels c0..c0+cc overwritten
        height = xp.shape[2]
        nchunk = (width + WC - 1) // WC
        # a work item is two output rows: they share N of their N+1 input rows per tile
        for b, cl, pair, chunk in ti.ndrange(xp.shape[0], xp.shape[1], (height + 1) // 2, nchunk):
            c = c0 + cl
            h0 = 2 * pair
            w0 = chunk * WC
            wn = ti.min(WC, width - w0)
            acc0 = ti.Vector.zero(dt, WC + VL)
            acc1 = ti.Vector.zero(dt, WC + VL)
            for t in range(offsets[c], offsets[c + 1]):
                r0 = h0 + dy[t] - origin  # first input row of output row h0
                s0 = w0 + dx[t] - origin + pad  # padded column of tap j=0 for acc[0]
                lo = ti.max(0, -s0)  # acc[q] touches real columns only for q in [lo, hi)
                hi = ti.min(wn, width + pad - s0)
                hi = lo + (hi - lo + VL - 1) // VL * VL
                if r0 >= 0 and r0 + n + 1 <= height:
                    for q in range(lo, hi):
                        v0 = acc0[q]
                        v1 = acc1[q]
                        for i in ti.static(range(n + 1)):
                            for j in ti.static(range(n)):
                                xv = xp[b, cl, r0 + i, q + s0 + j]
                                if ti.static(i < n):
                                    v0 += wt[t, i, j] * xv
                                if ti.static(i > 0):
                                    v1 += wt[t, i - 1, j] * xv
                        acc0[q] = v0
                        acc1[q] = v1
                    continue
                # near the top or bottom: row by row, rows outside the input skipped
                for i in range(ti.max(0, -r0), ti.min(n, height - r0)):
                    for q in range(lo, hi):
                        v = acc0[q]
                        for j in ti.static(range(n)):
                            v += wt[t, i, j] * xp[b, cl, r0 + i, q + s0 + j]
                        acc0[q] = v
                for i in range(ti.max(0, -r0 - 1), ti.min(n, height - r0 - 1)):
                    for q in range(lo, hi):
                        v = acc1[q]
                        for j in ti.static(range(n)):
                            v += wt[t, i, j] * xp[b, cl, r0 + 1 + i, q + s0 + j]
                        acc1[q] = v
            base = ((b * channels + c) * height + h0) * width + w0
            store_row(y, base, acc0, wn, bias[c], stores)
            if h0 + 1 < height:
                store_row(y, base + width, acc1, wn, bias[c], stores)

    @ti.kernel
    def wgrad(xp: arr4,  # (B, cc, H, Wp) input chunk, padded as in fwd
              gyp: arr4,  # (B, cc, H, Wp) output-gradient chunk, padded the same way
              offsets: idx, dy: idx, dx: idx,
              tile_channel: idx,  # (T,) owning channel of each tile
              c0: ti.i32, origin: ti.i32,
              gw: arr3):  # (T, N, N); the chunk's tiles are overwritten
        height = xp.shape[2]
        width = xp.shape[3] - 2 * pad - (VL - 1)
        for t in range(offsets[c0], offsets[c0 + xp.shape[1]]):
            cl = tile_channel[t] - c0
            s0 = dx[t] - origin + pad
            lo = ti.max(0, -s0)
            hi = ti.min(width, width + pad - s0)
            hi = lo + (hi - lo + VL - 1) // VL * VL
            acc = ti.Matrix.zero(dt, n, n)
            for b, h in ti.ndrange(xp.shape[0], height):
                r0 = h + dy[t] - origin
                if r0 >= 0 and r0 + n <= height:
                    s = ti.Matrix.zero(dt, n, n)
                    for q in range(lo, hi):
                        g = gyp[b, cl, h, q + pad]
                        for i in ti.static(range(n)):
                            for j in ti.static(range(n)):
                                s[i, j] += g * xp[b, cl, r0 + i, q + s0 + j]
                    acc += s
                    continue
                for i in ti.static(range(n)):
                    if 0 <= r0 + i < height:
                        s = ti.Vector.zero(dt, n)
                        for q in range(lo, hi):
                            g = gyp[b, cl, h, q + pad]
                            for j in ti.static(range(n)):
                                s[j] += g * xp[b, cl, r0 + i, q + s0 + j]
                        for j in ti.static(range(n)):
                            acc[i, j] += s[j]
            for i in ti.static(range(n)):
                for j in ti.static(range(n)):
                    gw[t, i, j] = acc[i, j]

    return Launcher(fwd), Launcher(wgrad)


@functools.lru_cache(maxsize=None)
def _cpu_generic_kernels(dtype_name: str, stores: str = "one"):
    dt, arr4, arr3, arr1, idx = _types(dtype_name)
    out1 = output_type(dt, stores)

    @ti.kernel
    def fwd(xp: arr4, wt: arr3, offsets: idx, dy: idx, dx: idx, bias: arr1,
            c0: ti.i32, origin: ti.i32, channels: ti.i32, width: ti.i32, y: out1):
        n = wt.shape[1]
        pad = n - 1
        height = xp.shape[2]
        nchunk = (width + WC - 1) // WC
        for b, cl, h, chunk in ti.ndrange(xp.shape[0], xp.shape[1], height, nchunk):
            c = c0 + cl
            w0 = chunk * WC
            wn = ti.min(WC, width - w0)
            acc = ti.Vector.zero(dt, WC + VL)
            for t in range(offsets[c], offsets[c + 1]):
                r0 = h + dy[t] - origin
                s0 = w0 + dx[t] - origin + pad
                lo = ti.max(0, -s0)
                hi = ti.min(wn, width + pad - s0)
                hi = lo + (hi - lo + VL - 1) // VL * VL
                for i in range(ti.max(0, -r0), ti.min(n, height - r0)):
                    for j in range(n):
                        wv = wt[t, i, j]
                        for q in range(lo, hi):
                            acc[q] += wv * xp[b, cl, r0 + i, q + s0 + j]
            store_row(y, ((b * channels + c) * height + h) * width + w0, acc, wn, bias[c], stores)

    @ti.kernel
    def wgrad(xp: arr4, gyp: arr4, offsets: idx, dy: idx, dx: idx, tile_channel: idx,
              c0: ti.i32, origin: ti.i32, gw: arr3):
        n = gw.shape[1]
        pad = n - 1
        height = xp.shape[2]
        width = xp.shape[3] - 2 * pad - (VL - 1)
        for t, i, j in ti.ndrange((offsets[c0], offsets[c0 + xp.shape[1]]), n, n):
            cl = tile_channel[t] - c0
            s = dx[t] - origin + pad + j
            lo = ti.max(0, -s)
            hi = ti.min(width, width + pad - s)
            hi = lo + (hi - lo + VL - 1) // VL * VL
            acc = ti.cast(0, dt)
            shift = dy[t] + i - origin
            for b, h in ti.ndrange(xp.shape[0], (ti.max(0, -shift), ti.min(height, height - shift))):
                part = ti.cast(0, dt)
                for q in range(lo, hi):
                    part += gyp[b, cl, h, q + pad] * xp[b, cl, h + shift, q + s]
                acc += part
            gw[t, i, j] = acc

    return Launcher(fwd), Launcher(wgrad)


@functools.lru_cache(maxsize=None)
def _gpu_kernels(dtype_name: str):
    dt, arr4, arr3, arr1, idx = _types(dtype_name)

    @ti.kernel
    def fwd(x: arr4,  # (B, C, H, W), unpadded
            wt: arr3, offsets: idx, dy: idx, dx: idx, bias: arr1,
            c0: ti.i32, origin: ti.i32,  # c0 is 0: the GPU style takes whole tensors
            y: arr4):
        n = wt.shape[1]
        height, width = y.shape[2], y.shape[3]
        for b, c, h, w in ti.ndrange(y.shape[0], y.shape[1], height, width):
            acc = bias[c]
            for t in range(offsets[c], offsets[c + 1]):
                r0 = h + dy[t] - origin
                s0 = w + dx[t] - origin
                for i in range(ti.max(0, -r0), ti.min(n, height - r0)):
                    for j in range(ti.max(0, -s0), ti.min(n, width - s0)):
                        acc += wt[t, i, j] * x[b, c, r0 + i, s0 + j]
            y[b, c, h, w] = acc

    @ti.kernel
    def block_sums(x: arr4, gy: arr4,  # (B, C, H, W), unpadded
                   dy: idx, dx: idx, tile_channel: idx, origin: ti.i32,
                   rows: ti.i32,  # rows (b, h) per block
                   partials: arr4):  # (nblocks, T, N, N): the sum over block k's rows
        height, width = x.shape[2], x.shape[3]
        nrows = x.shape[0] * height
        # (i, j) vary fastest: neighbouring threads read the same gy element and neighbouring x
        for t, k, i, j in ti.ndrange(partials.shape[1], partials.shape[0], partials.shape[2], partials.shape[3]):
            c = tile_channel[t]
            sh = dy[t] + i - origin
            sw = dx[t] + j - origin
            h_lo, h_hi = ti.max(0, -sh), ti.min(height, height - sh)
            w_lo, w_hi = ti.max(0, -sw), ti.min(width, width - sw)
            r = k * rows
            b, h = r // height, r % height
            acc = ti.cast(0, dt)
            for _ in range(r, ti.min(nrows, r + rows)):
                if h_lo <= h < h_hi:
                    part = ti.cast(0, dt)
                    for w in range(w_lo, w_hi):
                        part += gy[b, c, h, w] * x[b, c, h + sh, w + sw]
                    acc += part
                h += 1
                if h == height:
                    h = 0
                    b += 1
            partials[k, t, i, j] = acc

    @ti.kernel
    def reduce_blocks(partials: arr4,  # (nblocks, T, N, N); overwritten (the tree runs in place)
                      gw: arr3):  # (T, N, N)
        # blocks outermost in the buffer: neighbouring threads (taps) read neighbouring partials
        nblocks = partials.shape[0]
        for t, i, j in ti.ndrange(gw.shape[0], gw.shape[1], gw.shape[2]):
            step = 1
            while step < nblocks:  # pairwise: level by level, partial k takes k + step
                k = 0
                while k + step < nblocks:
                    partials[k, t, i, j] += partials[k + step, t, i, j]
                    k += 2 * step
                step *= 2
            gw[t, i, j] = partials[0, t, i, j]

    block_sums, reduce_blocks = Launcher(block_sums), Launcher(reduce_blocks)

    def wgrad(x, gy, dy, dx, tile_channel, origin, rows, partials, gw):
        """``gw[t,i,j] = sum_{b,h,w} gy[b,c,h,w] * x[b,c,h+dy+i-origin,w+dx+j-origin]`` in two
        passes (module docstring); ``rows`` and ``partials`` as :func:`wgrad_blocks` says."""
        block_sums(x, gy, dy, dx, tile_channel, origin, rows, partials)
        reduce_blocks(partials, gw)

    return Launcher(fwd), wgrad
