"""The speed targets of SW networks, measured with ``shiftwise bench`` and checked in one table.

1. Converted SW-T forward throughput, as a multiple of converted UniRepLKNet-T's (target >= 0.8).
2. SW-T training step (training form, N_path 2, N_rep 4) over UniRepLKNet-T's as ``shiftwise
   train`` trains it (converted form) (target <= 1.5).
3. SW-T stage-1 layer (C = 80, 56 x 56, K = 51; batch 8 on CPU, 64 on a GPU): training-step peak
   memory of shiftwise's paths over the official computation's, which holds every plane
   (target <= 0.3).

Writes the two reports to ``--out-dir`` (``bench-sw_t-<device>-pt<torch>-ti<taichi>.json`` and
``bench-model-sw_tiny-unireplknet_t-<...>.json``) and prints the table. On a quiet machine::

    python benchmarks/sw_speed.py --threads 2                       # CPU, 224 x 224, batch 4
    python benchmarks/sw_speed.py --device cuda --layers-only       # the layer on a GPU, batch 64
    python benchmarks/sw_speed.py --from-dir benchmarks/results     # the table of saved runs
"""
import argparse
import glob
import os

import torch

from shiftwise import bench
from shiftwise.evaluate import resolve_device

MODELS = ("sw_tiny", "unireplknet_t")
TARGETS = {"fwd_throughput": (">=", 0.8), "train_time": ("<=", 1.5), "layer_peak": ("<=", 0.3)}


def tag(report: dict) -> str:
    torch_v = ".".join(report["versions"]["torch"].split("+")[0].split(".")[:2])
    return f"{report['device']}-pt{torch_v}-ti{report['versions']['taichi']}"


def save(report: dict, out_dir: str, stem: str) -> str:
    path = os.path.join(out_dir, f"{stem}-{tag(report)}.json")
    with open(path, "w") as f:
        f.write(bench.to_json(report))
    return path


def verdict(key: str, value) -> str:
    if value is None:
        return "not measured"
    op, bound = TARGETS[key]
    met = value >= bound if op == ">=" else value <= bound
    return f"{value:.2f}x (target {op} {bound}): " + ("met" if met else f"missed by {abs(value / bound - 1):.0%}")


def table(layers: dict, models: dict) -> str:
    lines = []
    if models:
        pair = next((p for p in models.get("comparison", {}).get("pairs", [])
                     if p["model"] == MODELS[0] and p["against"] == MODELS[1]), None)
        load = models["loadavg_before"][0], models.get("loadavg_after", [float("nan")])[0]
        lines.append(f"models ({models['device_name']}, {models['threads']} threads, batch {models['batch']}, "
                     f"load {load[0]:.1f} -> {load[1]:.1f}):")
        for row in models.get("comparison", {}).get("models", []):
            lines.append(f"  {row['model']:<14} converted forward {row['fwd_images_s'] or float('nan'):7.2f} img/s, "
                         f"training step ({row['train_form']}) {row['train_ms'] or float('nan'):9.1f} ms")
        lines.append("  SW-T / UniRepLKNet-T converted forward throughput: "
                     + verdict("fwd_throughput", pair and pair["fwd_throughput"]))
        lines.append("  SW-T / UniRepLKNet-T training step time: " + verdict("train_time", pair and pair["train_time"]))
    for rec in (layers or {}).get("cases", []):
        res = {r["impl"]: r for r in rec["results"]}
        base = res.get(bench.SW_BASELINE, {}).get("peak_step_bytes")
        lines.append(f"{rec['case']['name']} (B={rec['batch']}, {layers['device_name']}, {layers['threads']} threads):")
        for name in bench.SW_IMPLS:
            r = res.get(name, {})
            peak = r.get("peak_step_bytes")
            if "error" in r or peak is None:
                lines.append(f"  {name:<12} {r.get('error', 'not run')}")
                continue
            ratio = peak / base if base else None
            note = verdict("layer_peak", ratio) if name != bench.SW_BASELINE else "the official computation"
            lines.append(f"  {name:<12} forward {r['fwd']['median_ms']:9.1f} ms, training step "
                         f"{r['fwd_bwd']['median_ms']:9.1f} ms, peak {peak / 2**20:7.1f} MB: {note}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    ap.add_argument("--cases", default="s1", help="stages of SW-T for the layer bench (default: s1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")
    ap.add_argument("--layers-only", action="store_true", help="skip the whole models")
    ap.add_argument("--models-only", action="store_true", help="skip the layer")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--from-dir", metavar="DIR", help="print the table of the newest saved reports; measure nothing")
    args = ap.parse_args()
    if args.from_dir:
        newest = {}
        for stem in ("bench-sw_t", f"bench-model-{'-'.join(MODELS)}"):
            found = sorted(glob.glob(os.path.join(args.from_dir, f"{stem}-*.json")), key=os.path.getmtime)
            newest[stem] = bench.load_report(found[-1]) if found else {}
        print(table(newest["bench-sw_t"], newest[f"bench-model-{'-'.join(MODELS)}"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["SHIFTWISE_CPU_THREADS"] = str(args.threads)  # read when Taichi starts
    device = resolve_device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    layers = models = {}
    if not args.models_only:
        cases = bench.select_cases("sw_t", args.cases.split(","))
        layers = bench.run_bench(cases, bench.default_batch("sw_t", device), device, names=list(bench.SW_IMPLS),
                                 repeats=args.repeats, warmup=1, preset="sw_t",
                                 progress=lambda s: print(f"  {s}", flush=True))
        print(f"wrote {save(layers, args.out_dir, 'bench-sw_t')}")
    if not args.layers_only:
        models = bench.run_model_bench(MODELS, batch=4, image_size=224, repeats=args.repeats, warmup=1,
                                       device=device, progress=lambda s: print(f"  {s}", flush=True))
        print(f"wrote {save(models, args.out_dir, 'bench-model-' + '-'.join(MODELS))}")
    print(table(layers, models))


if __name__ == "__main__":
    main()
