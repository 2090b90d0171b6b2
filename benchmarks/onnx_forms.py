"""The measurements behind ``shiftwise.onnx_form.choose``: the ``dense`` and ``shiftwise`` ONNX
forms of one layer, side by side in onnxruntime (CPU, 2 intra-op threads, 1 inter-op thread).

Layers: the shift-wise paper's (C = 124, 51 x 5, N = 5), SLaK-T stage 1's (C = 124, 51 x 5 +
5 x 51 + 5 x 5, N = 5) and a square 31 x 31 kernel of 3 x 3 tiles (C = 64), at tile densities
1 / 0.5 / 0.25 / 0.1 / 0.05 (tiles kept at random, ``shiftwise.bench.compact``) on maps from
14 x 14 to 128 x 128, batch 1, and the paper's layer at 128 x 128 with batch 8. Each layer is
exported by ``shiftwise.export.export_onnx`` in both forms, both sessions' outputs are checked
against PyTorch, then timed alternately: medians (and minima) of single runs, wall time and
process CPU time, in onnxruntime's default sessions (``dense_ms``, ``shiftwise_ms``, ``speedup``)
and in sessions whose threads do not spin while they wait (``*_nospin_*``): on a machine that
other processes load, spinning threads and those processes slow each other down, which blurs
the default sessions' times. One JSON line per case, after a first line describing the run
(with the load average at its start and end)::

    python benchmarks/onnx_forms.py -o benchmarks/results/onnx-forms-cpu2-ort1.32.0.jsonl   # ~4 min
    python benchmarks/onnx_forms.py --fit benchmarks/results/onnx-forms-cpu2-ort1.32.0.jsonl
    python benchmarks/onnx_forms.py --profile benchmarks/results/onnx-forms-profile-paper-cpu2-ort1.32.0.json
    python benchmarks/onnx_forms.py --paper --threads 1 -o benchmarks/results/onnx-forms-paper-cpu1-ort1.32.0.jsonl

``--fit`` searches the rule's constant (tile planes per channel against the dense kernel's
taps) for the least total time of its picks and prints how the current one does; ``--profile``
writes onnxruntime's per-operator times of both forms of the paper's layer at density 0.25;
``--paper`` times only that layer (batch 1 and 8) with more rounds, ``--threads`` sets the
intra-op threads (2 by default).
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from shiftwise import ShiftWiseConv2d, onnx_form, outputs
from shiftwise.bench import Case, compact, make_layer
from shiftwise.export import export_onnx

THREADS = 2
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
LAYERS = (  # (case, map sides)
    (Case("paper", 124, 0, 0, ((51, 5),), 5), (14, 32, 64, 128)),
    (Case("slak_t.s1", 124, 0, 0, ((51, 5), (5, 51), (5, 5)), 5), (14, 28, 56)),
    (Case("square31", 64, 0, 0, ((31, 31),), 3), (14, 28, 56)),
)
BUDGET_S = 0.4  # timing per session and case (at least MIN_ROUNDS rounds, at most MAX_ROUNDS)
MIN_ROUNDS, MAX_ROUNDS = 5, 11


def session(path, spin=True):
    """An onnxruntime session on THREADS intra-op threads; ``spin=False`` turns the threads' busy
    waiting off (with spinning, a loaded machine's other processes and the waiting threads slow
    each other down, which blurs 2-thread timings)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def measure(case, side, density, batch, folder):
    layer = make_layer(case, torch.device("cpu"), torch.float32)
    tiles, plan = compact(layer.tiles, layer.plan, density)
    module = nn.Sequential(ShiftWiseConv2d.from_tiles(tiles, plan, layer.bias)).eval()
    x = torch.randn(batch, case.channels, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x).numpy()
    sessions, diffs = {}, {}
    for form in ("dense", "shiftwise"):
        path = os.path.join(folder, f"{form}.onnx")
        export_onnx(module, path, tuple(x.shape), form=form, force=True, check=False)
        sessions[form] = session(path)
        sessions[form + "_nospin"] = session(path, spin=False)
        got = sessions[form].run(None, {"input": x.numpy()})[0]
        diffs[form] = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))
        if diffs[form] > 1e-4:
            raise RuntimeError(f"{case.name} {side} d={density}: the {form} form differs by {diffs[form]:.2e}")
    feed = {"input": x.numpy()}
    times = {form: [] for form in sessions}
    cpu = {form: [] for form in sessions}  # process CPU time: less sensitive to other processes' load
    for s in sessions.values():  # warm up
        s.run(None, feed)
    start = time.perf_counter()
    rounds = 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start < len(sessions) * BUDGET_S):
        for form, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(None, feed)
            times[form].append(time.perf_counter() - t0)
            cpu[form].append(time.process_time() - c0)
        rounds += 1
    info = plan.info
    rec = {"case": case.name, "C": case.channels, "kernel": list(info.extent), "N": plan.tile_size,
           "density": density, "tiles": plan.num_tiles, "H": side, "W": side, "batch": batch,
           "planes_per_channel": plan.num_tiles / case.channels, "dense_taps": info.dense_taps(side, side),
           "rounds": rounds, "max_rel_diff": diffs}
    for form, ts in times.items():
        rec[f"{form}_ms"] = statistics.median(ts) * 1e3
        rec[f"{form}_min_ms"] = min(ts) * 1e3
        rec[f"{form}_cpu_ms"] = statistics.median(cpu[form]) * 1e3
    rec["speedup"] = rec["dense_ms"] / rec["shiftwise_ms"]
    rec["speedup_nospin"] = rec["dense_nospin_ms"] / rec["shiftwise_nospin_ms"]
    return rec


