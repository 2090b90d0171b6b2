"""The measurements behind ``shiftwise.dispatch.choose_auto_path`` (``backend="auto"``).

For 88 layers (SLaK-T and RepLKNet-31B stages, the paper's case, RepLKNet's R x R stack with
R = 16/32/64 and K = 3/5/7/13/19/31, four others, seven more 3 x 3 layers) at tile densities
1 / 0.5 / 0.25, batch 4: forward medians (of 3 alternating rounds of 5 calls) of the fused
kernel (``shiftwise_conv2d(..., backend="taichi_fused")``) and of the dense conv ``auto`` runs
for inference (``dispatch.dense_conv``: the merged kernel cropped and cached, NCHW up to 13
columns wide, channels_last with its conversions otherwise); with ``--backward``
forward+backward medians of the fused kernel and of the dense conv in both layouts too
(``nchw_fb`` / ``nhwc_fb``: the merged kernel uncropped, merged every call with autograd, as a
training step runs it). ``--only`` sweeps the layers whose names contain one of its
comma-separated strings. One JSON line per layer and density::

    python benchmarks/auto_dispatch_sweep.py -o sweep.jsonl          # ~2 min on 2 cores
    python benchmarks/auto_dispatch_sweep.py --check sweep.jsonl     # how the rule does on it
    python benchmarks/auto_dispatch_sweep.py --fit sweep.jsonl       # grid search of its constants
    python benchmarks/auto_dispatch_sweep.py --picks benchmarks/results/auto-dispatch-*.jsonl

``--check`` prints, for the forward pass (and for training steps where the file has them), how
often ``choose_auto_path`` picks the faster of the two and the total time of its picks against
the fused kernel everywhere and the best per layer. ``--fit`` searches ``AUTO_RATIO_AT_1``,
``AUTO_RATIO_EXP`` and ``NCHW_RATIO_FACTOR`` for the least total forward time. Older sweep files
(``nchw_f`` / ``nhwc_f``: the merged kernel rebuilt every call, uncropped) are read too.
``--picks`` counts what ``auto`` runs, forward and training step, on CPU and CUDA, over every
``shiftwise bench`` preset and every layer of the given sweep files at the three densities.
"""
import argparse
import collections
import json
import os
import statistics

import torch
import torch.nn.functional as F

from shiftwise import merge_tiles, outputs, shiftwise_conv2d
from shiftwise.errors import ShiftwiseError
from shiftwise.bench import PRESETS, Case, compact, make_layer, time_calls
from shiftwise.dispatch import DENSE_NCHW_MAX_WIDTH, auto_cost_terms, choose_auto_path, cropped_extent, dense_conv

DENSITIES = (1.0, 0.5, 0.25)
ROUNDS = 3  # per path and layer, alternating; each the median of 5 calls
TRAIN_SLOW_MS = 1000.0
CPU = torch.device("cpu")


def cases():
    out = [c for p in ("slak_t", "replknet_31b", "paper") for c in PRESETS[p]]
    out += [Case(f"stack.r{r}.k{k}", 384, r, r, ((k, k),), 5) for r in (16, 32, 64) for k in (7, 13, 19, 31)]
    out += [Case(f"stack.r{r}.k{k}", 384, r, r, ((k, k),), k if k < 5 else 5) for r in (16, 32, 64) for k in (3, 5)]
    # 3 x 3 layers of other sizes (where PyTorch's backward stops winning training steps)
    out += [Case(f"k3.c{c}.r{r}", c, r, r, ((3, 3),), 3)
            for c, r in ((192, 56), (96, 112), (512, 56), (256, 96), (384, 80), (384, 96), (384, 128))]
    out += [Case("c.28.17", 249, 28, 28, ((17, 17),), 5), Case("c.14.21", 512, 14, 14, ((21, 21), (5, 5)), 5),
            Case("c.56.31x5", 128, 56, 56, ((31, 5), (5, 31)), 5), Case("c.112.13", 64, 112, 112, ((13, 13),), 5)]
    return out


