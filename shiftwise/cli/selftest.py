"""``shiftwise selftest``: check every backend on this machine against PyTorch, then time it
(see :mod:`shiftwise.selftest`)."""
from __future__ import annotations

import sys

from .. import outputs, selftest
from . import _options

DESCRIPTION = (
    "Check this installation on this machine: start Taichi on the device, then compare every\n"
    "backend with PyTorch's depthwise conv of the merged kernel (computed in float64, TF32 off)\n"
    "in float32 and float64 on layers chosen to catch border and indexing errors (kernel strips\n"
    "longer than the map, 7- and 9-pixel maps, widths not a multiple of 32, tile sizes 1, 3, 5\n"
    "and 7, compacted plans with empty channels, batch 1): the output and the input, tile and\n"
    "bias gradients, a finite-difference gradient check in float64, two runs agreeing (bit\n"
    "for bit for the Taichi kernels), and on a GPU no hidden host synchronisation in a forward\n"
    "and backward. Errors are relative to the largest value of the reference; the table states\n"
    "the tolerances. Then a short timing table: the fused shift-wise kernel against PyTorch's\n"
    "depthwise conv (cuDNN on a GPU) on the shift-wise paper's layer and SLaK-T's first stage,\n"
    "keeping all and a quarter of the tiles.\n"
    "\n"
    "The table goes to stdout, progress to stderr. Exit status 0 when every check passes, 1 when\n"
    "one fails (listed by name at the end), 2 when the device cannot be used.")


def register(sub) -> None:
    p = _options.add_command(sub, "selftest", "check every backend against PyTorch on this machine, then time it",
                             DESCRIPTION)
    _options.add_device(p, help="cpu or cuda (default: cuda where available, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="fewer layers (one tile size) and a tiny timing on shrunk layers")
    _options.add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = selftest.run_selftest(args.device, quick=args.quick)
    print(outputs.json_text(result.to_dict()) if args.json else selftest.format_report(result))
    if not result.passed:
        print(f"shiftwise selftest: {len(result.failed)} check(s) failed", file=sys.stderr)
    return 0 if result.passed else 1
