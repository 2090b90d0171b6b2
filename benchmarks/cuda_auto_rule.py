"""The rule of ``backend="auto"`` on CUDA, from ``shiftwise bench --device cuda`` results.

For every measured case and density (the bench's ``sw_fused@d`` and ``sw_decomposed@d``, forward
and training step), one point of the rule: the map side ``sqrt(H * W)``, the tiles per channel
kept at that density times ``N * N``, both medians, and the path that wins. The decomposed path
wins only when it is faster than the fused kernel by ``--margin`` (it holds one plane per tile,
several times the fused kernel's memory); a decomposed run out of memory loses. A call of
``auto`` on CUDA then takes the path of the nearest point of its pass in ``(log2 side, log2 taps)``
when one lies within ``--max-distance``, else the fused kernel (``shiftwise.dispatch.cuda_rule_choice``).

    python benchmarks/cuda_auto_rule.py BENCH_JSON... -o shiftwise/data/cuda_auto_rule.json [--force]

Every file must come from the same GPU, in float32. Prints one line per point.
"""
import argparse
import json
import math
import os
import sys

from shiftwise import dispatch, outputs
from shiftwise.errors import ShiftwiseError

PASSES = (("fwd", "forward"), ("fwd_bwd", "training"))
IMPLS = ("sw_fused", "sw_decomposed")


def _median(result, key):
    """A result's median for ``key``: a float (``inf`` out of memory), or None where it did not run
    cleanly (missing, an error other than out-of-memory)."""
    if result is None or "error" in result:
        return None
    if key in result:
        return float(result[key]["median_ms"])  # inf where that stage ran out of memory
    return math.inf if result.get("oom") else None


def load(path: str) -> dict:
    """A bench results file, checked to hold CUDA float32 cases."""
    try:
        with open(path) as f:
            report = outputs.json_restore(json.load(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable bench results file ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
        raise ValueError(f"{path}: not a bench results file of layer cases (no 'cases')")
    device = str(report.get("device", ""))
    if not device or device.startswith("cpu"):
        raise ValueError(f"{path} holds results of {device or 'an unknown device'}; the rule is for CUDA "
                         "(shiftwise bench --device cuda)")
    if report.get("dtype", "float32") != "float32":
        raise ValueError(f"{path} was measured in {report['dtype']}; the rule is for float32")
    return report


def points(report: dict, margin: float, name: str = "") -> tuple:
    """``({"forward": [...], "training": [...]}, skipped)``: the rule's points from one report,
    and a line for each case and pass that could not give one."""
    out, skipped = {"forward": [], "training": []}, []
    for rec in report["cases"]:
        case = rec.get("case", {})
        if case.get("sw") is not None:  # SW layers run neither path
            continue
        label0 = f"{name}: {case.get('name')}"
        if rec.get("error"):
            skipped.append(f"{label0}: {rec['error']}")
            continue
        results = {r["impl"]: r for r in rec.get("results", [])}
        side = math.sqrt(case["height"] * case["width"])
        for d in case.get("densities", (1.0,)):
            kept = rec["tiles"] if d >= 1 else max(1, round(d * rec["tiles"]))
            taps = kept / case["channels"] * case["tile_size"] ** 2
            label = f"{case['name']}@{d:g}"
            for key, pass_ in PASSES:
                fused, decomposed = (_median(results.get(f"{impl}@{d:g}"), key) for impl in IMPLS)
                if fused is None or decomposed is None or not math.isfinite(fused):
                    skipped.append(f"{label0}@{d:g} {pass_}: no clean time of both paths")
                    continue
                path = "decomposed" if decomposed * margin < fused else "fused"
                out[pass_].append({
                    "case": label, "batch": rec.get("batch"), "side": round(side, 4), "taps": round(taps, 4),
                    "fused_ms": round(fused, 4),
                    "decomposed_ms": round(decomposed, 4) if math.isfinite(decomposed) else None,
                    "path": path})
    return out, skipped


def build_rule(reports: dict, margin: float = 1.1, max_distance: float = 1.0) -> tuple:
    """``(rule, skipped)`` from ``{file name: report}`` (all of one GPU)."""
    gpus = sorted({str(r.get("device_name")) for r in reports.values()})
    if len(gpus) != 1:
        raise ValueError(f"results of several GPUs ({', '.join(gpus)}); make one rule per GPU")
    rule = {"format": dispatch.CUDA_RULE_FORMAT, "about": None, "measured": None, "default": "fused",
            "margin": margin, "max_distance": max_distance, "forward": [], "training": []}
    with open(dispatch.CUDA_AUTO_RULE) as f:
        rule["about"] = json.load(f).get("about")
    skipped, seen = [], {}
    for name, report in reports.items():
        got, skip = points(report, margin, name)
        skipped += skip
        for pass_, pts in got.items():
            for p in pts:
                if (pass_, p["case"]) in seen:
                    raise ValueError(f"{p['case']} ({pass_}) is in {seen[pass_, p['case']]} and {name}; give each "
                                     "case once")
                seen[pass_, p["case"]] = name
                rule[pass_].append(p)
    if not rule["forward"] and not rule["training"]:
        raise ValueError("no case with clean times of both sw_fused and sw_decomposed; run shiftwise bench "
                         "--device cuda with both implementations")
    first = next(iter(reports.values()))
    versions = first.get("versions", {})
    rule["measured"] = {
        "device_name": gpus[0], "device": first.get("device"),
        "versions": {k: versions.get(k) for k in ("shiftwise", "torch", "taichi", "git")},
        "files": sorted(reports), "batches": sorted({p["batch"] for ps in (rule["forward"], rule["training"])
                                                     for p in ps if p["batch"] is not None}),
        "command": "python benchmarks/cuda_auto_rule.py " + " ".join(sorted(reports))
                   + f" --margin {margin:g} --max-distance {max_distance:g}"}
    dispatch.check_cuda_rule(rule, "the rule made")
    return rule, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", metavar="BENCH_JSON", help="shiftwise bench --device cuda --json files")
    ap.add_argument("-o", "--output", required=True, metavar="FILE", help="the rule file to write")
    ap.add_argument("--margin", type=float, default=1.1,
                    help="the decomposed path wins where it is faster by this factor")
    ap.add_argument("--max-distance", type=float, default=1.0,
                    help="calls farther than this from every case (log2 units) run the fused kernel")
    ap.add_argument("--force", action="store_true", help="overwrite FILE")
    args = ap.parse_args(argv)
    try:
        if not args.margin >= 1 or not args.max_distance >= 0:
            raise ValueError(f"--margin must be at least 1 and --max-distance at least 0, got {args.margin:g} and "
                             f"{args.max_distance:g}")
        reports = {os.path.basename(p): load(p) for p in args.results}
        if len(reports) != len(args.results):
            raise ValueError("two result files share a name; the rule records files by name")
        rule, skipped = build_rule(reports, args.margin, args.max_distance)
        outputs.claim(args.output, args.force, "rule file")
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        for pass_ in ("forward", "training"):
            for p in rule[pass_]:
                dec = "oom" if p["decomposed_ms"] is None else f"{p['decomposed_ms']:.3f}"
                print(f"{pass_:8} {p['case']:24} side {p['side']:7.1f} taps {p['taps']:8.1f} fused "
                      f"{p['fused_ms']:9.3f} decomposed {dec:>9} ms -> {p['path']}")
        with outputs.atomic(args.output) as tmp:
            with open(tmp, "w") as f:
                f.write(outputs.json_text(rule, indent=1) + "\n")
    except (ValueError, OSError, ShiftwiseError) as exc:
        print(f"cuda_auto_rule: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote rule file {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
