"""``shiftwise erf``: the effective receptive field of a checkpoint (see :mod:`shiftwise.erf`)."""
from __future__ import annotations


import numpy as np

from .. import outputs
from ..erf import erf_checkpoint, save_heatmap
from . import _options


def register(sub) -> None:
    p = _options.add_command(
        sub, "erf", "effective receptive field of a checkpoint's model",
        "Effective receptive field of the last stage, measured as in the RepLKNet paper: the\n"
        "gradient of the centre output with respect to the input, averaged over images. By\n"
        "default it is measured for the model and for its shift-wise conversion, which must\n"
        "agree (exit 1 if they do not).")
    p.add_argument("checkpoint", metavar="CKPT", help="official or converted checkpoint")
    _options.add_data(p, "image folder root/CLASS/IMAGE to draw the images from", required=True)
    p.add_argument("--num-images", type=int, default=50, metavar="N", help="images to average over")
    _options.add_image_size(p, default=1024, help="input side in pixels; images are resized to this square")
    _options.add_device(p, default="cpu")
    _options.add_tile_size(p, help="tile side of the conversion (default: the model's small kernel)")
    p.add_argument("--no-compare", action="store_true", help="measure only the model in the checkpoint")
    _options.add_output(p, "write the contribution map here as a NumPy .npy file (.npy is appended if missing)")
    _options.add_plot(p, "a heatmap of the contribution map")
    _options.add_force(p, "an output or plot file")
    _options.add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    output = args.output
    if output and not output.endswith(".npy"):
        output += ".npy"  # as np.save names it
    outputs.claim(output, args.force, "--output")  # before minutes of work
    outputs.claim(args.plot, args.force, "--plot")
    result = erf_checkpoint(args.checkpoint, args.data, args.num_images, args.image_size, args.device,
                            tile_size=args.tile_size, compare=not args.no_compare, progress=True)
    if output:
        with outputs.atomic(output) as tmp, open(tmp, "wb") as f:
            np.save(f, result.map)
        _options.wrote(output, "contribution map")
    if args.plot:
        with outputs.atomic(args.plot) as tmp:
            save_heatmap(result.map, tmp, title=f"ERF {result.name} ({result.num_images} images)")
        _options.wrote(args.plot, "heatmap")
    print(outputs.json_text(result.as_dict()) if args.json else result.report())
    return 0 if result.agrees else 1
