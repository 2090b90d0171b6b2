"""The examples in the public docstrings run as written, and help() renders the public API."""
import doctest
import importlib
import pydoc

import pytest

import shiftwise

MODULES = ["shiftwise.tiling", "shiftwise.functional", "shiftwise.modules", "shiftwise.export", "shiftwise.erf",
           "shiftwise.convert.swap"]


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
