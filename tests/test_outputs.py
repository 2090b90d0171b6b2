"""Output files: no overwrite without --force (checked before any work), atomic writes."""
import json
import math

import pytest

from shiftwise import cli, outputs
from shiftwise.errors import OutputExistsError, ShiftwiseError


def test_claim_refuses_existing_directory_and_missing_folder(tmp_path):
    assert outputs.claim(None, False) is None
    new = tmp_path / "new.json"
    assert outputs.claim(str(new), False) == str(new)
    new.write_text("mine")
    with pytest.raises(OutputExistsError, match="pass --force"):
        outputs.claim(str(new), False, "--json")
    assert outputs.claim(str(new), True) == str(new)
    with pytest.raises(ShiftwiseError, match="is a directory"):
        outputs.claim(str(tmp_path), True)
    with pytest.raises(ShiftwiseError, match="does not exist; create it first"):
        outputs.claim(str(tmp_path / "nope" / "a.png"), False)


def test_atomic_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.png"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.atomic(str(path)) as tmp:
            assert tmp.endswith(".png") and tmp != str(path)  # same suffix: format inferred from it
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with outputs.atomic(str(path)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


BENCH = ["bench", "--preset", "custom", "--shape", "2,8,8", "--kernels", "7x5", "--batch-size", "1", "--repeats",
         "1", "--warmup", "0", "--densities", "1", "--impls", "torch_depthwise", "--no-backward", "--no-memory",
         "--quiet"]


def test_bench_keeps_an_existing_output_unless_forced(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("user data")
    assert cli.main([*BENCH, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "pass --force" in err and out.read_text() == "user data"
    assert cli.main([*BENCH, "-o", str(out), "--force"]) == 0
    assert len(json.loads(out.read_text())["cases"]) == 1
    assert any(line.startswith("wrote ") and line.endswith(str(out)) for line in capsys.readouterr().err.splitlines())
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_inspect_and_erf_refuse_existing_outputs_before_reading(tmp_path, capsys):
    png = tmp_path / "p.png"
    png.write_bytes(b"keep")
    # the checkpoint does not exist: the refusal must come first, without reading anything
    assert cli.main(["inspect", str(tmp_path / "missing.pt"), "--plot", str(png)]) == 2
    assert "pass --force" in capsys.readouterr().err
    npy = tmp_path / "map.npy"
    npy.write_bytes(b"keep")
    assert cli.main(["erf", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "-o", str(tmp_path / "map")]) == 2
    assert "map.npy exists; pass --force" in capsys.readouterr().err
    assert png.read_bytes() == b"keep" and npy.read_bytes() == b"keep"


def test_json_text_is_strict_and_round_trips_non_finite_values():
    value = {"ms": [1.5, float("inf")], "err": float("nan"), "name": "x", "nested": ({"low": -math.inf},)}
    text = outputs.json_text(value)
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["ms"] == [1.5, "inf"] and loaded["nested"] == [{"low": "-inf"}]
    back = outputs.json_restore(loaded)
    assert back["ms"] == [1.5, math.inf] and math.isnan(back["err"]) and back["nested"][0]["low"] == -math.inf
