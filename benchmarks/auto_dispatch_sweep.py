"""The measurements behind ``shiftwise.functional.choose_auto_path`` (``backend="auto"``).

For 75 layers (SLaK-T and RepLKNet-31B stages, the paper's case, RepLKNet's R x R stack with
R = 16/32/64 and K = 7/13/19/31, four others) at tile densities 1 / 0.5 / 0.25, batch 4: forward
and forward+backward medians of the fused kernel and of ``F.conv2d`` with the merged kernel in
NCHW and in channels_last (layout conversions included). One JSON line per layer and density::

    python benchmarks/auto_dispatch_sweep.py --out sweep.jsonl          # ~40 min on 2 cores
    python benchmarks/auto_dispatch_sweep.py --check sweep.jsonl        # how the rule does on it

``--check`` prints, for the forward pass, how often ``choose_auto_path`` picks the faster of the
dense conv it would run (NCHW up to 13 columns wide, else channels_last) and the fused kernel,
and the total time of its picks against the fused kernel everywhere.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from shiftwise import shiftwise_conv2d
from shiftwise.bench import PRESETS, Case, compact, make_layer, time_calls
from shiftwise.functional import DENSE_NCHW_MAX_WIDTH, choose_auto_path
from shiftwise.tiling import merge_tiles

DENSITIES = (1.0, 0.5, 0.25)
CPU = torch.device("cpu")


def cases():
    out = [c for p in ("slak_t", "replknet_31b", "paper") for c in PRESETS[p]]
    out += [Case(f"stack.r{r}.k{k}", 384, r, r, ((k, k),), 5) for r in (16, 32, 64) for k in (7, 13, 19, 31)]
    out += [Case("c.28.17", 249, 28, 28, ((17, 17),), 5), Case("c.14.21", 512, 14, 14, ((21, 21), (5, 5)), 5),
            Case("c.56.31x5", 128, 56, 56, ((31, 5), (5, 31)), 5), Case("c.112.13", 64, 112, 112, ((13, 13),), 5)]
    return out


def _dense(x, w, plan, b, channels_last):
    k = merge_tiles(w, plan).unsqueeze(1)
    if channels_last:
        y = F.conv2d(x.contiguous(memory_format=torch.channels_last), k, b, padding=plan.info.padding,
                     groups=plan.channels)
        return y.contiguous()
    return F.conv2d(x, k, b, padding=plan.info.padding, groups=plan.channels)


def sweep(out_path, batch):
    with open(out_path, "w") as out:
        for case in cases():
            layer = make_layer(case, "cpu", torch.float32)
            bias = layer.bias.detach()
            for d in DENSITIES:
                tiles, plan = compact(layer.tiles, layer.plan, d)
                x = torch.randn(batch, case.channels, case.height, case.width)
                rec = {"case": case.name, "d": d, "C": case.channels, "H": case.height, "W": case.width}
                paths = {"fused": lambda x, w, b: shiftwise_conv2d(x, w, plan, b, backend="taichi_fused"),
                         "nchw": lambda x, w, b: _dense(x, w, plan, b, False),
                         "nhwc": lambda x, w, b: _dense(x, w, plan, b, True)}
                for name, fn in paths.items():
                    with torch.no_grad():
                        rec[name + "_f"] = time_calls(lambda: fn(x, tiles, bias), CPU, 7, 1)["median_ms"]
                    leaves = [t.clone().requires_grad_() for t in (x, tiles, bias)]

                    def step():
                        y = fn(*leaves)
                        y.backward(torch.ones_like(y))
                    rec[name + "_fb"] = time_calls(step, CPU, 3, 1)["median_ms"]
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(json.dumps(rec), flush=True)


def check(path, batch):
    layers = {c.name: c for c in cases()}
    built, total_auto, total_fused, right, n = {}, 0.0, 0.0, 0, 0
    for line in open(path):
        r = json.loads(line)
        case = layers[r["case"]]
        if case.name not in built:
            built[case.name] = make_layer(case, "cpu", torch.float32)
        _, plan = compact(built[case.name].tiles, built[case.name].plan, r["d"])
        pick = choose_auto_path(torch.device("cpu"), plan, (batch, r["C"], r["H"], r["W"]))
        dense = r["nchw_f"] if plan.info.extent[1] <= DENSE_NCHW_MAX_WIDTH else r["nhwc_f"]
        got = dense if pick == "dense" else r["fused_f"]
        best = min(dense, r["fused_f"])
        n += 1
        right += got == best
        total_auto += got
        total_fused += r["fused_f"]
        if got != best:
            print(f"  {r['case']} d={r['d']}: picked {pick}, {got / best:.2f}x the faster path")
    print(f"{right} of {n} forward passes on the faster path; all of them: auto {total_auto:.0f} ms, "
          f"fused kernel everywhere {total_fused:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the sweep here (JSON lines)")
    ap.add_argument("--check", help="evaluate the auto rule on a sweep file")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    if not (args.out or args.check):
        ap.error("give --out or --check")
    if args.out:
        sweep(args.out, args.batch)
    if args.check:
        check(args.check, args.batch)


if __name__ == "__main__":
    main()