def sweep(out_path, batch, backward, only=None):
    partial = out_path + ".partial"  # records as they come (an interrupted sweep keeps them), renamed at the end
    with open(partial, "w") as out:
        for case in cases():
            if only and not any(o in case.name for o in only.split(",") if o):
                continue
            layer = make_layer(case, "cpu", torch.float32)
            bias = layer.bias.detach()
            for d in DENSITIES:
                tiles, plan = compact(layer.tiles, layer.plan, d)
                x = torch.randn(batch, case.channels, case.height, case.width)
                rec = {"case": case.name, "d": d, "C": case.channels, "H": case.height, "W": case.width,
                       "tiles": plan.num_tiles, "extent": list(plan.info.extent), "N": plan.tile_size}
                with torch.no_grad():
                    rec["dense_kernel"] = list(cropped_extent(tiles, plan))
                paths = {"fused": lambda x, w, b: shiftwise_conv2d(x, w, plan, b, backend="taichi_fused"),
                         "dense": lambda x, w, b: dense_conv(x, w, plan, b)}
                rounds = {name: [] for name in paths}
                for _ in range(ROUNDS):  # alternating, so that a slow stretch of the machine hits both
                    for name, fn in paths.items():
                        with torch.no_grad():
                            rounds[name].append(time_calls(lambda: fn(x, tiles, bias), CPU, 5, 1)["median_ms"])
                for name in paths:
                    rec[name + "_f"] = statistics.median(rounds[name])
                if backward:
                    rec.update(_training_steps(x, tiles, bias, plan))
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(json.dumps(rec), flush=True)
        os.fsync(out.fileno())
    os.replace(partial, out_path)


def _dense_trained(x, w, b, plan, layout):
    """A training step's dense conv: the merged kernel (uncropped: every tap of every tile gets its
    gradient) by autograd, the conv in ``layout`` ("nchw" or "nhwc")."""
    kernel = merge_tiles(w, plan).unsqueeze(1)
    if layout == "nhwc":
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel, b, padding=plan.info.padding,
                        groups=plan.channels).contiguous()
    return F.conv2d(x, kernel, b, padding=plan.info.padding, groups=plan.channels)


def _training_steps(x, tiles, bias, plan):
    """Forward+backward medians (ms) of the fused kernel and of the dense conv in both layouts,
    in alternating rounds; a path whose step takes over TRAIN_SLOW_MS gets one round, of one timed
    call (those lose by far: seconds against tens of milliseconds)."""
    paths = {"fused": lambda x, w, b: shiftwise_conv2d(x, w, plan, b, backend="taichi_fused"),
             "nchw": lambda x, w, b: _dense_trained(x, w, b, plan, "nchw"),
             "nhwc": lambda x, w, b: _dense_trained(x, w, b, plan, "nhwc")}
    gy = torch.randn(x.shape)
    leaves = [t.clone().requires_grad_() for t in (x, tiles, bias)]
    rounds = {name: [] for name in paths}
    slow = set()
    for r in range(ROUNDS):
        for name, fn in paths.items():
            if name in slow:
                continue

            def step(fn=fn):
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(gy)
            got = time_calls(step, CPU, 3 if r else 1, 0 if r else 1)
            rounds[name].append(got["median_ms"])
            if got["median_ms"] > TRAIN_SLOW_MS:  # (not the first call: it may compile a kernel)
                slow.add(name)
    return {name + "_fb": statistics.median(v) for name, v in rounds.items()}


def _records(path, batch):
    """``(record, tiles, plan, dense forward ms)`` per line of a sweep file; ``tiles`` None for
    older sweeps, whose dense path ran the plan's whole extent."""
    layers, built = {c.name: c for c in cases()}, {}
    for line in open(path):
        r = json.loads(line)
        if r["case"] not in built:
            built[r["case"]] = make_layer(layers[r["case"]], "cpu", torch.float32)
        tiles, plan = compact(built[r["case"]].tiles, built[r["case"]].plan, r["d"])
        if "dense_f" in r:
            yield r, tiles, plan, r["dense_f"]
        else:  # older sweeps: the dense path by the plan's extent, kernel merged per call
            yield r, None, plan, r["nchw_f"] if plan.info.extent[1] <= DENSE_NCHW_MAX_WIDTH else r["nhwc_f"]


def check(path, batch):
    """How the rule does on a sweep file: forward passes, and training steps on the lines that
    have ``--backward`` timings (auto's dense training path: the uncropped merged kernel, NCHW
    up to DENSE_NCHW_MAX_WIDTH wide)."""
    forward, training = [], []  # (label, pick, dense ms, fused ms)
    for r, tiles, plan, dense in _records(path, batch):
        shape, label = (batch, r["C"], r["H"], r["W"]), f"{r['case']} d={r['d']}"
        with torch.no_grad():
            forward.append((label, choose_auto_path(CPU, plan, shape, weight=tiles), dense, r["fused_f"]))
        if "nchw_fb" in r:
            dense_fb = r["nchw_fb"] if plan.info.extent[1] <= DENSE_NCHW_MAX_WIDTH else r["nhwc_fb"]
            training.append((label + " training", choose_auto_path(CPU, plan, shape, needs_grad=True), dense_fb,
                             r["fused_fb"]))
    _tally(forward, "forward passes")
    _tally(training, "training steps")


