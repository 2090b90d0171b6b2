"""Reporting: the terminal tables (layers, whole models), the results JSON, the plots, the machine and
versions."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

from .. import outputs
from .._version import __version__
from .impls import IMPLS, baseline_of


def device_tag(device: torch.device) -> str:
    """Short device name for file names: ``cpu2`` (cores) or the GPU's model (``h100``)."""
    if device.type == "cuda":  # the model: the first word with a digit ("NVIDIA A100-SXM4-80GB" -> a100)
        words = torch.cuda.get_device_name(device).lower().replace("-", " ").split()
        return next((w for w in words if any(ch.isdigit() for ch in w)), words[-1] if words else "cuda")
    return f"cpu{os.cpu_count()}"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def versions() -> Dict[str, str]:
    try:
        import taichi  # noqa: PLC0415 (optional at report time)
        ti_version = ".".join(str(v) for v in taichi.__version__)
    except ImportError:
        ti_version = "none"
    try:
        import onnxruntime  # noqa: PLC0415 (optional dependency)
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "none"
    return {"shiftwise": __version__, "torch": torch.__version__, "taichi": ti_version, "onnxruntime": ort_version,
            "python": platform.python_version(), "git": _git_commit()}


def _git_commit() -> str:
    """The commit of the checkout this package runs from (``+dirty`` with uncommitted or
    untracked Python code, ``pyproject.toml`` or ``setup.cfg``), or ``"unknown"`` (an installed
    wheel, no git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=normal", "--",
                                "*.py", "pyproject.toml", "setup.cfg"],  # code only: results and docs change as runs go on
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def fastest(results: List[dict], key: str, names: Sequence[str]) -> Optional[dict]:
    """``{"impl", "median_ms"}`` of the fastest error-free result of ``names`` (densities
    stripped) for ``key`` (``"fwd"`` or ``"fwd_bwd"``), or None."""
    timed = [(r[key]["median_ms"], r["impl"]) for r in results if key in r and "error" not in r
             and r["impl"].split("@")[0] in names and math.isfinite(r[key]["median_ms"])]
    return {"impl": min(timed)[1], "median_ms": min(timed)[0]} if timed else None


def _winner(results: List[dict], key: str) -> Optional[str]:
    """The fastest implementation of the whole layer (compacted plans compute a sparser one)."""
    full = [r for r in results if "@" not in r["impl"] or r["impl"].endswith("@1")]
    best = fastest(full, key, tuple(nm for nm in IMPLS if nm != "sw_shift_add"))
    return best["impl"] if best else None


def header(report: dict) -> str:
    """One line: what ran where, and the machine's copy bandwidth and load."""
    load = report.get("loadavg_before", [math.nan])[0], report.get("loadavg_after", [math.nan])[0]
    ort = report["versions"].get("onnxruntime", "none")
    return (f"shiftwise bench --preset {report['preset']} on {report['device_name']}, torch "
            f"{report['versions']['torch']}, taichi {report['versions']['taichi']}"
            f"{'' if ort == 'none' else f', onnxruntime {ort}'}, {report['threads']} threads, "
            f"{report.get('clock', 'wall')} clock, {report.get('dtype', 'float32')}, copy bandwidth "
            f"{report['copy_bandwidth_gbs']:.1f} GB/s; load average {load[0]:.2f} -> {load[1]:.2f}")


LEGEND = ("* fastest implementation of the whole layer (the @0.5 / @0.25 rows compute a compacted one); "
          "x dw: speedup over torch_depthwise (time) or peak-memory ratio to it (x off, SW layers: the same over "
          "sw_official, the official computation); compile s: first call's excess over the median, forward / "
          "training step; onnx_*: the layer exported to ONNX (dense form: one conv of the merged kernel; shiftwise "
          "form: the tiles as small convs, shifts and sums as standard ops) in onnxruntime on the CPU, forward only, "
          "export and session in the first call")


