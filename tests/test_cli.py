"""The ``shiftwise`` command as a whole: one spelling per option in every subcommand, help written
for users, and bad input answered in one line with exit status 2."""
import argparse
import re

import pytest

from shiftwise import cli
from shiftwise.cli import _options

# second spellings of -o/--output, --tile-size, --image-size, --batch-size; none may exist
SECOND_SPELLINGS = {"--out", "--tile", "--size", "--batch", "--save"}
SWITCHES = ("--json", "--ema", "--force")  # flags that take no value
NOT_FOR_USERS = re.compile(r"`|%%|see BATCH|:(func|class|meth):")


def _subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices.items())


SUBCOMMANDS = _subcommands()


def _options_of(parser):
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("name,parser", SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_one_spelling_per_option(name, parser):
    options = _options_of(parser)
    assert not SECOND_SPELLINGS & set(options), f"{name} offers {sorted(SECOND_SPELLINGS & set(options))}"
    for switch in SWITCHES:
        if switch in options:
            assert options[switch].nargs == 0, f"{name} {switch} takes a value; it is a switch"
    if "--output" in options or "-o" in options:
        assert options.get("-o") is options.get("--output"), f"{name}: -o and --output are one option"
    # a prefix of a longer option is not read as that option (no "--tile" for "--tile-size")
    assert not parser.allow_abbrev, name


@pytest.mark.parametrize("name,parser", SUBCOMMANDS, ids=[n for n, _ in SUBCOMMANDS])
def test_help_is_written_for_users(name, parser):
    assert parser.formatter_class is _options.HelpFormatter, f"{name}: register it with _options.add_command"
    text = parser.format_help()
    assert not NOT_FOR_USERS.search(text), f"{name} --help: {NOT_FOR_USERS.search(text).group()!r}\n{text}"
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"{name} {action.option_strings[-1]} has no help text"
            assert "(default X)" not in action.help and not re.search(r"\(default \d", action.help), \
                f"{name} {action.option_strings[-1]}: the formatter shows defaults: {action.help!r}"


def test_top_level_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: shiftwise")
    assert "Shift-wise convolution" in text and "Run 'shiftwise COMMAND --help'" in text
    assert cli.__doc__.splitlines()[0] not in text and "``" not in text and ":class:" not in text
    for name, _ in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s+\w", text, re.M), f"{name} is listed without a description"


def test_bad_argument_is_one_line_exit_2(capsys):
    for argv in (["verify", "--tile", "3"], ["eval"], ["export", "x.pth", "-o", "x.onnx", "--json", "out.json"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"shiftwise {argv[0]}: error: "), err
        assert f"see 'shiftwise {argv[0]} --help'" in err


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    assert cli.main(["verify", "--device", "tpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["shiftwise verify: error: unknown device 'tpu'; use cpu, cuda or cuda:N"]
    assert cli.main(["inspect", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "missing.pt" in err and "Traceback" not in err
