"""How close can a Taichi kernel get to the shift-add's bandwidth floor on this machine?

Times, on the same ``u`` (the decomposed path's per-tile planes, SLaK-T stage 1 by default):

* ``shift_add``: the production Taichi kernel (``shiftwise.ops.shift_add_fwd``);
* ``read_all``: a Taichi kernel that only reads every byte of ``u`` in order (8-float vector
  loads, 4 independent sums), the best case for the prefetchers;
* ``read_windows``: a Taichi kernel that only reads the bytes the shift-add needs (each tile's
  valid rows, 7 vector loads per row, 7 independent sums), in the production kernel's order
  of work (channel, then blocks of 8 output rows, then tiles): no output, no bounds, no sums
  to keep, so no kernel doing the real work can be faster;
* the floor of ``shiftwise bench``: bytes the stage must move / the large copy's rate, and the
  same bytes at the rate of a large ``sum`` (read only).

Each probe runs in its own Taichi runtime (``real_matrix_scalarize=False`` keeps the vector
loads as vector loads), so run it as a script::

    python benchmarks/shift_add_ceiling.py [--case slak_t.s1] [--batch-size 4] [--threads 2]

Findings on a 2-core CPU: ``benchmarks/NOTES.md``.
"""
import argparse

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="slak_t.s1")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import taichi as ti
    ti.init(arch=ti.cpu, cpu_max_num_threads=args.threads, log_level=ti.WARN, real_matrix_scalarize=False)
    from shiftwise import ops
    from shiftwise.bench import PRESETS, copy_bandwidth, make_layer, shift_add_bytes, time_calls
    from shiftwise.functional import decomposed_planes

    case = next(c for p in PRESETS.values() for c in p if c.name == args.case)
    layer = make_layer(case, "cpu", torch.float32)
    plan = layer.plan
    x = torch.randn(args.batch_size, case.channels, case.height, case.width)
    with torch.no_grad():  # the planes and shifts the decomposed path uses
        u, sy, sx = decomposed_planes(x, layer.tiles, plan)
    u, sy, sx = u.contiguous(), sy.to(torch.int32), sx.to(torch.int32)
    h, w = case.height, case.width
    hu, wu = u.shape[-2:]
    moved = shift_add_bytes(plan, tuple(x.shape), 4)
    cpu = torch.device("cpu")
    big = torch.ones(32 << 20)  # 128 MB: out of cache
    bw = {"copy": copy_bandwidth(cpu), "read": big.numel() * 4 / (time_calls(big.sum, cpu, 10, 2)["median_ms"] / 1e3)}
    del big

    vec8 = ti.types.vector(8, ti.f32)
    arrv = ti.types.ndarray(dtype=vec8, ndim=1)
    idx = ti.types.ndarray(dtype=ti.i32, ndim=1)
    out = ti.types.ndarray(dtype=ti.f32, ndim=2)

    @ti.kernel
    def read_all(u8: arrv, per_item: ti.i32, sink: out):
        ti.loop_config(block_dim=1)
        for item in range(sink.shape[0]):
            a0 = ti.Vector.zero(ti.f32, 8)
            a1 = ti.Vector.zero(ti.f32, 8)
            a2 = ti.Vector.zero(ti.f32, 8)
            a3 = ti.Vector.zero(ti.f32, 8)
            base = item * per_item
            for j in range(per_item // 4):
                a0 += u8[base + 4 * j]
                a1 += u8[base + 4 * j + 1]
                a2 += u8[base + 4 * j + 2]
                a3 += u8[base + 4 * j + 3]
            s = a0 + a1 + a2 + a3
            for k in ti.static(range(8)):
                sink[item, k] = s[k]

    @ti.kernel
    def read_windows(u8: arrv, batch: ti.i32, hu: ti.i32, wu: ti.i32, ntile: ti.i32, height: ti.i32, offsets: idx,
                     sy: idx, sx: idx, sink: out):
        ngroup = (height + 7) // 8
        nchan = offsets.shape[0] - 1
        for b, c, g in ti.ndrange(batch, nchan, ngroup):
            a0 = ti.Vector.zero(ti.f32, 8)
            a1 = ti.Vector.zero(ti.f32, 8)
            a2 = ti.Vector.zero(ti.f32, 8)
            a3 = ti.Vector.zero(ti.f32, 8)
            a4 = ti.Vector.zero(ti.f32, 8)
            a5 = ti.Vector.zero(ti.f32, 8)
            a6 = ti.Vector.zero(ti.f32, 8)
            for t in range(offsets[c], offsets[c + 1]):
                r0 = ti.max(0, sy[t] + 8 * g)
                r1 = ti.min(hu, ti.min(height, 8 * g + 8) + sy[t])
                e0 = ti.max(0, sx[t])
                for r in range(r0, r1):
                    k = (((b * ntile + t) * hu + r) * wu + e0) // 8
                    a0 += u8[k]
                    a1 += u8[k + 1]
                    a2 += u8[k + 2]
                    a3 += u8[k + 3]
                    a4 += u8[k + 4]
                    a5 += u8[k + 5]
                    a6 += u8[k + 6]
            s = a0 + a1 + a2 + a3 + a4 + a5 + a6
            for k in ti.static(range(8)):
                sink[(b * nchan + c) * ngroup + g, k] = s[k]

    if u.numel() % 8 or u.shape[-1] < 56:
        raise SystemExit(f"the read probes need planes of >= 56 columns and a multiple of 8 elements; "
                         f"{case.name} gives u of shape {tuple(u.shape)} (try slak_t.s1 or paper)")
    u8 = u.view(-1, 8)
    items = 64 * args.threads
    per_item = (u8.shape[0] // items) // 4 * 4
    sink = torch.zeros(items, 8)
    sink2 = torch.zeros(args.batch_size * plan.channels * ((h + 7) // 8), 8)
    results = {
        "read_all": time_calls(lambda: read_all(u8, per_item, sink), cpu, 10, 1)["median_ms"],
        "read_windows": time_calls(lambda: read_windows(u8, args.batch_size, hu, wu, u.shape[1], h, plan.offsets, sy, sx, sink2), cpu, 10, 1)["median_ms"],
        # last: shiftwise starts its own Taichi runtime (ti.init), which discards the probes' one
        "shift_add": time_calls(lambda: ops.shift_add_fwd(u, plan.offsets, sy, sx, (h, w)), cpu, 10, 1)["median_ms"],
    }
    floor = moved / bw["copy"] * 1e3
    read_floor = moved / bw["read"] * 1e3
    print(f"{case.name}, batch {args.batch_size}, {args.threads} threads: u {u.numel() * 4 / 1e6:.0f} MB, "
          f"the stage must move {moved / 1e6:.0f} MB; copy {bw['copy'] / 1e9:.1f} GB/s, read {bw['read'] / 1e9:.1f} GB/s")
    print(f"  floor (copy rate) {floor:.2f} ms, at read rate {read_floor:.2f} ms")
    for name, ms in results.items():
        nbytes = u.numel() * 4 if name == "read_all" else moved
        print(f"  {name:13s} {ms:7.2f} ms  {ms / floor:5.2f}x the floor  ({nbytes / ms / 1e6:5.1f} GB/s of the bytes it reads)")


if __name__ == "__main__":
    main()