def _title(rec: dict) -> str:
    """The first line of a case's block."""
    case = rec["case"]
    head = f"\n{case['name']}: B={rec['batch']} C={case['channels']} {case['height']}x{case['width']} "
    sw = case.get("sw")
    if sw:
        per = (f", {rec['shift_channels']} shift-wise channels x {rec['planes_per_channel']} planes"
               if "planes" in rec else "")
        return (head + f"SW layer K={sw['big_kernel']} k={sw['small_kernel']} ghost ratio {sw['ghost_ratio']:g} "
                f"N_path {sw['n_path']} N_rep {sw['n_rep']}{per}")
    kern = " + ".join(f"{a}x{b}" for a, b in case["branches"])
    tiles = f", {rec['tiles_per_channel']:.0f} tiles/channel" if "tiles_per_channel" in rec else ""
    return head + f"kernels {kern}, N={case['tile_size']}{tiles}"


def format_table(report: dict) -> str:
    """The terminal table: one block per case, the fastest marked ``*``, ratios to depthwise."""
    lines = []
    for rec in report["cases"]:
        lines.append(_title(rec))
        if rec.get("error"):
            lines.append(f"  {rec['error']}")
        x = "x off" if rec["case"].get("sw") else "x dw"
        lines.append(f"  {'implementation':<22} {'fwd ms':>10} {'iqr':>7} {x:>6}  {'fwd+bwd ms':>10} {'iqr':>7} "
                     f"{x:>6}  {'peak MB':>8} {x:>5}  {'compile s':>11}  note")
        base = next((r for r in rec["results"] if r["impl"] == baseline_of(rec["case"])), None)
        wins = {k: _winner(rec["results"], k) for k in ("fwd", "fwd_bwd")}
        for r in rec["results"]:
            cells = []
            for key in ("fwd", "fwd_bwd"):
                med = r.get(key, {}).get("median_ms")
                if med is None:
                    cells.append(f"{'-':>10} {'':>7} {'':>6}")
                    continue
                bmed = base.get(key, {}).get("median_ms") if base and "floor_ms" not in r else None
                ratio = f"{bmed / med:5.2f}" if bmed and math.isfinite(med) and med > 0 else "   - "
                mark = "*" if wins[key] == r["impl"] else " "
                cells.append(f"{med:9.2f}{mark} {r[key].get('iqr_ms', 0):7.2f} {ratio:>6}")
            peak = r.get("peak_step_bytes")
            bpeak = base.get("peak_step_bytes") if base else None
            peak_s = f"{peak / 2**20:8.1f}" if peak is not None and math.isfinite(peak) else f"{'inf' if peak else '-':>8}"
            pratio = (f"{peak / bpeak:5.2f}" if peak and bpeak and math.isfinite(peak) and math.isfinite(bpeak)
                      else "    -")
            comps = [r.get(key, {}).get("compile_ms") for key in ("fwd", "fwd_bwd")]
            comp_s = "/".join(f"{c / 1e3:.2f}" if c is not None and math.isfinite(c) else "-" for c in comps)
            note = r.get("error", "OOM" if r.get("oom") else r.get("skipped", ""))
            if "floor_multiple" in r:
                lo, hi = r.get("floor_multiple_quartiles", (r["floor_multiple"],) * 2)
                note = (f"stage: {r['floor_multiple']:.2f}x its copy-bandwidth floor ({r['floor_ms']:.2f} ms; "
                        f"rounds' quartiles {lo:.2f}-{hi:.2f}x)")
            lines.append(f"  {r['impl']:<22} {cells[0]}  {cells[1]}  {peak_s} {pratio}  {comp_s:>11}  {note}")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """Header, table and legend: what ``shiftwise bench`` prints."""
    text = [header(report), format_table(report), "", LEGEND]
    if report.get("repeats", 10) < 10:
        text.append(f"note: {report['repeats']} timed runs per measurement (fewer than 10: medians and spreads "
                    "are rough)")
    return "\n".join(text)


