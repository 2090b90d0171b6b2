"""The options every command spells the same way, and how commands report what they wrote.

One vocabulary: ``-o/--output`` (the main path a command writes), ``--plot PATH``,
``--batch-size``, ``--image-size``, ``--tile-size``, ``--data``, ``--device``, ``--json``
(results on stdout as JSON), ``--force``. Defaults are shown by :class:`HelpFormatter`.
"""
from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to options that have a
    default worth showing (not ``None`` / ``False``, nor the value of a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default is argparse.SUPPRESS
                or not action.option_strings or "default" in text or action.nargs == 0):  # switches
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub, name: str, help: str, description: str = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatter."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def add_output(p, help: str, required: bool = False, default=None, metavar: str = "PATH") -> None:
    p.add_argument("-o", "--output", required=required, default=default, metavar=metavar, help=help)


def add_force(p, what: str = "the output") -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite {what} if it exists")


def add_json(p) -> None:
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (nothing else there)")


def add_plot(p, what: str = "a figure") -> None:
    p.add_argument("--plot", metavar="PATH", help=f"write {what} as PNG here (needs matplotlib)")


def add_batch_size(p, default=None, help: str = "images per batch") -> None:
    p.add_argument("--batch-size", type=int, default=default, metavar="B", help=help)


def add_image_size(p, default=None, help: str = "input side in pixels") -> None:
    p.add_argument("--image-size", type=int, default=default, metavar="S", help=help)


def add_tile_size(p, default=None, help: str = "tile side N of the shift-wise layers") -> None:
    p.add_argument("--tile-size", type=int, default=default, metavar="N", help=help)


def add_data(p, help: str, required: bool = False, default=None) -> None:
    p.add_argument("--data", required=required, default=default, metavar="DIR", help=help)


def add_device(p, default=None, help: str = "cpu, cuda or cuda:N") -> None:
    p.add_argument("--device", default=default, help=help)


def wrote(path, what: str = "") -> None:
    """Say in one line (on stderr, so stdout stays machine-readable) that ``path`` was written."""
    label = f"{what} " if what else ""
    print(f"wrote {label}{os.fspath(path)}", file=sys.stderr)
