"""``shiftwise export``: a checkpoint to ONNX, checked in onnxruntime (see :mod:`shiftwise.export`)."""
from __future__ import annotations


from .. import outputs
from ..export import export_checkpoint
from . import _options


def register(sub) -> None:
    p = _options.add_command(
        sub, "export", "export a checkpoint to ONNX, checked in onnxruntime",
        "Export an official or converted checkpoint to ONNX. Shift-wise layers become the dense\n"
        "depthwise convolutions they equal, so the graph holds only standard operators. The file\n"
        "is then run in onnxruntime (when installed) and compared with PyTorch.")
    p.add_argument("checkpoint", metavar="CKPT", help="official or converted checkpoint")
    _options.add_output(p, "ONNX file to write", required=True)
    _options.add_image_size(p, help="input side in pixels for the check (default: the checkpoint's, else 224); the "
                                    "batch size of the graph is dynamic")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX operator set version")
    _options.add_force(p)
    _options.add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = export_checkpoint(args.checkpoint, args.output, image_size=args.image_size, opset=args.opset,
                               force=args.force)
    _options.wrote(result["output"], "ONNX model")
    diff = result["onnxruntime_max_abs_diff"]
    if args.json:
        print(outputs.json_text(result, indent=None))
        return 0
    checked = ("not checked (onnxruntime is not installed)" if diff is None
               else f"onnxruntime max |logit diff| {diff:.2e}")
    print(f"ONNX model of {result['bytes'] / 1e6:.1f} MB; {checked}")
    return 0
