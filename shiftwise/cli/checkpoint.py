"""``shiftwise convert``, ``shiftwise eval`` and ``shiftwise verify``: checkpoints in, reports out."""
from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import math
import os
import sys
import time

import torch

from shiftwise.convert.io import FAMILY_NAMES, build_model, convert_checkpoint, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise.data import DIGITS_SIZE, Digits, ImageFolder, make_loader, package_file, transform_for
from shiftwise.evaluate import evaluate, verify
from shiftwise.functional import BACKENDS, resolve_backend
from shiftwise.models import FAMILIES
from shiftwise.modules import ShiftWiseConv2d

DEMO_CHECKPOINT = "slak_demo.pth"


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a SLaK/RepLKNet/UniRepLKNet checkpoint to shift-wise",
                       description="Convert an official checkpoint into a shift-wise one (written atomically, "
                                   "with the metadata to rebuild it; the source is never modified).")
    p.add_argument("src", metavar="SRC", help="official checkpoint (.pth, .pt or .safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="DST", help="converted checkpoint to write")
    _common(p, data=False)
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--safetensors", action="store_true", help="write safetensors (also when DST ends in .safetensors)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on an ImageFolder",
                       description="Evaluate an official or converted checkpoint on an ImageNet-style folder "
                                   "(root/<class>/<image>) with the sources' transforms.")
    p.add_argument("ckpt", metavar="CKPT", help="official or converted checkpoint")
    _common(p, data=True)
    p.add_argument("--json", action="store_true", help="print machine-readable results only")
    p.set_defaults(func=_eval)

    p = sub.add_parser("verify", help="prove a conversion classifies exactly as the original",
                       description="Convert SRC in memory, run original and converted on the same batches and "
                                   "compare. Exit 0 only if top-1 is identical, predictions agree on >= 99.99%% "
                                   "of the images and max |logit difference| <= 1e-3. Without SRC: the embedded "
                                   "demo SLaK on the embedded UCI digits.")
    p.add_argument("src", metavar="SRC", nargs="?", help="official checkpoint (default: the embedded demo)")
    _common(p, data=True)
    p.add_argument("--json", action="store_true", help="print machine-readable results only (stdout)")
    p.set_defaults(func=_verify)


