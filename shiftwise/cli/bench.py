"""``shiftwise bench``: time dense and shift-wise large-kernel layers, or whole models, side by side (see
:mod:`shiftwise.bench`)."""
from __future__ import annotations

import os
import sys

import torch

from .. import bench, outputs, progress
from ..dispatch import BACKENDS
from ..evaluate import resolve_device
from ..models import list_models
from . import _options

DESCRIPTION = (
    "Time dense and shift-wise versions of large-kernel depthwise layers side by side, on the\n"
    "same input and weights. Each implementation's output and gradients are checked against\n"
    "the PyTorch reference first; then forward and training-step medians, the peak memory of\n"
    "a training step, and the shift-add stage against a memory-bandwidth floor are reported.\n"
    "The onnx_* rows run the layer exported to ONNX in onnxruntime on the CPU (forward only,\n"
    "--threads intra-op threads). The sw_t preset times the SW layers of SW-T (the shift-wise\n"
    "network): the official computation (every plane held, then shifted sums) against\n"
    "shiftwise's two paths.\n"
    "\n"
    "With --model, whole models instead: checkpoint files, 'demo' (the embedded demo) or\n"
    "registered architecture names (random weights), each timed as the original network, its\n"
    "merged dense form, converted to shift-wise, at the --density shares of its tiles, and as\n"
    "the floor (the network without its large-kernel layers), after checking every converted\n"
    "form's logits against the original's; with --onnx also exported to ONNX in both forms\n"
    "and run in onnxruntime. An SW network is timed in its training form and converted. With\n"
    "several models, a side-by-side block compares the converted forward throughput and the\n"
    "training step (as shiftwise train trains each model) of each model with every model\n"
    "named after it.\n"
    "\n"
    "The table goes to stdout, progress to stderr; exit status 1 if an implementation failed\n"
    "or disagreed with the reference.")

# options of one mode only: the other refuses them (None: not given)
LAYER_ONLY = ("preset", "cases", "shape", "kernels", "densities", "impls", "clock", "dtype")
MODEL_ONLY = ("density", "image_size", "backend", "onnx")


def register(sub) -> None:
    p = _options.add_command(sub, "bench", "time dense and shift-wise large-kernel layers or whole models side by side",
                             DESCRIPTION)
    p.add_argument("--model", nargs="+", metavar="MODEL",
                   help="time whole models: checkpoint files (official, converted, or written by train), demo, or "
                        f"registered names ({', '.join(list_models())})")
    p.add_argument("--density", nargs="+", type=float, metavar="D",
                   help="with --model: also time the shift-wise model keeping this share of each channel's tiles "
                        "(largest first), e.g. 0.5 0.25")
    p.add_argument("--onnx", action="store_true", default=None,
                   help="with --model: also time the shift-wise model exported to ONNX in onnxruntime (CPU, forward "
                        "only), in both forms: dense (one large conv per layer) and shiftwise (the tiles as small "
                        "convs)")
    _options.add_image_size(p, help="with --model: input side (default: the file's, else 224; 32 for the demo)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="with --model: backend of the shift-wise layers (default: the SHIFTWISE_BACKEND environment "
                        "variable, else the layers' own, auto)")
    p.add_argument("--preset", choices=tuple(bench.PRESETS) + ("custom",),
                   help="layers to time: SLaK-T or RepLKNet-31B stages, the shift-wise paper's layer, RepLKNet's "
                        "depthwise stack, the SW layers of SW-T's stages, or one layer given by --shape and --kernels "
                        "(default: paper)")
    p.add_argument("--cases", metavar="NAMES", help="only these layers of the preset (names or endings such as s1,s2)")
    p.add_argument("--shape", metavar="C,H,W", help="custom layer: channels, height, width")
    p.add_argument("--kernels", metavar="KHxKW,...", help="custom layer: parallel branch kernels, e.g. 51x5,5x51,5x5")
    _options.add_tile_size(p, help="tile side N of a custom layer (default: 5), or of the conversion of a --model "
                                   "(default: its small kernel)")
    p.add_argument("--densities", metavar="D,...",
                   help="shares of tiles kept by the shift-wise rows, e.g. 1,0.5,0.25 (default: 1,0.5,0.25)")
    _options.add_batch_size(p, help="images per batch (default: 4 on CPU, 64 on a GPU; 2 and 16 for custom; 8 and 64 "
                                    "for sw_t)")
    p.add_argument("--impls", metavar="NAMES",
                   help=f"implementations to time, comma-separated (default: all): {', '.join(bench.IMPLS)}")
    p.add_argument("--repeats", type=int, metavar="N", help="timed runs per measurement (default: 10; 5 with --model)")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="untimed runs after the first call (default: 2; 1 with --model)")
    _options.add_device(p, default="cpu")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch and Taichi (default: PyTorch's)")
    p.add_argument("--clock", choices=("wall", "cpu"),
                   help="cpu: time with the process's CPU time, for single-threaded runs on a shared machine "
                        "(default: wall)")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="precision of weights and inputs (default: float32)")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random weights and inputs")
    _options.add_output(p, "write the results as JSON here, rewritten after every layer or model form")
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