def sweep(out_path, paper_only=False):
    import onnxruntime as ort

    torch.set_num_threads(THREADS)
    outputs.claim(out_path, force=True)
    header = {"run": "onnx_forms", "command": " ".join(["python"] + sys.argv), "onnxruntime": ort.__version__,
              "torch": torch.__version__, "threads": THREADS, "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    if paper_only:  # the paper's layer at 25 % of its tiles, with more rounds
        global MIN_ROUNDS, MAX_ROUNDS
        MIN_ROUNDS, MAX_ROUNDS = 21, 41
        jobs = [(LAYERS[0][0], 128, 0.25, batch) for batch in (1, 8)]
    else:
        jobs = [(case, side, d, 1) for case, sides in LAYERS for side in sides for d in DENSITIES]
        jobs += [(LAYERS[0][0], 128, d, 8) for d in (1.0, 0.25)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, outputs.atomic(out_path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for case, side, d, batch in jobs:
            rec = measure(case, side, d, batch, folder)
            f.write(json.dumps(rec) + "\n")
            print(f"{case.name:10s} {side:4d} d={d:<5} b={batch} planes/ch {rec['planes_per_channel']:6.2f} "
                  f"dense {rec['dense_ms']:8.2f} ms shiftwise {rec['shiftwise_ms']:8.2f} ms "
                  f"x{rec['speedup']:.2f} (no spinning x{rec['speedup_nospin']:.2f}) "
                  f"rule: {pick(rec, onnx_form.SHIFTWISE_MAX_PLANES_PER_TAP)}", file=sys.stderr)
        header_end = {"run_end": True, "seconds": time.perf_counter() - t0, "load_average": os.getloadavg()}
        f.write(json.dumps(header_end) + "\n")
    print(f"wrote {out_path}", file=sys.stderr)


def profile(out_path, density=0.25, runs=10):
    """Per-operator time of both forms of the paper's layer (128 x 128, batch 1) in onnxruntime's
    profiler, after its graph optimisations: where the shiftwise form's time goes."""
    import onnxruntime as ort

    case = LAYERS[0][0]
    layer = make_layer(case, torch.device("cpu"), torch.float32)
    tiles, plan = compact(layer.tiles, layer.plan, density)
    module = nn.Sequential(ShiftWiseConv2d.from_tiles(tiles, plan, layer.bias)).eval()
    x = torch.randn(1, case.channels, 128, 128).numpy()
    result = {"run": "onnx_forms --profile", "command": " ".join(["python"] + sys.argv), "case": case.name,
              "density": density, "tiles": plan.num_tiles, "H": 128, "W": 128, "batch": 1,
              "onnxruntime": ort.__version__, "threads": THREADS, "runs": runs, "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        for form in ("dense", "shiftwise"):
            path = os.path.join(folder, f"{form}.onnx")
            export_onnx(module, path, x.shape, form=form, force=True, check=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(folder, form)
            s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            for _ in range(runs + 1):
                s.run(None, {"input": x})
            with open(s.end_profiling()) as f:
                events = json.load(f)
            per_op, nodes = {}, {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    op = e["args"]["op_name"]
                    per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / (runs + 1)
                    nodes.setdefault(op, set()).add(e["name"])
            result[form] = {op: {"ms": round(ms, 3), "nodes": len(nodes[op])}
                            for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}
            result[form + "_total_ms"] = round(sum(per_op.values()), 3)
    with outputs.atomic(out_path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out_path}", file=sys.stderr)


def load(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if "case" in r]


def pick(record, alpha):
    """The form ``shiftwise.onnx_form.choose`` gives the record's layer with the constant ``alpha``."""
    return "shiftwise" if record["planes_per_channel"] <= alpha * record["dense_taps"] else "dense"


def cost(records, alpha, timing=""):
    """Total median time of the rule's picks with this constant, and how often it picks the faster."""
    total, right = 0.0, 0
    for r in records:
        form = pick(r, alpha)
        total += r[f"{form}{timing}_ms"]
        right += r[f"{form}{timing}_ms"] <= min(r[f"dense{timing}_ms"], r[f"shiftwise{timing}_ms"])
    return total, right


def fit(path):
    records = [r for r in load(path) if r["batch"] == 1]
    ratios = sorted({r["planes_per_channel"] / r["dense_taps"] for r in records})
    alphas = [0.0] + [math.sqrt(a * b) for a, b in zip(ratios, ratios[1:])] + [ratios[-1] * 2]
    for timing, what in (("", "default sessions"), ("_nospin", "sessions without spinning")):
        if f"dense{timing}_ms" not in records[0]:
            continue
        best = sum(min(r[f"dense{timing}_ms"], r[f"shiftwise{timing}_ms"]) for r in records)
        dense = sum(r[f"dense{timing}_ms"] for r in records)
        (total, right), alpha = min(((cost(records, a, timing), a) for a in alphas),
                                    key=lambda g: (g[0][0], -g[0][1]))
        now, now_right = cost(records, onnx_form.SHIFTWISE_MAX_PLANES_PER_TAP, timing)
        print(f"{what}: {len(records)} cases: best per case {best:.1f} ms, dense everywhere {dense:.1f} ms")
        print(f"  fitted: SHIFTWISE_MAX_PLANES_PER_TAP = {alpha:.4g}: {total:.1f} ms, "
              f"faster form picked in {right}/{len(records)}")
        print(f"  current: {onnx_form.SHIFTWISE_MAX_PLANES_PER_TAP:.4g}: {now:.1f} ms, "
              f"faster form picked in {now_right}/{len(records)}")
        for r in records:
            faster = r[f"shiftwise{timing}_ms"] < r[f"dense{timing}_ms"]
            if (pick(r, onnx_form.SHIFTWISE_MAX_PLANES_PER_TAP) == "shiftwise") != faster:
                print(f"  current misses {r['case']} {r['H']}x{r['W']} density {r['density']}: "
                      f"dense {r[f'dense{timing}_ms']:.2f} ms, shiftwise {r[f'shiftwise{timing}_ms']:.2f} ms")


def main():
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", help="JSON lines file to write (the sweep)")
    p.add_argument("--fit", metavar="JSONL", help="fit the rule's constants on a sweep file")
    p.add_argument("--threads", type=int, default=THREADS, help="onnxruntime intra-op threads")
    p.add_argument("--paper", action="store_true", help="only the paper's layer at 128 x 128 and density 0.25 "
                                                        "(batch 1 and 8), with more rounds")
    p.add_argument("--profile", metavar="JSON", help="write onnxruntime's per-operator times of both forms "
                                                     "of the paper's layer at density 0.25")
    args = p.parse_args()
    THREADS = args.threads
    if args.fit:
        fit(args.fit)
    elif args.profile:
        profile(args.profile)
    elif args.output:
        sweep(args.output, paper_only=args.paper)
    else:
        p.error("give -o FILE (sweep) or --fit FILE")


if __name__ == "__main__":
    main()
