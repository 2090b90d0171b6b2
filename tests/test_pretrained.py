"""``shiftwise train --pretrained``: fine-tuning a released checkpoint into a sparse shift-wise model,
and the self-describing files it writes."""
import hashlib
import shutil

import pytest
import torch
from PIL import Image

import shiftwise
from shiftwise import cli
from shiftwise.convert.io import demo_path, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise.data import DIGITS_SIZE, Digits, EvalTransform
from shiftwise.errors import ShiftwiseError
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.sparse.trainer import TrainConfig, pretrained_model, train

FAST = dict(steps=6, update_every=2, schedule_end=3, batch_size=32, eval_every=6, warmup=1, lr=2e-4)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _digits_batch(n=64):
    ds = Digits("test", EvalTransform(DIGITS_SIZE))
    return torch.stack([ds[i][0] for i in range(n)]), torch.tensor([ds[i][1] for i in range(n)])


def _tiles(model) -> int:
    return sum(m.weight.shape[0] for m in model.modules() if isinstance(m, ShiftWiseConv2d))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    summary = train(TrainConfig(pretrained="demo", density=0.5, output=str(out), **FAST), show_progress=False)
    return out, summary


def test_pretrained_model_is_the_exact_conversion():
    original = shiftwise.load_model("demo")
    model = pretrained_model(read_checkpoint("demo")).eval()
    x, _ = _digits_batch(16)
    with torch.no_grad():
        ref, got = original(x.double().float()), model(x)
    assert any(isinstance(m, ShiftWiseConv2d) for m in model.modules())
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fine_tuned_files_describe_themselves(run):
    out, summary = run
    demo_sha = _sha(demo_path())
    compact, checkpoint = read_checkpoint(out / "compact.pt"), read_checkpoint(out / "checkpoint.pt")
    assert (compact.kind, checkpoint.kind) == ("compact", "train")
    dense = _tiles(convert_model(shiftwise.load_model("demo")))
    small = shiftwise.load_model(out / "compact.pt")
    assert (compact.tiles["kept"], compact.tiles["dense"]) == (_tiles(small), dense)
    assert sum(compact.tiles["layers"].values()) == dense
    assert _tiles(small) <= 0.55 * dense
    for ckpt in (compact, checkpoint):
        assert ckpt.origin_sha256 == ckpt.source_sha256 == demo_sha
        assert ckpt.origin_name == "slak_demo.pth"
        assert ckpt.input_size == DIGITS_SIZE and ckpt.config["kwargs"]["num_classes"] == 10
    # the compacted model computes what the masked model of the checkpoint computes
    masked = shiftwise.load_model(out / "checkpoint.pt")
    x, _ = _digits_batch()
    with torch.no_grad():
        a, b = masked(x), small(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert _tiles(masked) == dense


def test_eval_reads_the_run_and_agrees_with_training(run, capsys):
    out, summary = run
    assert cli.main(["eval", str(out / "compact.pt"), "--json"]) == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 359
    assert result["top1"] == pytest.approx(summary["test_acc"], abs=1e-9)


def test_chain_keeps_the_origin_and_resume_needs_no_source_file(tmp_path, run):
    out, _ = run
    src = tmp_path / "first.pt"
    shutil.copy(out / "compact.pt", src)
    second = tmp_path / "second"
    with pytest.raises(ShiftwiseError, match="--density 0.6 must be at most"):
        train(TrainConfig(pretrained=str(src), density=0.6, output=str(second), **FAST), show_progress=False)
    config = TrainConfig(pretrained=str(src), density=0.25, output=str(second), stop_after=2, **FAST)
    assert train(config, show_progress=False)["stopped_at"] == 2
    src.unlink()  # the run's own checkpoint describes the model: the source is no longer needed
    summary = train(TrainConfig(output=str(second), resume=True), show_progress=False)
    assert summary["step"] == FAST["steps"]
    ckpt = read_checkpoint(second / "compact.pt")
    assert ckpt.source_name == "first.pt" and ckpt.origin_sha256 == _sha(demo_path())
    # --density counts against the full conversion, whatever the source file still holds
    assert summary["density"] == pytest.approx(0.25, abs=0.01)
    assert abs(ckpt.tiles["kept"] - 0.25 * ckpt.tiles["dense"]) <= 0.01 * ckpt.tiles["dense"]
    assert ckpt.tiles["layers"] == read_checkpoint(out / "compact.pt").tiles["layers"]


def _folder(root, classes=3, per_class=4):
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 40), (60 * c, 20 * i, 100)).save(d / f"{i}.png")
    return root


def test_new_data_set_needs_num_classes(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    args = ["train", "--pretrained", "demo", "--data", str(data), "--steps", "2", "--batch-size", "4",
            "--update-every", "1", "--quiet", "-o", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-classes 3" in err[0]
    assert not (tmp_path / "run").exists()
    assert cli.main(args + ["--num-classes", "3"]) == 0
    model = shiftwise.load_model(tmp_path / "run" / "compact.pt")
    assert model.head.out_features == 3
    assert model(torch.randn(2, 3, DIGITS_SIZE, DIGITS_SIZE)).shape == (2, 3)


def test_pretrained_and_model_are_exclusive():
    with pytest.raises(ValueError, match="--pretrained"):
        TrainConfig(pretrained="demo", model="slak_tiny")
    with pytest.raises(ValueError, match="--pretrained-ema needs --pretrained"):
        TrainConfig(pretrained_ema=True)


def test_truncated_image_stops_training_with_its_name_and_leaves_no_run(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    bad = data / "train" / "class1" / "broken.jpg"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    args = ["train", "--pretrained", "demo", "--num-classes", "3", "--data", str(data), "--steps", "3",
            "--batch-size", "13", "--quiet", "-o", str(tmp_path / "run")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jpg" in err[0]
    assert not (tmp_path / "run").exists()
    assert cli.main(args + ["--skip-bad-images"]) == 0
    assert (tmp_path / "run" / "compact.pt").exists()
