"""The ``shiftwise`` command. Each subcommand lives with its area and registers itself here.

A module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser with
:func:`shiftwise.cli._options.add_command` and sets ``func`` (called with the parsed namespace,
returns the exit code). Errors caused by the user (:class:`shiftwise.ShiftwiseError`,
``ValueError``, ``FileNotFoundError``...) and bad arguments print one line to stderr and exit 2;
a traceback means a bug.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .._version import __version__
from ..errors import ShiftwiseError
from . import _options

COMMANDS = (
    "shiftwise.cli.bench",
    "shiftwise.cli.inspect",
    "shiftwise.cli.train",
    "shiftwise.cli.checkpoint",
    "shiftwise.cli.erf",
    "shiftwise.cli.export",
    "shiftwise.cli.selftest",
)

_USER_ERRORS = (ShiftwiseError, ValueError, TypeError, FileNotFoundError, IsADirectoryError,
                NotADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    """Takes only whole option names (an old spelling such as ``--tile`` is not read as an
    abbreviation of ``--tile-size``) and reports a bad argument in one line. Subcommand parsers
    are of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shiftwise",
        description="Shift-wise convolution: convert, verify, sparse-train, benchmark and export large-kernel CNNs.",
        epilog="Run 'shiftwise COMMAND --help' for the options of one command.",
        formatter_class=_options.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"shiftwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, whose options the user was reaching for
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        print(f"shiftwise {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`shiftwise ... --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except KeyboardInterrupt as exc:  # a command may say where it stopped and what it saved
        print(f"shiftwise {args.command}: interrupted" + (f" {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
