"""Every file shiftwise writes is read by every command: the demo's conversion, and the
``checkpoint.pt`` and ``compact.pt`` of a run from scratch and of a run fine-tuned from the demo
go through ``load_model``, ``eval``, ``verify``, ``inspect``, ``export`` and ``erf``."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shiftwise import cli, load_model
from shiftwise.convert.io import convert_checkpoint, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise.data import Digits
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.sparse import trainer

# A SLaK-architecture model small enough for a few CPU steps a second (as in test_train).
SCRATCH = ["--model", "slak_demo", "--model-kwargs", '{"dims": [4, 8, 8, 8]}', "--image-size", "16"]
FINE_TUNED = ["--pretrained", "demo"]
STEPS = ["--batch-size", "16", "--backend", "torch", "--update-every", "2", "--eval-every", "100", "--quiet",
         "--steps", "2", "--density", "0.5", "--json"]
FILES = ["converted", "scratch/checkpoint.pt", "scratch/compact.pt", "demo/checkpoint.pt", "demo/compact.pt"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    # the reference ops (no kernel compilation) on one thread (tiny models; a busy machine stalls OpenMP)
    monkeypatch.setenv("SHIFTWISE_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["train", *args, *STEPS]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``{name: (path, test accuracy the trainer reported or None)}`` and an image folder for erf."""
    root = tmp_path_factory.mktemp("written")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = {"converted": (root / "converted.pt", None)}
        convert_checkpoint("demo", root / "converted.pt")
        for name, args in (("scratch", SCRATCH), ("demo", FINE_TUNED)):
            summary = _train([*args, "-o", str(root / name)])
            for what in ("checkpoint.pt", "compact.pt"):
                files[f"{name}/{what}"] = (root / name / what, summary["test_acc"])
    finally:
        torch.set_num_threads(threads)
    for cls in ("a", "b"):
        (root / "images" / cls).mkdir(parents=True)
        pixels = np.random.default_rng(len(cls)).integers(0, 255, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / cls / "0.png")
    return files, root / "images"


def _training_side(path) -> torch.nn.Module:
    """The model as the trainer holds it at the end of the run: its own constructor, the saved
    weights and the tile masks applied."""
    saved = trainer.load_checkpoint(path.parent / "checkpoint.pt")
    args = saved["args"]
    if args["pretrained"]:
        model = trainer.pretrained_model(read_checkpoint(args["pretrained"]), backend="torch")
    else:
        model = trainer.build_model(args["model"], saved["num_classes"], args["tile_size"], "torch",
                                    args["model_kwargs"])
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        for name, mask in saved["sparse"]["masks"].items():
            layer = model.get_submodule(name)
            if isinstance(layer, ShiftWiseConv2d):
                layer.weight[~mask.bool()] = 0
    return model.eval()


@pytest.mark.parametrize("name", FILES)
def test_load_model_gives_the_logits_of_the_model_that_wrote_it(written, name):
    files, _ = written
    path, _ = files[name]
    ckpt = read_checkpoint(path)
    digits = Digits("test", ckpt.transform())
    x = torch.stack([digits[i][0] for i in range(8)])
    model = load_model(path)
    assert any(isinstance(m, ShiftWiseConv2d) for m in model.modules()) and not model.training
    reference = convert_model(load_model("demo")) if name == "converted" else _training_side(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    if name.endswith("compact.pt"):
        assert sum(m.weight.shape[0] for m in model.modules() if isinstance(m, ShiftWiseConv2d)) == ckpt.tiles["kept"]


def _run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


@pytest.mark.parametrize("name", FILES)
def test_eval_gives_the_accuracy_the_trainer_reported(written, capsys, name):
    files, _ = written
    path, reported = files[name]
    result = json.loads(_run(capsys, ["eval", str(path), "--json"]).out)
    if reported is None:  # a lossless conversion: the demo's own accuracy
        reported = json.loads(_run(capsys, ["eval", "demo", "--json"]).out)["top1"]
    assert result["top1"] == pytest.approx(reported, abs=1e-6) and result["images"] == 359


@pytest.mark.parametrize("name", FILES)
def test_verify_compares_with_the_origin(written, capsys, name):
    files, _ = written
    path, _ = files[name]
    argv = ["verify", str(path), "--limit", "32", "--json"]
    if name.startswith("scratch/"):  # no origin: one line naming the way out
        assert cli.main(argv) == 2
        assert "--against ORIGIN" in capsys.readouterr().err
        argv += ["--against", str(files["scratch/checkpoint.pt"][0])]
    result = json.loads(_run(capsys, argv).out)
    assert result["passed"] and result["sparse"]["images"] == 32
    if name == "scratch/compact.pt":  # compaction removes only zero tiles
        assert result["agreement"] == 1.0 and result["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", FILES)
def test_inspect_reads_it(written, capsys, name):
    files, _ = written
    path, _ = files[name]
    ckpt = read_checkpoint(path)
    out = _run(capsys, ["inspect", str(path)]).out
    assert f"({ckpt.tiles['kept']}/{ckpt.tiles['dense']} tiles)" in out


@pytest.mark.parametrize("name", FILES)
def test_export_reads_it(written, capsys, tmp_path, name):
    pytest.importorskip("onnxruntime")
    files, _ = written
    path, _ = files[name]
    result = json.loads(_run(capsys, ["export", str(path), "-o", str(tmp_path / "m.onnx"), "--json"]).out)
    assert result["onnxruntime_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", FILES)
def test_erf_reads_it(written, capsys, name):
    files, images = written
    path, _ = files[name]
    result = json.loads(_run(capsys, ["erf", str(path), "--data", str(images), "--num-images", "1",
                                      "--image-size", "32", "--json"]).out)
    assert result["compare"]["agrees"]
