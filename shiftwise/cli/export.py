"""``shiftwise export``: a checkpoint to ONNX, checked in onnxruntime (see :mod:`shiftwise.export`)."""
from __future__ import annotations


from .. import outputs
from ..export import export_checkpoint
from ..onnx_form import FORMS
from . import _options


def register(sub) -> None:
    p = _options.add_command(
        sub, "export", "export a checkpoint to ONNX, checked in onnxruntime",
        "Export a checkpoint to ONNX with standard operators only. Each shift-wise layer becomes\n"
        "either the dense depthwise convolution it equals or its small tiles with their shifts\n"
        "and sums (--form; by default whichever the measured rule says runs faster in\n"
        "onnxruntime for that layer). The file is run in onnxruntime and compared with PyTorch\n"
        "before it is written. Needs the export extra: pip install 'torch-shiftwise[export]'.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, or 'demo' for the embedded demo")
    _options.add_output(p, "ONNX file to write", required=True)
    _options.add_image_size(p, help="input side in pixels for the check (default: the checkpoint's, else 224); the "
                                    "batch size of the graph is dynamic")
    p.add_argument("--form", choices=FORMS, default="auto",
                   help="how shift-wise layers are written: auto (per layer, the measured rule), dense (one large "
                        "depthwise convolution) or shiftwise (the tiles as small convolutions)")
    p.add_argument("--dynamic-size", action="store_true", help="make the image height and width dynamic too")
    p.add_argument("--dynamo", action="store_true", help="use PyTorch's dynamo-based ONNX exporter (slower)")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX operator set version")
    _options.add_force(p)
    _options.add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = export_checkpoint(args.checkpoint, args.output, image_size=args.image_size, opset=args.opset,
                               force=args.force, form=args.form, dynamic_hw=args.dynamic_size, dynamo=args.dynamo)
    _options.wrote(result["output"], "ONNX model")
    if args.json:
        print(outputs.json_text(result, indent=None))
        return 0
    print(f"ONNX model of {result['bytes'] / 1e6:.1f} MB; onnxruntime max |logit diff| "
          f"{result['onnxruntime_max_abs_diff']:.2e}")
    print(f"forms: {result['forms']}")
    return 0
