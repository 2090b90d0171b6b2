"""``shiftwise bench``: time dense and shift-wise large-kernel layers side by side (see :mod:`shiftwise.bench`)."""
from __future__ import annotations

import os
import sys

import torch

from .. import bench, outputs, progress
from ..evaluate import resolve_device
from . import _options

DESCRIPTION = (
    "Time dense and shift-wise versions of large-kernel depthwise layers side by side, on the\n"
    "same input and weights. Each implementation's output and gradients are checked against\n"
    "the PyTorch reference first; then forward and training-step medians, the peak memory of\n"
    "a training step, and the shift-add stage against a memory-bandwidth floor are reported.\n"
    "The table goes to stdout, progress to stderr; exit status 1 if an implementation failed\n"
    "or disagreed with the reference.")


def register(sub) -> None:
    p = _options.add_command(sub, "bench", "time dense and shift-wise large-kernel layers side by side", DESCRIPTION)
    p.add_argument("--preset", choices=tuple(bench.PRESETS) + ("custom",), default="paper",
                   help="layers to time: SLaK-T or RepLKNet-31B stages, the shift-wise paper's layer, RepLKNet's "
                        "depthwise stack, or one layer given by --shape and --kernels")
    p.add_argument("--cases", metavar="NAMES", help="only these layers of the preset (names or endings such as s1,s2)")
    p.add_argument("--shape", metavar="C,H,W", help="custom layer: channels, height, width")
    p.add_argument("--kernels", metavar="KHxKW,...", help="custom layer: parallel branch kernels, e.g. 51x5,5x51,5x5")
    _options.add_tile_size(p, default=5, help="tile side N of a custom layer")
    p.add_argument("--densities", metavar="D,...",
                   help="shares of tiles kept by the shift-wise rows, e.g. 1,0.5,0.25 (default: 1,0.5,0.25)")
    _options.add_batch_size(p, help="images per batch (default: 4 on CPU, 64 on a GPU; 2 and 16 for custom)")
    p.add_argument("--impls", metavar="NAMES",
                   help=f"implementations to time, comma-separated (default: all): {', '.join(bench.IMPLS)}")
    p.add_argument("--repeats", type=int, default=10, metavar="N", help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs after the first call")
    _options.add_device(p, default="cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch and Taichi (default: PyTorch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time with the process's CPU time, for single-threaded runs on a shared machine")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision of weights and inputs")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random weights and inputs")
    _options.add_output(p, "write the results as JSON here, rewritten after every layer")
    _options.add_json(p)
    _options.add_plot(p, "a bar chart of the medians")
    _options.add_force(p, "the output or plot file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--from-json", metavar="FILE", help="show the table (and --plot) of a saved run; measure nothing")
    p.set_defaults(func=_run)


def _cases(args):
    densities = None
    if args.densities:
        try:
            densities = [float(d) for d in args.densities.split(",")]
        except ValueError:
            raise ValueError(f"--densities wants numbers such as 1,0.5,0.25, got {args.densities!r}") from None
    if args.preset == "custom":
        if not (args.shape and args.kernels):
            raise ValueError("--preset custom needs --shape C,H,W and --kernels KHxKW[,...]")
        return bench.with_densities([bench.custom_case(args.shape, args.kernels, args.tile_size)], densities)
    return bench.select_cases(args.preset, args.cases.split(",") if args.cases else None, densities)


def _run(args) -> int:
    if args.from_json and args.output:
        raise ValueError("--from-json shows a saved run; there is nothing new for --output to write (copy the file)")
    outputs.claim(args.output, args.force, "--output")  # before minutes of work
    outputs.claim(args.plot, args.force, "--plot")
    if args.from_json:
        report = bench.load_report(args.from_json)
    else:
        report = _measure(args)
    print(bench.to_json(report) if args.json else bench.format_report(report))
    if args.plot:
        with outputs.atomic(args.plot) as tmp:
            bench.save_plot(report, tmp)
        _options.wrote(args.plot, "plot")
    failed = bench.failures(report)
    if failed:
        print(f"shiftwise bench: failed (see the table's notes): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and not args.from_json else 0


def _measure(args) -> dict:
    cases = _cases(args)
    names = bench.resolve_impls(args.impls.split(",") if args.impls else None)
    device = resolve_device(args.device)
    batch = args.batch_size if args.batch_size is not None else bench.default_batch(args.preset, device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["SHIFTWISE_CPU_THREADS"] = str(args.threads)  # read when Taichi starts
    written = []

    def save(report):  # after every case: an interrupted run keeps the cases it finished
        if args.output:
            with outputs.atomic(args.output) as tmp, open(tmp, "w") as f:
                f.write(bench.to_json(report))
            written[:] = [args.output]
        bar.update(1)

    bar = progress.bar(total=len(cases), desc="bench", unit="layer", enabled=not args.quiet)
    try:
        report = bench.run_bench(cases, batch, device, getattr(torch, args.dtype), names, args.repeats, args.warmup,
                                 backward=not args.no_backward, memory=not args.no_memory, clock=args.clock,
                                 seed=args.seed, preset=args.preset, progress=bar.set_postfix_str, on_case=save)
    except KeyboardInterrupt:
        bar.close()
        if written:
            _options.wrote(args.output, "results of the finished layers")
        raise
    bar.close()
    if written:
        _options.wrote(args.output, "results")
    return report
