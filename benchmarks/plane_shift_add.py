"""The general shift-add (shared planes) on a shift-wise layer's shape: Taichi kernels vs the PyTorch twin.

Default shape: SW-T stage 1 (``repN = 60`` shift-wise channels of C = 80, ``nk = 17`` planes per
channel from 3 x 3 kernels with padding 2, so ``(B, 1020, 58, 58)`` planes; 180 outputs of 56 x 56:
per channel 68 horizontal entries, 68 vertical, 4 identity picks, ``N_rep = 4``). Entry offsets
follow the official layer's (``K = 51``, ``k = 3``); the shuffles are drawn here (timing does not
depend on them). Checks the Taichi result against the twin first, then times each path's forward
and its backward alone (the graph is built untimed before each timed backward); medians of
``--repeats`` runs after one warm-up.

Then the whole stage as a layer computes it from ``x`` (``(B, repN, H, W)``) and the plane kernels
(``(P, k, k)``), both ways, forward and a training step (forward + backward to ``x`` and the
kernels): ``planes`` = grouped ``F.conv2d`` (padding ``k - 1``) then the Taichi shift-add;
``weights`` = the three sums as three ``shiftwise_conv2d`` calls (fused Taichi kernel) whose ``k x k``
tiles are the plane kernels summed per position (the sums are linear in the kernels), checked
equal first::

    python benchmarks/plane_shift_add.py [--batch-size 8] [--threads 2] [--repeats 5]

Measured with the defaults on a 2-core CPU (torch 2.13, Taichi 1.7.4, load average below 1.2),
milliseconds, two runs: the shift-add alone, Taichi 65-68 forward and 111-118 backward, the twin
351-403 and 378-384 (about 60 of the Taichi backward is the first touch of its fresh 110 MB
gradient: ``torch.zeros`` of that size takes 57); the stage from ``x``, ``planes`` 106-150
forward and 218-221 a training step, ``weights`` 41-44 and 161-166.
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from shiftwise import ShiftAddPlan, TilePlan, plane_shift_add, shiftwise_conv2d


def sw_entries(rep_n: int, big: int, small: int, n_rep: int, seed: int = 0):
    """``(out, plane, dy, dx)`` int64 tensors of a shift-wise layer's three sums."""
    g = torch.Generator().manual_seed(seed)
    nk = math.ceil(big / small)
    pad = torch.tensor([big // 2 - q * small - (small - 1) for q in range(nk)])
    extra = (small - 1) - small // 2
    out, plane, dy, dx = [], [], [], []
    for r in range(rep_n):
        planes = torch.arange(nk) + r * nk
        for axis in (0, 1):
            for _ in range(n_rep):
                shift = -pad[torch.argsort(torch.randperm(nk, generator=g))]  # plane j at slot perm^-1[j]
                fixed = torch.full((nk,), extra)
                out.append(torch.full((nk,), axis * rep_n + r))
                plane.append(planes)
                dy.append(fixed if axis == 0 else shift)
                dx.append(shift if axis == 0 else fixed)
        picks = torch.randint(nk, (n_rep,), generator=g) + r * nk
        out.append(torch.full((n_rep,), 2 * rep_n + r))
        plane.append(picks)
        dy.append(torch.full((n_rep,), extra))
        dx.append(torch.full((n_rep,), extra))
    return [torch.cat(v) for v in (out, plane, dy, dx)], 3 * rep_n, rep_n * nk


def weight_space(plan: ShiftAddPlan, rep_n: int, small: int):
    """``[(TilePlan, entry index, tile index)]`` for each of the three sums: output ``a * rep_n + r``
    is channel ``r`` of sum ``a``; an entry's plane kernel lands on the tile at its centre offset
    ``(dy - small // 2, dx - small // 2)`` (the planes are "full" convs), coincident ones summed."""
    out, plane, dy, dx = (t.tolist() for t in (plan.out_channel, plan.plane, plan.dy, plan.dx))
    sums = []
    for a in range(3):
        per_channel = [dict() for _ in range(rep_n)]
        entries, tiles = [], []
        for e, o in enumerate(out):
            if o // rep_n != a:
                continue
            pos = per_channel[o % rep_n]
            entries.append(e)
            tiles.append(pos.setdefault((dy[e] - small // 2, dx[e] - small // 2), len(pos)))
        starts = [0]
        for pos in per_channel:
            starts.append(starts[-1] + len(pos))
        tiles = [starts[out[e] % rep_n] + t for e, t in zip(entries, tiles)]
        tplan = TilePlan.from_lists([list(pos) for pos in per_channel], small)
        sums.append((tplan, torch.tensor([plane[e] for e in entries]), torch.tensor(tiles)))
    return sums


def weights_path(x, kernels, sums):
    ys = []
    for tplan, entries, tiles in sums:
        w = kernels.new_zeros(tplan.num_tiles, *kernels.shape[1:]).index_add(0, tiles, kernels[entries])
        ys.append(shiftwise_conv2d(x, w, tplan, backend="taichi"))
    return torch.cat(ys, 1)


def planes_path(x, kernels, plan, small):
    u = F.conv2d(x, kernels[:, None], padding=small - 1, groups=x.shape[1])
    return plane_shift_add(u, plan, x.shape[2:], backend="taichi")


def _median_ms(fn, repeats: int, setup=None) -> float:
    times = []
    for i in range(repeats + 1):  # the first run warms up
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=60, help="shift-wise channels (repN)")
    ap.add_argument("--size", type=int, default=56, help="output height and width")
    ap.add_argument("--kernel", type=int, default=51)
    ap.add_argument("--small", type=int, default=3)
    ap.add_argument("--n-rep", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    (out, plane, dy, dx), num_outputs, num_planes = sw_entries(args.channels, args.kernel, args.small, args.n_rep)
    plan = ShiftAddPlan.from_entries(out, plane, dy, dx, num_outputs, num_planes)
    hw = (args.size, args.size)
    side = args.size + args.small - 1
    u = torch.randn(args.batch_size, num_planes, side, side, requires_grad=True)
    gy = torch.randn(args.batch_size, num_outputs, *hw)
    print(f"planes {tuple(u.shape)}, output {(args.batch_size, num_outputs, *hw)}, {plan}, "
          f"{args.threads} threads, float32")

    with torch.no_grad():
        y_t = plane_shift_add(u, plan, hw, backend="taichi")
        y_r = plane_shift_add(u, plan, hw, backend="torch")
    assert torch.allclose(y_t, y_r, rtol=1e-5, atol=1e-4), (y_t - y_r).abs().max()
    g_t, = torch.autograd.grad(plane_shift_add(u, plan, hw, backend="taichi"), u, gy)
    g_r, = torch.autograd.grad(plane_shift_add(u, plan, hw, backend="torch"), u, gy)
    assert torch.allclose(g_t, g_r, rtol=1e-5, atol=1e-4), (g_t - g_r).abs().max()
    del y_t, y_r, g_t, g_r

    rows = {}
    for backend in ("taichi", "torch"):
        def forward(_):
            with torch.no_grad():
                plane_shift_add(u, plan, hw, backend=backend)

        def backward(y):
            torch.autograd.grad(y, u, gy)

        rows[backend] = (_median_ms(forward, args.repeats),
                         _median_ms(backward, args.repeats, lambda: plane_shift_add(u, plan, hw, backend=backend)))
    print(f"{'path':8} {'forward ms':>11} {'backward ms':>12}")
    for backend, (f, b) in rows.items():
        print(f"{backend:8} {f:11.1f} {b:12.1f}")
    (tf, tb), (rf, rb) = rows["taichi"], rows["torch"]
    print(f"twin / taichi: forward {rf / tf:.2f}x, backward {rb / tb:.2f}x")

    # the whole stage from x and the plane kernels: planes, or weight space
    del u, gy
    x = torch.randn(args.batch_size, args.channels, *hw, requires_grad=True)
    kernels = torch.randn(num_planes, args.small, args.small, requires_grad=True)
    sums = weight_space(plan, args.channels, args.small)
    gy = torch.randn(args.batch_size, num_outputs, *hw)
    with torch.no_grad():
        y_p, y_w = planes_path(x, kernels, plan, args.small), weights_path(x, kernels, sums)
    assert torch.allclose(y_p, y_w, rtol=1e-4, atol=1e-3 * y_p.abs().max().item()), (y_p - y_w).abs().max()
    del y_p, y_w
    print(f"stage from x {tuple(x.shape)} and kernels {tuple(kernels.shape)}; weight space: "
          + ", ".join(f"{t.num_tiles} tiles" for t, _, _ in sums))
    print(f"{'path':8} {'forward ms':>11} {'train step ms':>14}")
    for name, fn in (("planes", lambda: planes_path(x, kernels, plan, args.small)),
                     ("weights", lambda: weights_path(x, kernels, sums))):
        def fwd(_):
            with torch.no_grad():
                fn()

        def step(_):
            torch.autograd.grad(fn(), (x, kernels), gy)

        print(f"{name:8} {_median_ms(fwd, args.repeats):11.1f} {_median_ms(step, args.repeats):14.1f}")


if __name__ == "__main__":
    main()
