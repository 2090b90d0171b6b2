"""Shift-add: ``y[b,c,h,w] = sum_{t in c} u[b, t, h + sy[t], w + sx[t]]`` (zero outside ``u``).

Forward is a gather over each channel's tiles (deterministic, no atomics); backward is the
transposed gather ``gu[b,t,a,e] = gy[b, c(t), a - sy[t], e - sx[t]]``.

``"cpu"`` style: the forward's work item is ``ROWS`` output rows of one channel, each row
summed in segments of ``WC`` columns in a local array (a ``+=`` on a global array in the column
loop is not vectorised: every store might alias the argument buffer), with the valid column
range of each tile computed once per row so that the column loop is branch-free and contiguous;
float32 rows are stored two values at a time where the output allows (``fused.STORE_MODES``).
The backward's work item is one row of ``gu``. ``"gpu"`` style: one thread per element.
"""
import functools

import taichi as ti

from .fused import output_type, store_row
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

    return (Launcher(fwd_cpu), Launcher(bwd_cpu)) if style == "cpu" else (Launcher(fwd_gpu), Launcher(bwd_gpu))
