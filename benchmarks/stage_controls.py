"""The shift-add stage against its copy floor and two controls, on the CPU.

For each density, the decomposed path's shift-add stage (as ``shiftwise bench`` times it,
``sw_shift_add@d``) is timed in rounds alternating with:

* the copy floor: a ``copy_`` of the bytes the stage must move (half read, half written);
* the read floor: a ``sum`` that reads the same number of bytes;
* PyTorch's own reduction of ``k`` inputs into one output (``torch.sum`` over a ``(k, n)``
  tensor, ``k`` the stage's read-to-write ratio rounded half up, at most 64), moving the same
  bytes: what reading ``k`` streams per output costs on this machine whoever runs the loop.

All times are scaled to the stage's bytes; every multiple is the median over rounds of the
per-round ratio. Before timing, glibc is asked to keep freed memory in the process (no
trimming; allocations up to 32 MiB from the heap), so that repeated calls reuse pages instead
of faulting in new ones; ``--system-malloc`` leaves malloc as configured::

    python benchmarks/stage_controls.py [--case paper] [--densities 1,0.5,0.25] [--batch-size 4] [--rounds 10]
"""
import argparse
import ctypes
import statistics
import sys

import torch

SUM_INPUTS_MAX = 64


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory (no trimming; allocations up to 32 MiB, its
    maximum, from the heap). Process-wide and permanent; returns what was done (``"system"``
    if not glibc)."""
    if not sys.platform.startswith("linux"):
        return "system"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "system"
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    trim = mallopt(m_trim_threshold, 2**31 - 1) == 1
    mmap = mallopt(m_mmap_threshold, 32 << 20) == 1
    return "glibc: freed memory kept" if trim and mmap else "system"


def controls(fn, moved: int, written: int, rounds: int, block: int = 3) -> dict:
    """``fn`` in rounds with the copy floor, the read floor and the k-input sum (see above)."""
    from shiftwise.bench.timing import FLOOR_BUFFER_MAX, FLOOR_BUFFER_MIN, SETTLE_CALLS, settle, time_once

    cpu = torch.device("cpu")
    buffer = min(max(moved, FLOOR_BUFFER_MIN), FLOOR_BUFFER_MAX)
    n = max(2, buffer // 8)
    src, dst, whole = torch.ones(n), torch.empty(n), torch.ones(2 * n)
    k = min(SUM_INPUTS_MAX, max(1, int((moved - written) / written + 0.5)))
    n_out = max(2, buffer // (4 * (k + 1)))
    inputs, output = torch.ones(k, n_out), torch.empty(n_out)
    stages = {"stage": fn, "copy": lambda: dst.copy_(src), "read": whole.sum,
              "sum": lambda: torch.sum(inputs, 0, out=output)}
    scales = {"stage": 1.0, "copy": moved / buffer, "read": moved / buffer, "sum": moved / (4 * (k + 1) * n_out)}
    for stage in stages.values():
        stage()
    per_round = {name: [] for name in stages}
    for _ in range(rounds):
        for name, stage in stages.items():
            settle(cpu)
            for _ in range(SETTLE_CALLS):
                stage()
            per_round[name].append(statistics.median(time_once(stage, cpu) * scales[name] for _ in range(block)))

    def multiple(a, b):
        return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
    return {"stage_ms": statistics.median(per_round["stage"]), "floor_ms": statistics.median(per_round["copy"]),
            "floor_multiple": multiple("stage", "copy"), "read_floor_multiple": multiple("stage", "read"),
            "sum_inputs": k, "sum_multiple": multiple("stage", "sum"), "sum_floor_multiple": multiple("sum", "copy")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="paper", help="a layer of a shiftwise bench preset")
    ap.add_argument("--densities", default="1,0.5,0.25")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc as configured")
    args = ap.parse_args()
    malloc = "system" if args.system_malloc else keep_freed_memory()

    from shiftwise import bench

    case = {c.name: c for cs in bench.PRESETS.values() for c in cs}[args.case]
    case = bench.with_densities([case], [float(d) for d in args.densities.split(",")])[0]
    layer = bench.make_layer(case, "cpu", torch.float32)
    x = torch.randn(args.batch_size, case.channels, case.height, case.width, generator=torch.Generator().manual_seed(1))
    print(f"{case.name}, batch {args.batch_size}, {torch.get_num_threads()} threads, malloc: {malloc}, {args.rounds} rounds")
    for impl in bench.build_impls(case, layer, ["sw_shift_add"]):
        with torch.no_grad():
            err = (impl.fn(x) - impl.stage(x)).abs().max().item()
            if err > 1e-4 * impl.stage(x).abs().max().item():
                raise SystemExit(f"{impl.name} disagrees with the torch reference (max error {err:.3g})")
            r = controls(lambda: impl.fn(x), impl.floor_bytes(tuple(x.shape), 4), x.numel() * 4, args.rounds)
        print(f"  {impl.name:18s} {r['stage_ms']:7.2f} ms  {r['floor_multiple']:.2f}x the copy floor "
              f"({r['floor_ms']:.2f} ms), {r['read_floor_multiple']:.2f}x at read bandwidth; "
              f"{r['sum_multiple']:.2f}x PyTorch's {r['sum_inputs']}-input sum of the same bytes "
              f"(which ran at {r['sum_floor_multiple']:.2f}x the copy floor)")


if __name__ == "__main__":
    main()
