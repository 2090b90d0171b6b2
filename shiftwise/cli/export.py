"""``shiftwise export``: a checkpoint to ONNX, checked in onnxruntime (see :mod:`shiftwise.export`)."""
from __future__ import annotations

import json
import os

from torch import nn

from ..export import export_onnx


def register(sub) -> None:
    p = sub.add_parser("export", help="export a (converted) checkpoint to ONNX, checked in onnxruntime",
                       description="Export a checkpoint to ONNX. Shift-wise layers become the dense depthwise "
                                   "convolutions they equal; the graph is checked in onnxruntime.")
    p.add_argument("checkpoint", help="official or converted checkpoint")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, default=224, help="input side for the check (the batch is dynamic)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from shiftwise.convert.io import load_model  # noqa: PLC0415 (CLI-only import)

    model = load_model(args.checkpoint)
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    diff = export_onnx(model, args.output, (1, in_chans, args.size, args.size), force=args.force, opset=args.opset)
    result = {"output": args.output, "bytes": os.path.getsize(args.output), "onnxruntime_max_abs_diff": diff}
    if args.json:
        print(json.dumps(result))
    else:
        checked = f"onnxruntime max |logit diff| {diff:.2e}" if diff is not None else "not checked (no onnxruntime)"
        print(f"wrote {args.output} ({result['bytes'] / 1e6:.1f} MB); {checked}")
    return 0