def _tally(rows, what):
    """Print the rows where the pick was not the faster path, and the totals."""
    total_auto = total_fused = total_best = 0.0
    right = 0
    for label, pick, dense, fused in rows:
        got = dense if pick == "dense" else fused
        best = min(dense, fused)
        right += got == best
        total_auto, total_fused, total_best = total_auto + got, total_fused + fused, total_best + best
        if got != best:
            print(f"  {label}: picked {pick}, {got / best:.2f}x the faster path (dense {dense:.2f} ms, "
                  f"fused {fused:.2f} ms)")
    if rows:
        print(f"{right} of {len(rows)} {what} on the faster path; all of them: auto {total_auto:.0f} ms, "
              f"fused kernel everywhere {total_fused:.0f} ms, the faster path everywhere {total_best:.0f} ms")


def fit(path, batch):
    """Grid search of the rule's three constants for the least total forward time."""
    feats = []  # (dense taps, fused taps incl. penalty, side, nchw, dense ms, fused ms)
    for r, tiles, plan, dense in _records(path, batch):
        with torch.no_grad():
            extent = None if tiles is None else cropped_extent(tiles, plan)
        feats.append((*auto_cost_terms(plan, r["H"], r["W"], extent), dense, r["fused_f"]))
    t = torch.tensor(feats, dtype=torch.float64)
    dense_taps, fused_taps, side, nchw, dense_ms, fused_ms = t.unbind(1)
    best_ms = torch.minimum(dense_ms, fused_ms)
    best = None
    for at1 in [2 ** (k / 4) for k in range(4, 29)]:  # 2 .. 128
        for exp in [k / 20 for k in range(0, 31)]:  # 0 .. 1.5
            base = at1 * side ** -exp * fused_taps
            for factor in [1 + k / 4 for k in range(0, 25)]:  # 1 .. 7
                got = torch.where(dense_taps < base * torch.where(nchw > 0, factor, 1.0), dense_ms, fused_ms)
                total = float(got.sum())
                if best is None or total < best[0] - 1e-9:
                    best = (total, at1, exp, factor, int((got <= best_ms).sum()))
    total, at1, exp, factor, right = best
    print(f"best: AUTO_RATIO_AT_1 = {at1:.3g}, AUTO_RATIO_EXP = {exp:.2f}, NCHW_RATIO_FACTOR = {factor:.2f}: "
          f"{total:.0f} ms, {right} of {len(feats)} on the faster path "
          f"(the faster path everywhere: {float(best_ms.sum()):.0f} ms)")


def picks(paths, batch):
    """Count auto's picks over every bench preset and every layer of the sweep files ``paths``,
    at each of DENSITIES: forward (no gradients, the tiles given) and training step, CPU and CUDA."""
    layers = {c.name: (c, batch) for c in cases()}
    shapes = {c.name: (c, batch) for cs in PRESETS.values() for c in cs}
    for path in paths:
        for line in open(path):
            name = json.loads(line)["case"]
            shapes.setdefault(name, layers[name])
    counts = collections.Counter()
    for case, b in shapes.values():
        layer = make_layer(case, "cpu", torch.float32)
        shape = (b, case.channels, case.height, case.width)
        for d in DENSITIES:
            tiles, plan = compact(layer.tiles, layer.plan, d)
            for device in ("cpu", "cuda"):
                with torch.no_grad():
                    counts[device, "forward", choose_auto_path(torch.device(device), plan, shape, weight=tiles)] += 1
                counts[device, "training", choose_auto_path(torch.device(device), plan, shape, needs_grad=True)] += 1
    print(f"{len(shapes)} layers x {len(DENSITIES)} densities, batch {batch}:")
    for (device, what, path), n in sorted(counts.items()):
        print(f"  {device} {what}: {path} {n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", help="write the sweep here (JSON lines)")
    ap.add_argument("--check", help="evaluate the auto rule on a sweep file")
    ap.add_argument("--fit", help="grid-search the rule's constants on a sweep file")
    ap.add_argument("--picks", nargs="*", metavar="SWEEP", help="count auto's picks over the bench presets and "
                    "these sweep files' layers")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward (~4x longer)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", help="with --output: comma-separated substrings; sweep only the layers whose names "
                    "hold one")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file (written as "
                    "OUTPUT.partial while the sweep runs, renamed when it is done)")
    args = ap.parse_args()
    if not (args.output or args.check or args.fit or args.picks is not None):
        ap.error("give --output, --check, --fit or --picks")
    try:
        outputs.claim(args.output, args.force, "--output")
    except ShiftwiseError as exc:
        ap.error(str(exc))
    if args.output:
        sweep(args.output, args.batch_size, args.backward, args.only)
    if args.check:
        check(args.check, args.batch_size)
    if args.fit:
        fit(args.fit, args.batch_size)
    if args.picks is not None:
        picks(args.picks, args.batch_size)


if __name__ == "__main__":
    main()
