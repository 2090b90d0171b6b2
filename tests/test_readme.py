"""The README is short, its Python examples run as written, and CI runs its test command."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_is_short_and_links_resolve():
    assert len(README.splitlines()) <= 250
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_example_runs(index):
    namespace: dict = {"__name__": "readme"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102 (our README)


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 3


def _commands(text: str) -> list:
    text = text.replace("python3 -m pip", "pip").replace("python3 -m pytest", "python -m pytest")
    return [c.strip() for c in re.sub(r"pip install -q ", "pip install ", text).split("&&")]


def test_ci_runs_the_readme_test_command():
    bash = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(b.strip() for b in bash if "pytest" in b)
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln]
    assert len(ci) == 1 and _commands(ci[0]) == _commands(test_command)


def test_pretrained_walkthrough_runs(tmp_path, monkeypatch, capsys):
    """The README's path from the demo to sparse files, evaluated, exported and benchmarked (fewer steps)."""
    from shiftwise import cli

    block = next(b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if "--pretrained demo" in b)
    lines = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert len(lines) >= 6 and all(ln.startswith("shiftwise ") for ln in lines)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = line.replace("--steps 90", "--steps 4 --update-every 1 --quiet").split()[1:]
        if args[0] == "bench":
            args += ["--repeats", "1", "--batch-size", "2"]
        assert cli.main(args) == 0, line
    out = capsys.readouterr().out
    assert "compact" in out and (tmp_path / "demo30.onnx").stat().st_size > 0
