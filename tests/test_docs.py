"""The examples in the public docstrings run as written, and help() renders the public API."""
import doctest
import importlib
import pathlib
import pydoc
import re
import subprocess

import pytest

import shiftwise

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODULES = ["shiftwise.tiling", "shiftwise.functional", "shiftwise.modules", "shiftwise.export", "shiftwise.erf", "shiftwise.dispatch",
           "shiftwise.convert.swap", "shiftwise.onnx_form"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("name", shiftwise.__all__)
def test_public_api_has_help(name):
    obj = getattr(shiftwise, name)
    if name == "__version__":
        return
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20, f"{name} has no docstring"
    assert obj.__doc__.strip().splitlines()[0] in text


# Words that speak of how the code was developed rather than of what it does: a numbered work
# period, the development machine, the tracker and its items, target labels, numbered file names.
_PERIOD, _MACHINE, _TRACKER = "session", "VM", "issue"
HISTORY = re.compile(rf"\b{_PERIOD}s? \d|\b{_PERIOD}-\d|this {_MACHINE}\b|\bthe {_TRACKER}'?s?\b|\b{_TRACKER} #?\d"
                     r"|\bT[1-4]\b|-s\d+-", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".cfg", ".toml", ".txt", ".sh", ".json", ".jsonl"}


def _tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_no_development_history_in_code_docs_or_file_names():
    found = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if HISTORY.search(path.name):
            found.append(f"file name {rel}")
        if path.suffix not in TEXT_SUFFIXES or not path.exists():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            match = HISTORY.search(line)
            if match:
                found.append(f"{rel}:{number}: {match.group(0)!r}")
    assert not found, "development history in the product:\n" + "\n".join(found[:50])