MODEL_LEGEND = ("check: max |logit difference| / max |reference logit| against the original (a shift-wise file: "
                "its own model; sparse@D: the masked model before compaction); tiles: tiles of the shift-wise layers "
                "and their share of the full conversion; x orig: speedup over the original form (its time / this "
                "form's); /floor: this form's time over the floor's (the network without its large-kernel layers); "
                "onnx_dense / onnx_shiftwise: the shift-wise model exported to ONNX (each layer one conv of its "
                "merged kernel / the tiles as small convs) in onnxruntime, forward only; "
                "peak: memory above what was allocated before the call")


def _ms(stats: Optional[dict]) -> str:
    med = (stats or {}).get("median_ms")
    if med is None:
        return f"{'-':>9} {'':>7}"
    return f"{med:9.1f} {stats.get('iqr_ms', 0):7.1f}" if math.isfinite(med) else f"{'inf':>9} {'':>7}"


def _num(v, fmt: str, width: int) -> str:
    return f"{v:{width}{fmt}}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>{width}}"


def format_model_table(report: dict) -> str:
    """The terminal table of a whole-model run: one block per model, one row per form."""
    lines = []
    for rec in report["models"]:
        where = rec["path"] if rec.get("path") else "random weights"
        lines.append(f"\n{rec['model']}: {rec['name']} ({rec['kind']}, {where}), B={report['batch']} "
                     f"{rec['image_size']}x{rec['image_size']}, {rec['num_classes']} classes, "
                     f"{rec.get('dense_tiles') or '-'} tiles at full density"
                     + (f"; x orig: against the original form of {rec['original_from']}" if rec.get("original_from")
                        else ""))
        lines.append(f"  {'form':<14} {'tiles':>8} {'share':>5} {'check':>8}  {'fwd ms':>9} {'iqr':>7} {'img/s':>7} "
                     f"{'x orig':>6} {'/floor':>6}  {'train ms':>9} {'iqr':>7} {'img/s':>7} {'x orig':>6} {'/floor':>6}"
                     f"  {'peak MB fwd/train':>17}")
        for f in rec["forms"]:
            cells = [f"{f['form']:<14}", _num(f.get("tiles"), "d", 8), _num(f.get("tile_density"), ".2f", 5),
                     _num((f.get("check") or {}).get("max_rel_diff"), ".1e", 8)]
            row = "  " + " ".join(cells)
            for stage, images in (("fwd", "fwd_images_s"), ("train", "train_images_s")):
                row += (f"  {_ms(f.get(stage))} {_num(f.get(images), '.1f', 7)} "
                        f"{_num((f.get('speedup_vs_original') or {}).get(stage), '.2f', 6)} "
                        f"{_num((f.get('floor_multiple') or {}).get(stage), '.2f', 6)}")
            peaks = [f.get(k) for k in ("peak_fwd_bytes", "peak_train_bytes")]
            row += "  " + f"{'/'.join(_num(p / 2**20 if p is not None else None, '.1f', 1) for p in peaks):>17}"
            lines.append(row)
        if rec.get("error"):
            lines.append(f"  stopped: {rec['error']}")
    return "\n".join(lines)


def format_comparison(report: dict) -> str:
    """The side-by-side block of a run of several models (``report["comparison"]``), or ``""``."""
    comp = report.get("comparison")
    if not comp:
        return ""
    lines = [f"\nside by side, B={report['batch']}: forward of the converted form; training step of the form "
             "shiftwise train trains",
             f"  {'model':<24} {'size':>5}  {'fwd form':<10} {'img/s':>8}  {'train form':<10} {'train ms':>9} "
             f"{'peak MB':>8}"]
    for row in comp["models"]:
        peak = row.get("peak_train_bytes")
        lines.append(f"  {row['model']:<24} {row['image_size']:>5}  {row['inference_form'] or '-':<10} "
                     f"{_num(row['fwd_images_s'], '.2f', 8)}  {row['train_form'] or '-':<10} "
                     f"{_num(row['train_ms'], '.1f', 9)} {_num(peak / 2**20 if peak is not None else None, '.1f', 8)}")
    for pair in comp["pairs"]:
        lines.append(f"  {pair['model']} / {pair['against']}: converted forward throughput "
                     f"{_num(pair['fwd_throughput'], '.2f', 1)}x, training step time "
                     f"{_num(pair['train_time'], '.2f', 1)}x, training step peak memory "
                     f"{_num(pair.get('train_peak'), '.2f', 1)}x")
    return "\n".join(lines)


