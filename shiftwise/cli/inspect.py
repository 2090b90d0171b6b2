"""``shiftwise inspect CKPT``: per-layer tile density and tiles kept per channel (see :mod:`shiftwise.tile_report`)."""
from __future__ import annotations


from .. import outputs
from ..tile_report import checkpoint_report, format_table, overall_density, plot
from . import _options


def register(sub) -> None:
    p = _options.add_command(
        sub, "inspect", "tile density per layer and how many tiles each channel keeps",
        "Tile density of every shift-wise layer of a checkpoint, and for each layer how many\n"
        "channels keep 0, 1, 2... tiles (the paper's Table 2). Reads a sparse training\n"
        "checkpoint, a compacted model or any converted checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="training checkpoint, compact.pt, or a converted checkpoint")
    _options.add_plot(p, "the histograms")
    _options.add_force(p, "the plot file")
    _options.add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    outputs.claim(args.plot, args.force, "--plot")  # before reading anything
    rows = checkpoint_report(args.checkpoint)
    if args.plot:
        with outputs.atomic(args.plot) as tmp:
            plot(rows, tmp, title=str(args.checkpoint))
        _options.wrote(args.plot, "histograms")
    if args.json:
        print(outputs.json_text({"checkpoint": str(args.checkpoint), "density": overall_density(rows), "layers": rows},
                                indent=1))
    else:
        print(format_table(rows))
    return 0
