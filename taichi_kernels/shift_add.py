"""Shift-add: ``y[b,c,h,w] = sum_{t in c} u[b, t, h + sy[t], w + sx[t]]`` (zero outside ``u``).

Forward is a gather over each channel's tiles (deterministic, no atomics); backward is the
transposed gather ``gu[b,t,a,e] = gy[b, c(t), a - sy[t], e - sx[t]]``.

``"cpu"`` style: one work item per output row segment of ``WC`` columns, summed in a local
array (a ``+=`` on a global array in the column loop is not vectorised: every store might
alias the argument buffer), with the valid column range of each tile computed once per row so
that the column loop is branch-free and contiguous. ``"gpu"`` style: one thread per element.

``shift_add_aligned_kernel``: a CPU forward for the common case of uniform plans (``K`` tiles
per channel) whose tiles all cover every output column (``0 <= shift_x <= Wu - W``, e.g. tall
strips such as 51x5): the loop over tiles is unrolled inside the column loop, so each output
vector is one pass of ``K`` loads and adds instead of ``K`` loops with their setup (paper case,
124 x 128 x 128, 51x5: 32 -> 25 ms on one thread; ``benchmarks/NOTES.md``).
"""
import functools

import taichi as ti

WC = 64  # output columns one CPU work item accumulates


@functools.lru_cache(maxsize=None)
def shift_add_kernels(dtype_name: str, style: str = "cpu"):
    """``(fwd, bwd)`` kernels for ``dtype_name`` in {"float32", "float64"}."""
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    if style not in ("cpu", "gpu"):
        raise ValueError(f"unknown kernel style {style!r}")
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.kernel
    def fwd_cpu(u: arr4,  # (B, T, Hu, Wu) per-tile small-conv outputs
                offsets: idx1,  # (C + 1,) CSR: channel c owns tiles offsets[c]:offsets[c+1]
                sy: idx1, sx: idx1,  # (T,) row / column shift of each tile
                y: arr4):  # (B, C, H, W) output, fully overwritten
        hu, wu = u.shape[2], u.shape[3]
        width = y.shape[3]
        nchunk = (width + WC - 1) // WC
        for b, c, h, chunk in ti.ndrange(y.shape[0], y.shape[1], y.shape[2], nchunk):
            w0 = chunk * WC
            wn = ti.min(WC, width - w0)
            acc = ti.Vector.zero(dt, WC)
            for t in range(offsets[c], offsets[c + 1]):
                r = h + sy[t]
                if 0 <= r < hu:
                    s = w0 + sx[t]
                    for q in range(ti.max(0, -s), ti.min(wn, wu - s)):
                        acc[q] += u[b, t, r, q + s]
            for q in range(wn):
                y[b, c, h, w0 + q] = acc[q]

    @ti.kernel
    def bwd_cpu(gy: arr4,  # (B, C, H, W) gradient of the output
                tile_channel: idx1,  # (T,) owning channel of each tile
                sy: idx1, sx: idx1,
                gu: arr4):  # (B, T, Hu, Wu) gradient of u, fully overwritten
        height, width = gy.shape[2], gy.shape[3]
        wu = gu.shape[3]
        for b, t, a in ti.ndrange(gu.shape[0], gu.shape[1], gu.shape[2]):
            c = tile_channel[t]
            h = a - sy[t]
            s = sx[t]
            lo = ti.min(ti.max(0, s), wu)
            hi = ti.max(ti.min(wu, width + s), lo)
            if 0 <= h < height:
                for e in range(lo):
                    gu[b, t, a, e] = ti.cast(0, dt)
                for e in range(lo, hi):
                    gu[b, t, a, e] = gy[b, c, h, e - s]
                for e in range(hi, wu):
                    gu[b, t, a, e] = ti.cast(0, dt)
            else:
                for e in range(wu):
                    gu[b, t, a, e] = ti.cast(0, dt)

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

    return (fwd_cpu, bwd_cpu) if style == "cpu" else (fwd_gpu, bwd_gpu)


MAX_ALIGNED_TILES = 32  # the aligned kernel unrolls its tile loop; more tiles compile too slowly


@functools.lru_cache(maxsize=None)
def shift_add_aligned_kernel(dtype_name: str, k: int):
    """CPU forward for a uniform plan of ``k`` tiles per channel with ``0 <= sx <= Wu - W``."""
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    if not 1 <= k <= MAX_ALIGNED_TILES:
        raise ValueError(f"k must be in 1..{MAX_ALIGNED_TILES}, got {k}")
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.kernel
    def fwd_aligned(u: arr4,  # (B, C * k, Hu, Wu); channel c owns tiles c*k .. c*k + k - 1
                    sy: idx1, sx: idx1,  # (C * k,) shifts; every sx in [0, Wu - W]
                    y: arr4):  # (B, C, H, W), fully overwritten
        hu = u.shape[2]
        width = y.shape[3]
        nchunk = (width + WC - 1) // WC
        for b, c, h, chunk in ti.ndrange(y.shape[0], y.shape[1], y.shape[2], nchunk):
            w0 = chunk * WC
            wn = ti.min(WC, width - w0)
            row = ti.Vector.zero(ti.i32, k)  # the row of u each tile reads (0 for tiles off the map)
            col = ti.Vector.zero(ti.i32, k)  # its column for acc[0]
            inside = ti.Vector.zero(ti.i32, k)
            for j in ti.static(range(k)):
                r = h + sy[c * k + j]
                if 0 <= r < hu:
                    row[j] = r
                    inside[j] = 1
                col[j] = w0 + sx[c * k + j]
            acc = ti.Vector.zero(dt, WC)
            for q in range(wn):  # reads stay inside each row: sx in [0, Wu - W]
                v = ti.cast(0, dt)
                for j in ti.static(range(k)):  # select, not multiply: a NaN off the map stays out
                    v += ti.select(inside[j] != 0, u[b, c * k + j, row[j], q + col[j]], ti.cast(0, dt))
                acc[q] = v
            for q in range(wn):
                y[b, c, h, w0 + q] = acc[q]

    return fwd_aligned