def _check_mode(args) -> None:
    """Refuse the options of the other mode (layers or whole models)."""
    if args.model and args.from_json:
        raise ValueError("--from-json shows a saved run; leave out --model")
    given, mode = (LAYER_ONLY, "time layers: leave them out with --model") if args.model else \
        (MODEL_ONLY, "need --model (whole models)")
    wrong = [f"--{name.replace('_', '-')}" for name in given if getattr(args, name) is not None]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: options that {mode}")


def _set_threads(threads) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        os.environ["SHIFTWISE_CPU_THREADS"] = str(threads)  # read when Taichi starts


def _run(args) -> int:
    if args.from_json and args.output:
        raise ValueError("--from-json shows a saved run; there is nothing new for --output to write (copy the file)")
    _check_mode(args)
    outputs.claim(args.output, args.force, "--output")  # before minutes of work
    outputs.claim(args.plot, args.force, "--plot")
    failed = []
    if args.from_json:
        report = bench.load_report(args.from_json)
    elif args.model:
        report, failed = _measure_models(args)
    else:
        report = _measure(args)
    models = "models" in report
    if args.json:
        print(bench.to_json(report))
    else:
        print(bench.format_model_report(report) if models else bench.format_report(report))
    if args.plot:
        with outputs.atomic(args.plot) as tmp:
            (bench.save_model_plot if models else bench.save_plot)(report, tmp)
        _options.wrote(args.plot, "plot")
    if models:
        for line in failed:
            print(f"shiftwise bench: error: {line}", file=sys.stderr)
    else:
        failed = bench.failures(report)
        if failed:
            print(f"shiftwise bench: failed (see the table's notes): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and not args.from_json else 0


def _measure(args) -> dict:
    args.preset = args.preset or "paper"
    args.clock, args.dtype = args.clock or "wall", args.dtype or "float32"
    args.tile_size = 5 if args.tile_size is None else args.tile_size
    cases = _cases(args)
    names = bench.resolve_impls(args.impls.split(",") if args.impls else None)
    device = resolve_device(args.device)
    batch = args.batch_size if args.batch_size is not None else bench.default_batch(args.preset, device)
    _set_threads(args.threads)
    written = []
    bar = progress.bar(total=len(cases), desc="bench", unit="layer", enabled=not args.quiet)
    save = _saver(args.output, written, bar)  # after every case: an interrupted run keeps the cases it finished
    try:
        repeats, warmup = 10 if args.repeats is None else args.repeats, 2 if args.warmup is None else args.warmup
        report = bench.run_bench(cases, batch, device, getattr(torch, args.dtype), names, repeats, warmup,
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


def _saver(output, written: list, bar):
    """``save(report)``: rewrite ``output`` (when given) with the report so far, note it in
    ``written`` and advance the progress bar."""
    def save(report):
        if output:
            with outputs.atomic(output) as tmp, open(tmp, "w") as f:
                f.write(bench.to_json(report))
            written[:] = [output]
        bar.update(1)
    return save


def _measure_models(args):
    """The whole-model report, and the failed check's message if one failed (the report then
    holds the forms timed before it and the failure)."""
    device = resolve_device(args.device)
    batch = args.batch_size if args.batch_size is not None else bench.default_batch("models", device)
    _set_threads(args.threads)
    written = []
    bar = progress.bar(desc="bench", unit="form", enabled=not args.quiet)
    save = _saver(args.output, written, bar)  # after every form: an interrupted run keeps the forms it finished
    failed = []
    try:
        report = bench.run_model_bench(
            args.model, args.density or (), batch, args.image_size, 5 if args.repeats is None else args.repeats,
            1 if args.warmup is None else args.warmup, device, args.backend, args.tile_size,
            backward=not args.no_backward, memory=not args.no_memory, seed=args.seed, onnx=bool(args.onnx),
            progress=bar.set_postfix_str, on_form=save)
    except bench.ModelCheckError as exc:  # the forms before it are shown (and kept in --output)
        report, failed = exc.report, [str(exc)]
        save(report)
    except KeyboardInterrupt:
        bar.close()
        if written:
            _options.wrote(args.output, "results of the finished forms")
        raise
    finally:
        bar.close()
    if written:
        _options.wrote(args.output, "results" if not failed else "results of the forms checked before the failure")
    return report, failed
