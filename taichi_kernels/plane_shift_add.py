"""Shift-add over shared planes: ``y[b,c,h,w] = sum_{t in c} x[b, src[t], h + s*sy[t], w + s*sx[t]]``.

One gather computes both directions of ``shiftwise.plane_shift_add`` (entries ``(out, plane, dy,
dx)``, several per plane): the forward reads the planes with the entries grouped by output channel
(``src`` = plane, ``s = +1``); its adjoint reads the output gradient with the same entries grouped
by plane (``src`` = output channel, ``s = -1``), so every element of either result is one thread's
sum in a fixed order: deterministic, no atomics. Zero outside ``x``.

``"cpu"`` style: a work item is ``ROWS`` destination rows of one channel, each row summed in
segments of ``WC`` columns in a local array, with each entry's valid column range computed once per
row so that the column loop is branch-free (as ``shift_add``). ``"gpu"`` style: one thread per
element.
"""
import functools

import taichi as ti

from .fused import output_type, store_row
from .launch import Launcher

WC = 64  # destination columns a CPU work item accumulates at a time (as shift_add.WC)
ROWS = 32  # destination rows per CPU work item


@functools.lru_cache(maxsize=None)
def plane_shift_add_kernels(dtype_name: str, style: str = "cpu", stores: str = "one"):
    """The gather kernel for ``dtype_name`` in {"float32", "float64"} and ``style`` in {"cpu",
    "gpu"}; ``stores``: how the CPU kernel writes its output (``fused.STORE_MODES``).

    CPU style arguments: ``(x, offsets, src, sy, sx, sign, height, width, y_flat)``; GPU style:
    ``(x, offsets, src, sy, sx, sign, y)``."""
    dt = {"float32": ti.f32, "float64": ti.f64}[dtype_name]
    if style not in ("cpu", "gpu"):
        raise ValueError(f"unknown kernel style {style!r}")
    if stores != "one" and style != "cpu":
        raise ValueError(f"{stores} stores are for the cpu style")
    out1 = output_type(dt, stores)
    arr4 = ti.types.ndarray(dtype=dt, ndim=4)
    idx1 = ti.types.ndarray(dtype=ti.i32, ndim=1)

    @ti.kernel
    def gather_cpu(x: arr4,  # (B, S, Hx, Wx) source: planes, or the output gradient
                   offsets: idx1,  # (C + 1,) CSR: destination channel c owns entries offsets[c]:offsets[c+1]
                   src: idx1,  # (E,) source channel of each entry
                   sy: idx1, sx: idx1,  # (E,) row / column shift of each entry
                   sign: ti.i32,  # +1: read at h + sy; -1: read at h - sy (the adjoint)
                   height: ti.i32, width: ti.i32,  # destination size
                   y: out1):  # (B, C, height, width) flattened (fused.STORE_MODES), overwritten
        hx, wx = x.shape[2], x.shape[3]
        channels = offsets.shape[0] - 1
        for b, c, hb in ti.ndrange(x.shape[0], channels, (height + ROWS - 1) // ROWS):
            for h in range(hb * ROWS, ti.min(height, hb * ROWS + ROWS)):
                for chunk in range((width + WC - 1) // WC):
                    w0 = chunk * WC
                    wn = ti.min(WC, width - w0)
                    acc = ti.Vector.zero(dt, WC)
                    for t in range(offsets[c], offsets[c + 1]):
                        r = h + sign * sy[t]
                        if 0 <= r < hx:
                            s = w0 + sign * sx[t]
                            k = src[t]
                            for q in range(ti.max(0, -s), ti.min(wn, wx - s)):
                                acc[q] += x[b, k, r, q + s]
                    store_row(y, ((b * channels + c) * height + h) * width + w0, acc, wn, ti.cast(0, dt), stores)

    @ti.kernel
    def gather_gpu(x: arr4, offsets: idx1, src: idx1, sy: idx1, sx: idx1, sign: ti.i32, y: arr4):
        hx, wx = x.shape[2], x.shape[3]
        for b, c, h, w in ti.ndrange(y.shape[0], y.shape[1], y.shape[2], y.shape[3]):
            acc = ti.cast(0, dt)
            for t in range(offsets[c], offsets[c + 1]):
                r = h + sign * sy[t]
                e = w + sign * sx[t]
                if 0 <= r < hx and 0 <= e < wx:
                    acc += x[b, src[t], r, e]
            y[b, c, h, w] = acc

    return Launcher(gather_cpu) if style == "cpu" else Launcher(gather_gpu)
