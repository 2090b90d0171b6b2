"""Shift-add: ``y[b,c,h,w] = sum_{t in c} u[b, t, h + sy[t], w + sx[t]]`` (zero outside ``u``).

Forward is a gather over each channel's tiles (deterministic, no atomics); backward is the
transposed gather ``gu[b,t,a,e] = gy[b, c(t), a - sy[t], e - sx[t]]``. Both compute the valid
column range of each tile once per row, so the innermost loop is branch-free and contiguous.
"""
import functools

import taichi as ti


@functools.lru_cache(maxsize=None)
def shift_add_kernels(dtype_name: str):
    """``(fwd, bwd)`` kernels for ``dtype_name`` in {"float32", "float64"}."""
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.kernel
    def fwd(u: arr4,  # (B, T, Hu, Wu) per-tile small-conv outputs
            offsets: idx1,  # (C + 1,) CSR: channel c owns tiles offsets[c]:offsets[c+1]
            sy: idx1, sx: idx1,  # (T,) row / column shift of each tile
            y: arr4):  # (B, C, H, W) output, fully overwritten
        hu, wu = u.shape[2], u.shape[3]
        width = y.shape[3]
        for b, c, h in ti.ndrange(y.shape[0], y.shape[1], y.shape[2]):
            for w in range(width):
                y[b, c, h, w] = ti.cast(0, dt)
            for t in range(offsets[c], offsets[c + 1]):
                r = h + sy[t]
                if 0 <= r < hu:
                    s = sx[t]
                    lo = ti.max(0, -s)
                    hi = ti.min(width, wu - s)
                    for w in range(lo, hi):
                        y[b, c, h, w] = y[b, c, h, w] + u[b, t, r, w + s]

    @ti.kernel
    def bwd(gy: arr4,  # (B, C, H, W) gradient of the output
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
            hi = ti.min(wu, width + s)
            if 0 <= h < height:
                for e in range(lo):
                    gu[b, t, a, e] = ti.cast(0, dt)
                for e in range(lo, hi):
                    gu[b, t, a, e] = gy[b, c, h, e - s]
                for e in range(ti.max(lo, hi), wu):
                    gu[b, t, a, e] = ti.cast(0, dt)
            else:
                for e in range(wu):
                    gu[b, t, a, e] = ti.cast(0, dt)

    return fwd, bwd
