"""``shiftwise erf``: the effective receptive field of a checkpoint (see :mod:`shiftwise.erf`)."""
from __future__ import annotations

import json
import time

import numpy as np

from .. import outputs
from ..erf import THRESHOLDS, SquareTransform, area_ratios, erf_map, save_heatmap


def register(sub) -> None:
    p = sub.add_parser("erf", help="effective receptive field of a model (RepLKNet's method)",
                       description="Effective receptive field of the last stage, as the RepLKNet paper measures it; "
                                   "by default for the model and its shift-wise conversion, which must agree.")
    p.add_argument("checkpoint", help="official or converted checkpoint")
    p.add_argument("--data", required=True, help="ImageFolder-layout directory of images")
    p.add_argument("--num-images", type=int, default=50, help="images to average over (default 50)")
    p.add_argument("--size", type=int, default=1024, help="input side; images are resized to SxS (default 1024)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=None, help="tile size of the conversion (default: the model's)")
    p.add_argument("--no-compare", action="store_true", help="do not also measure the converted model")
    p.add_argument("--plot", help="write a heatmap PNG here")
    p.add_argument("--save", help="write the contribution map as .npy here (.npy appended if missing)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--force", action="store_true", help="overwrite existing --plot / --save files")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from shiftwise.convert.io import read_checkpoint, build_model  # noqa: PLC0415 (CLI-only imports)
    from shiftwise.convert.swap import convert_model  # noqa: PLC0415
    from shiftwise.data import ImageFolder, make_loader, transform_for  # noqa: PLC0415
    from shiftwise.modules import ShiftWiseConv2d  # noqa: PLC0415

    outputs.claim(args.plot, args.force, "--plot")
    if args.save and not args.save.endswith(".npy"):
        args.save += ".npy"  # as np.save names it
    outputs.claim(args.save, args.force, "--save")
    ckpt = read_checkpoint(args.checkpoint)
    model = build_model(ckpt).to(args.device)
    transform = SquareTransform(transform_for(ckpt.config, args.size), args.size)
    loader = make_loader(ImageFolder(args.data, transform), batch_size=1, limit=args.num_images, device=args.device)
    results = {"checkpoint": args.checkpoint, "num_images": args.num_images, "size": args.size}
    t0 = time.perf_counter()
    erf = erf_map(model, loader, args.num_images, device=args.device, progress=not args.json)
    is_converted = any(isinstance(m, ShiftWiseConv2d) for m in model.modules())
    results["model"] = {"converted": is_converted, "area_ratio": area_ratios(erf),
                        "seconds": round(time.perf_counter() - t0, 2)}
    if not args.no_compare:
        other = build_model(ckpt).to(args.device) if is_converted else None
        if other is None:
            other = convert_model(model, tile_size=args.tile)
            label = "converted"
        else:
            label = "converted (again)"
        other_erf = erf_map(other.eval(), loader, args.num_images, device=args.device, progress=not args.json)
        scale = max(float(np.abs(erf).max()), 1e-30)
        diff = float(np.abs(other_erf - erf).max())
        results["compare"] = {"label": label, "area_ratio": area_ratios(other_erf),
                              "max_abs_diff": diff, "max_rel_diff": diff / scale}
    if args.save:
        with outputs.atomic(args.save) as tmp, open(tmp, "wb") as f:
            np.save(f, erf)
    if args.plot:
        with outputs.atomic(args.plot) as tmp:
            save_heatmap(erf, tmp, title=f"ERF {ckpt.config['name']} ({args.num_images} images)")
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"ERF of {ckpt.config['name']} over {args.num_images} images at {args.size}x{args.size}")
    print(f"{'threshold':>10} {'side':>6} {'area ratio':>11}" + ("   converted: side  ratio" if "compare" in results else ""))
    for t in map(str, THRESHOLDS):
        a = results["model"]["area_ratio"][t]
        line = f"{float(t) * 100:>9.0f}% {a['side']:>6} {a['ratio'] * 100:>10.2f}%"
        if "compare" in results:
            b = results["compare"]["area_ratio"][t]
            line += f"   {b['side']:>15} {b['ratio'] * 100:>6.2f}%"
        print(line)
    if "compare" in results:
        c = results["compare"]
        same = c["max_rel_diff"] <= 1e-4 and all(
            c["area_ratio"][t] == results["model"]["area_ratio"][t] for t in c["area_ratio"])
        print(f"original vs {c['label']}: max |diff| {c['max_abs_diff']:.3e} "
              f"({c['max_rel_diff']:.1e} of the peak): {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    return 0