def _common(p: argparse.ArgumentParser, data: bool) -> None:
    p.add_argument("--tile", type=int, metavar="N", help="tile size (default: the model's small kernel)")
    p.add_argument("--family", choices=sorted(FAMILIES), help="expected family (default: inferred from shapes)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights ('model_ema') of a SLaK checkpoint")
    if not data:
        return
    p.add_argument("--data", metavar="DIR", help="ImageFolder root, e.g. imagenet/val (default for 10-class "
                                                 "models such as the demo: the embedded digits)")
    p.add_argument("--size", type=int, metavar="S", help="input resolution (default: the checkpoint's, else 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, help="data loading processes (default: min(8, CPUs); 0 for the digits)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate N images spread evenly over the data set")
    p.add_argument("--backend", choices=BACKENDS, help="backend of the shift-wise layers (default: "
                                                       "SHIFTWISE_BACKEND, else auto for eval and taichi for "
                                                       "verify, so that the shift-wise kernels themselves are "
                                                       "checked; torch where Taichi cannot run)")


def _convert(args) -> int:
    start = time.perf_counter()
    report = convert_checkpoint(args.src, args.output, tile_size=args.tile, family=args.family, ema=args.ema,
                                force=args.force, safetensors=args.safetensors or None)
    for note in report.notes:
        print(f"note: {note}")
    print(f"converted {report.summary()} in {time.perf_counter() - start:.1f} s")
    return 0


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def _dataset(args, ckpt):
    """(dataset, description): --data, or the embedded digits for a 10-class model."""
    if args.data is None:
        if ckpt.config["kwargs"].get("num_classes") != 10:
            raise ValueError("--data DIR is needed (an ImageFolder such as imagenet/val); the embedded digits "
                             "fit only 10-class models such as the embedded demo")
        size = args.size or ckpt.input_size or DIGITS_SIZE
        dataset = Digits("test", transform_for(ckpt.config, size))
        return dataset, f"embedded UCI digits (test split), {size}x{size}"
    size = args.size or ckpt.input_size or 224
    dataset = ImageFolder(args.data, transform_for(ckpt.config, size))
    return dataset, f"{args.data} ({len(dataset.classes)} classes), {size}x{size}"


@contextlib.contextmanager
def _source(src):
    if src is not None:
        yield src, False
        return
    with importlib.resources.as_file(package_file(DEMO_CHECKPOINT)) as path:
        yield str(path), True


def _dump(obj) -> str:
    """JSON with non-finite floats as strings ("inf"), so any parser reads it."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps(clean(obj), indent=2)


def _eval(args) -> int:
    device = _device(args.device)
    ckpt = read_checkpoint(args.ckpt, ema=args.ema, family=args.family)
    model = build_model(ckpt)
    if args.tile is not None:
        if ckpt.converted:
            raise ValueError(f"--tile converts an original checkpoint; {args.ckpt} is already converted "
                             f"(tile {ckpt.tile_size})")
        model = convert_model(model, tile_size=args.tile, inplace=True)
    if args.backend is not None:
        for m in model.modules():
            if isinstance(m, ShiftWiseConv2d):
                m.backend = args.backend
    dataset, data_desc = _dataset(args, ckpt)
    loader = make_loader(dataset, args.batch_size, args.workers, args.limit, device)
    start = time.perf_counter()
    result = evaluate(model, loader, device, progress=True)
    wall = time.perf_counter() - start
    if args.json:
        print(_dump({"checkpoint": args.ckpt, "family": ckpt.family, "model": ckpt.config, "converted": ckpt.converted,
                     "data": data_desc, "device": str(device), "wall_seconds": wall, **result.as_dict()}))
        return 0
    kind = f"converted, tile {ckpt.tile_size}" if ckpt.converted else "original"
    print(f"shiftwise eval: {ckpt.description} ({kind}) from {args.ckpt}")
    print(f"data: {data_desc}, {result.images} images, batch {args.batch_size}, device {device}")
    print(f"top-1 {result.top1:.2f}%   top-5 {result.top5:.2f}%   {result.throughput:.1f} images/s   "
          f"({wall:.1f} s)")
    return 0


def _verify(args) -> int:
    start = time.perf_counter()
    device = _device(args.device)
    with _source(args.src) as (src, embedded):
        ckpt = read_checkpoint(src, ema=args.ema, family=args.family)
    if ckpt.converted:
        raise ValueError(f"{src} is already converted; verify takes the original checkpoint and converts it")
    original = build_model(ckpt)
    # a converted copy; by default on the Taichi kernels (on a CPU, "auto" would run the demo's
    # small maps as dense convs of the merged kernels and check only the split and merge)
    backend = args.backend or os.environ.get("SHIFTWISE_BACKEND") or (
        "taichi" if resolve_backend("auto", device) == "taichi" else "torch")
    converted = convert_model(original, tile_size=args.tile, backend=backend)
    layers = [m for m in converted.modules() if isinstance(m, ShiftWiseConv2d)]
    dataset, data_desc = _dataset(args, ckpt)
    loader = make_loader(dataset, args.batch_size, args.workers, args.limit, device)
    result = verify(original, converted, loader, device, progress=True)
    wall = time.perf_counter() - start
    tile = layers[0].small_kernel if layers else None
    if args.json:
        print(_dump({"source": "embedded demo" if embedded else src, "family": ckpt.family, "model": ckpt.config,
                     "tile_size": tile, "layers": len(layers), "tiles": sum(m.weight.shape[0] for m in layers),
                     "backend": backend,
                     "data": data_desc, "device": str(device), "wall_seconds": wall, **result.as_dict()}))
    else:
        where = f"embedded demo ({DEMO_CHECKPOINT})" if embedded else src
        print(f"shiftwise verify: {FAMILY_NAMES[ckpt.family]} {ckpt.config['name']} from {where}")
        print(f"converted: {len(layers)} large-kernel layers -> ShiftWiseConv2d, tile {tile}, "
              f"{sum(m.weight.shape[0] for m in layers)} tiles, backend {backend}")
        print(f"data: {data_desc}, batch {args.batch_size}, device {device}")
        print(result.report())
        print(f"wall time: {wall:.1f} s")
    sys.stdout.flush()
    return 0 if result.passed else 1
