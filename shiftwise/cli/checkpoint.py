"""``shiftwise convert``, ``shiftwise eval`` and ``shiftwise verify``: checkpoints in, reports out."""
from __future__ import annotations

import dataclasses
import sys
import time

from shiftwise.convert.io import convert_checkpoint, read_checkpoint

from ..compare import compare_checkpoints, derived
from ..evaluate import CRITERIA, evaluate_checkpoint, verify_checkpoint
from .. import outputs
from ..dispatch import BACKENDS
from ..models import FAMILIES
from . import _options


def register(sub) -> None:
    p = _options.add_command(
        sub, "convert", "convert an official checkpoint to shift-wise form",
        "Convert an official SLaK, RepLKNet or UniRepLKNet checkpoint into a shift-wise one. The\n"
        "result is written atomically, with what is needed to rebuild the model; the source file\n"
        "is never modified.")
    p.add_argument("src", metavar="SRC", help="official checkpoint (.pth, .pt or .safetensors)")
    _options.add_output(p, "converted checkpoint to write", required=True)
    _model_options(p)
    p.add_argument("--safetensors", action="store_true",
                   help="write safetensors (also chosen when the output name ends in .safetensors)")
    _options.add_force(p)
    _options.add_json(p)
    p.set_defaults(func=_convert)

    p = _options.add_command(
        sub, "eval", "top-1 and top-5 accuracy of a checkpoint on an image folder",
        "Evaluate an official or converted checkpoint on an ImageNet-style folder\n"
        "(root/CLASS/IMAGE), with the evaluation transforms of the original papers' code.")
    p.add_argument("ckpt", metavar="CKPT", help="official or converted checkpoint")
    _model_options(p, tile_help="convert an original checkpoint with this tile side before evaluating")
    _data_options(p, backend_default="the layers' own (auto)")
    p.set_defaults(func=_eval)

    p = _options.add_command(
        sub, "verify", "check a conversion, or compare a sparse model with its origin",
        "An official SRC: convert it in memory, run the original and the converted model on the\n"
        "same images and compare them. Exits 0 only if top-1 accuracy is identical, the predictions\n"
        f"agree on at least {100 * CRITERIA['min_agreement']:g}% of the images and no logit differs by more than "
        f"{CRITERIA['max_abs_diff']:g}; exits 1\n"
        "otherwise. Without SRC: the embedded demo SLaK on the embedded UCI digits.\n\n"
        "A converted or trained SRC (from convert or train): run it and the checkpoint it came from\n"
        "(--against ORIGIN; found without it when that is the embedded demo) on the origin's data and\n"
        "report both accuracies, their difference, how often the predictions agree, the tiles kept\n"
        "and the speed over the origin, in its original and its shift-wise form. Exits 0, or 1 when\n"
        "top-1 drops by more than --max-drop points; a converted SRC must also match its origin as\n"
        "a conversion does.")
    p.add_argument("src", metavar="SRC", nargs="?",
                   help="official checkpoint, or a file written by convert or train (default: the embedded demo)")
    p.add_argument("--against", metavar="ORIGIN",
                   help="the checkpoint SRC was converted or fine-tuned from ('demo': the embedded demo; default: "
                        "found by the hash SRC records when it is the embedded demo)")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="exit 1 when SRC's top-1 is more than this many points below the origin's")
    _model_options(p, tile_help="tile side of the conversion of an official SRC (default: the model's small "
                                "kernel)")
    _data_options(p, backend_default="for a conversion, taichi wherever it runs, so that the shift-wise kernels "
                                     "themselves are checked, else torch; against an origin, the layers' own (auto)")
    p.set_defaults(func=_verify)


def _model_options(p, tile_help: str = "tile side of the shift-wise layers (default: the model's small kernel)"
                   ) -> None:
    _options.add_tile_size(p, help=tile_help)
    p.add_argument("--family", choices=sorted(FAMILIES), help="expected model family (default: inferred from "
                                                              "the weights' shapes)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a SLaK training checkpoint")


def _data_options(p, backend_default: str) -> None:
    _options.add_data(p, "image folder root/CLASS/IMAGE such as imagenet/val; a root holding train/ and val/ "
                         "means its val/ (default for 10-class models such as the demo: the embedded digits)")
    _options.add_image_size(p, help="input side in pixels (default: the checkpoint's, else 224)")
    _options.add_batch_size(p, default=64)
    p.add_argument("--workers", type=int, metavar="N",
                   help="data loading processes (default: min(8, CPUs) for image folders, 0 for the digits)")
    p.add_argument("--limit", type=int, metavar="N", help="use N images spread evenly over the data set")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (counted in the report) instead of stopping")
    _options.add_device(p, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS,
                   help=f"backend of the shift-wise layers (default: the SHIFTWISE_BACKEND environment variable, "
                        f"else {backend_default})")
    _options.add_json(p)


def _data_kwargs(args) -> dict:
    return {"data": args.data, "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
            "limit": args.limit, "device": args.device, "tile_size": args.tile_size, "family": args.family,
            "ema": args.ema, "backend": args.backend, "progress": True, "skip_bad_images": args.skip_bad_images}



def _convert(args) -> int:
    start = time.perf_counter()
    report = convert_checkpoint(args.src, args.output, tile_size=args.tile_size, family=args.family, ema=args.ema,
                                force=args.force, safetensors=args.safetensors or None)
    seconds = time.perf_counter() - start
    _options.wrote(report.output, "converted checkpoint")
    if args.json:
        print(outputs.json_text({**dataclasses.asdict(report), "seconds": seconds}))
        return 0
    for note in report.notes:
        print(f"note: {note}")
    print(f"converted {report.summary()} in {seconds:.1f} s")
    return 0


def _eval(args) -> int:
    run = evaluate_checkpoint(args.ckpt, **_data_kwargs(args))
    print(outputs.json_text(run.as_dict()) if args.json else run.report())
    return 0


def _verify(args) -> int:
    kwargs = _data_kwargs(args)
    ckpt = read_checkpoint(args.src, ema=args.ema, family=args.family) if args.src is not None else None
    if args.against is None and (ckpt is None or not derived(ckpt)):
        if args.max_drop is not None:
            raise ValueError("--max-drop applies to a converted or trained file compared with its origin; an "
                             "official checkpoint's conversion must keep top-1 identical, so leave it out")
        run = verify_checkpoint(ckpt, **kwargs)
    else:
        if ckpt is None:
            raise ValueError("--against ORIGIN needs SRC, the converted or trained file to compare with it")
        tile = kwargs.pop("tile_size", None)
        if tile is not None and tile != ckpt.tile_size:
            raise ValueError(f"--tile-size {tile} applies to converting an official SRC; compared with an origin, "
                             "SRC keeps its own tiles: leave --tile-size out")
        for name in ("family", "ema"):  # applied when reading SRC
            kwargs.pop(name, None)
        run = compare_checkpoints(ckpt, args.against, max_drop=args.max_drop, **kwargs)
    print(outputs.json_text(run.as_dict()) if args.json else run.report())
    sys.stdout.flush()
    return 0 if run.passed else 1