def format_model_report(report: dict) -> str:
    """Header, table and legend: what ``shiftwise bench --model`` prints."""
    load = report.get("loadavg_before", [math.nan])[0], report.get("loadavg_after", [math.nan])[0]
    backend = report.get("backend") or "the layers' own (auto)"
    ort = report["versions"].get("onnxruntime", "none") if report.get("onnx") else "none"
    head = (f"shiftwise bench --model on {report['device_name']}, torch {report['versions']['torch']}, taichi "
            f"{report['versions']['taichi']}{'' if ort == 'none' else f', onnxruntime {ort}'}, "
            f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}, "
            f"{report['dtype']}, backend {backend}, "
            f"{report['repeats']} timed runs after {report['warmup']} warm-up; load average {load[0]:.2f} -> "
            f"{load[1]:.2f}")
    text = [head, format_model_table(report)]
    comparison = format_comparison(report)
    if comparison:
        text.append(comparison)
    text += ["", MODEL_LEGEND]
    if not report.get("complete", True):
        text.append("note: incomplete run (interrupted): the forms above are those it finished")
    return "\n".join(text)


def save_model_plot(report: dict, path: str) -> None:
    """Bar chart per model of the forward and training-step medians of each form (needs matplotlib)."""
    plt = _pyplot()
    models = report["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 0.5 + 0.45 * max(len(m["forms"]) for m in models)
                                                      * len(models) + 0.8 * len(models)), squeeze=False)
    for ax, rec in zip(axes[:, 0], models):
        names = [f["form"] for f in rec["forms"]]
        pos = range(len(names))
        for shift, stage, label in ((0.2, "fwd", "forward"), (-0.2, "train", "training step")):
            vals = [(f.get(stage) or {}).get("median_ms", float("nan")) for f in rec["forms"]]
            ax.barh([p + shift for p in pos], [v if math.isfinite(v) else float("nan") for v in vals], 0.4,
                    label=label)
        ax.set_yticks(list(pos), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median)")
        ax.set_title(f"{rec['model']} ({rec['name']}), B={report['batch']} {rec['image_size']}x{rec['image_size']} "
                     f"on {report['device']}, {report['threads']} threads", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save_plot(report: dict, path: str) -> None:
    """Bar chart per case of forward and forward+backward medians (needs matplotlib)."""
    plt = _pyplot()
    cases = report["cases"]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for ax, rec in zip(axes[:, 0], cases):
        rows = [r for r in rec["results"] if math.isfinite(r.get("fwd", {}).get("median_ms", math.inf))]
        names = [r["impl"] for r in rows]
        fwd = [r["fwd"]["median_ms"] for r in rows]
        both = [r.get("fwd_bwd", {}).get("median_ms", float("nan")) for r in rows]
        both = [v if math.isfinite(v) else float("nan") for v in both]  # out of memory: no bar
        pos = range(len(rows))
        ax.barh([p + 0.2 for p in pos], fwd, 0.4, label="forward")
        ax.barh([p - 0.2 for p in pos], both, 0.4, label="forward + backward")
        ax.set_yticks(list(pos), names, fontsize=7)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, log scale)")
        ax.set_title(f"{rec['case']['name']} (B={rec['batch']}) on {report['device']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(report: dict) -> str:
    """Strict JSON text of ``report``: non-finite floats as strings (``"inf"`` for an
    out-of-memory run)."""
    return outputs.json_text(report, indent=1)


def load_report(path: str) -> dict:
    """A report saved by :func:`to_json` (non-finite values restored)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path) as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a bench results file (invalid JSON: {exc})") from None
    if not isinstance(report, dict) or not ("cases" in report or "models" in report):
        raise ValueError(f"{path} is not a bench results file (no 'cases' or 'models')")
    return outputs.json_restore(report)


