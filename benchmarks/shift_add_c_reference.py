"""The shift-add stage's Taichi kernel against the same loop compiled by a C compiler.

The floor of ``shiftwise bench`` (a copy of the bytes the stage moves) says how far the stage
is from the memory system; this script says how much of that gap a better code generator
would close. It compiles a plain C version of the CPU forward (work items of 32 output rows
of one channel, 64-column accumulators, each tile's valid rows and columns computed once per
row: the loop ``taichi_kernels.shift_add`` describes) with ``cc -O3 -march=native`` into a
temporary directory, runs it from as many Python threads as PyTorch uses (``ctypes`` drops
the GIL; each thread takes an equal, contiguous share of the work items), and times it in
rounds alternating with the production kernel (``shiftwise.ops.shift_add_fwd``, the call the
bench times) and with the bench's copy floor (a copy of at least 128 MB, scaled to the bytes
the stage moves), on the same planes, into preallocated outputs::

    python benchmarks/shift_add_c_reference.py [--case paper] [--density 0.25] [--rounds 20]

Needs a C compiler (``cc``; set ``CC`` for another). Checks both outputs against the torch
reference first. Findings on a 2-core CPU: ``benchmarks/NOTES.md``.
"""
import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

C_SOURCE = r"""
#include <string.h>
void shift_add(const float *u, int T, int Hu, int Wu, const int *off, const int *sy, const int *sx,
               int C, int H, int W, float *y, int rows, int i0, int i1) {
    int blocks = (H + rows - 1) / rows;
    for (int it = i0; it < i1; it++) {
        int hb = it % blocks, c = (it / blocks) % C, b = it / blocks / C;
        int hend = (hb + 1) * rows < H ? (hb + 1) * rows : H;
        for (int h = hb * rows; h < hend; h++) {
            float *o = y + (((long)b * C + c) * H + h) * W;
            for (int w0 = 0; w0 < W; w0 += 64) {
                int wn = W - w0 < 64 ? W - w0 : 64;
                float acc[64] = {0};
                for (int t = off[c]; t < off[c + 1]; t++) {
                    int r = h + sy[t];
                    if (r < 0 || r >= Hu) continue;
                    int s = w0 + sx[t];
                    int lo = s < 0 ? -s : 0, hi = Wu - s < wn ? Wu - s : wn;
                    const float *p = u + (((long)b * T + t) * Hu + r) * Wu + s;
                    for (int q = lo; q < hi; q++) acc[q] += p[q];
                }
                memcpy(o + w0, acc, sizeof(float) * wn);
            }
        }
    }
}
"""


def build(tmp: str) -> ctypes.CDLL:
    src, lib = os.path.join(tmp, "shift_add.c"), os.path.join(tmp, "shift_add.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", src, "-o", lib], check=True)
    return ctypes.CDLL(lib)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="paper", help="a case of shiftwise.bench.PRESETS (default: paper)")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    from shiftwise import ops, reference
    from shiftwise.functional import decomposed_planes
    from shiftwise.bench import (FLOOR_BUFFER_MAX, FLOOR_BUFFER_MIN, PRESETS, compact, make_layer, settle,
                                 shift_add_bytes, shift_add_stage)

    case = {c.name: c for cs in PRESETS.values() for c in cs}[args.case]
    layer = make_layer(case, "cpu", torch.float32)
    h, w = case.height, case.width
    tiles, plan, sy, sx = shift_add_stage(*compact(layer.tiles, layer.plan, args.density), (h, w))
    sy, sx, off = sy.contiguous(), sx.contiguous(), plan.offsets.to(torch.int32).contiguous()
    x = torch.randn(args.batch_size, case.channels, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the planes the decomposed path makes (shift_add_stage's shifts index them)
        u = decomposed_planes(x, tiles, plan)[0].contiguous()
    b, t_count, hu, wu = u.shape
    y_taichi, y_c = (torch.empty(b, plan.channels, h, w) for _ in range(2))
    moved = shift_add_bytes(plan, tuple(x.shape), 4)  # as the bench counts them
    buffer = min(max(moved, FLOOR_BUFFER_MIN), FLOOR_BUFFER_MAX)  # as the bench: out of cache, scaled
    src = torch.randn(buffer // 8)
    dst = torch.empty_like(src)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads)
    items = b * plan.channels * -(-h // 32)
    bounds = [items * i // threads for i in range(threads + 1)]
    P = ctypes.c_void_p
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)

        def c_kernel():
            futures = [pool.submit(lib.shift_add, P(u.data_ptr()), t_count, hu, wu, P(off.data_ptr()),
                                   P(sy.data_ptr()), P(sx.data_ptr()), plan.channels, h, w, P(y_c.data_ptr()), 32,
                                   i0, i1) for i0, i1 in zip(bounds[:-1], bounds[1:])]
            for f in futures:
                f.result()

        fns = {"copy floor": lambda: dst.copy_(src),
               "taichi": lambda: ops.shift_add_fwd(u, off, sy, sx, (h, w), out=y_taichi),
               "c": c_kernel}
        for fn in fns.values():
            fn()
        want = reference.shift_add(u.double(), off, sy, sx, (h, w))
        for name, y in (("taichi", y_taichi), ("c", y_c)):
            err = float((y.double() - want).abs().max())
            if err > 1e-4:
                raise SystemExit(f"{name} kernel disagrees with the torch reference (max error {err:.3g})")
        times = {k: [] for k in fns}
        order = list(fns)
        cpu = torch.device("cpu")
        for r in range(args.rounds):
            for name in order if r % 2 else order[::-1]:
                settle(cpu)
                fns[name]()
                fns[name]()
                calls = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    fns[name]()
                    calls.append(time.perf_counter() - t0)
                times[name].append(statistics.median(calls) * (moved / buffer if name == "copy floor" else 1))
    print(f"{args.case} d={args.density:g} batch {b}: {t_count} tiles, {moved / 1e6:.1f} MB moved, {threads} threads, "
          f"{args.rounds} rounds")
    for name in order:
        ratios = sorted(a / f for a, f in zip(times[name], times["copy floor"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"  {name:10s} median {statistics.median(times[name]) * 1e3:7.2f} ms   "
              f"x floor: median {statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f})")
    ratios = sorted(a / c for a, c in zip(times["taichi"], times["c"]))
    print(f"  taichi / c per round: median {statistics.median(ratios):.2f} "
          f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
