"""Unreadable images: one line and exit 2 naming the file (with and without worker processes),
or skipped and counted with --skip-bad-images; train/val roots and class counts in eval."""
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from shiftwise.cli import main
from shiftwise.data import Batch, ImageFolder, Skipped, collate, load_image, make_loader, package_file
from shiftwise.errors import BadImageError, ShiftwiseError
from shiftwise.sparse.train_data import Batches, accuracy, load_data

DEMO = str(package_file("slak_demo.pth"))  # 10 classes, input 32


def _write_folder(root, classes=10, per_class=2, size=40):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(c * 100 + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def _truncated_jpeg(path):
    pixels = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def bad_folder(tmp_path):
    root = _write_folder(tmp_path / "val")
    return root, _truncated_jpeg(root / "c3" / "broken.jpg")


def _one_line(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_load_image_names_the_file_and_the_reason(tmp_path):
    bad = _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(str(bad))
    assert info.value.path == str(bad)
    assert str(info.value).startswith(f"cannot read image {bad}: ") and "--skip-bad-images" in str(info.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImageError, match="not an image file"):
        load_image(str(tmp_path / "text.png"))
    assert pickle.loads(pickle.dumps(info.value)).path == str(bad)


def test_message_survives_the_worker_traceback(tmp_path):
    # a DataLoader re-raises a worker's error as type(text) with the whole traceback as text
    path = str(tmp_path / "dir: with colon" / "x.jpg")
    (tmp_path / "dir: with colon").mkdir()
    _truncated_jpeg(tmp_path / "dir: with colon" / "x.jpg")
    original = BadImageError(path, "image file is truncated (3 bytes not processed)")
    text = (f"Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            f"  File \"data.py\", line 1, in load_image\nOSError: image file is truncated\n\n"
            f"shiftwise.errors.BadImageError: {original}\n")
    rebuilt = BadImageError(text)
    assert str(rebuilt) == str(original) and rebuilt.path == path and rebuilt.reason == original.reason
    assert str(BadImageError("some other text")) == "some other text"


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_ends_eval_with_one_line(capsys, bad_folder, workers):
    root, bad = bad_folder
    err = _one_line(capsys, ["eval", DEMO, "--data", str(root), "--workers", str(workers), "--batch-size", "4"])
    assert err.startswith("shiftwise eval: error: cannot read image ") and str(bad) in err and "truncated" in err


def test_truncated_jpeg_ends_verify_with_one_line(capsys, bad_folder):
    root, bad = bad_folder
    argv = ["verify", DEMO, "--data", str(root), "--workers", "2", "--backend", "torch"]
    assert str(bad) in _one_line(capsys, argv)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_counts_and_reports(capsys, bad_folder, workers):
    root, bad = bad_folder
    argv = ["eval", DEMO, "--data", str(root), "--workers", str(workers), "--batch-size", "4", "--skip-bad-images"]
    if workers:
        assert main([*argv, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["images"], result["skipped"], result["first_skipped"]) == (20, 1, str(bad))
    else:
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert ", 20 images," in out and f"skipped 1 unreadable image (first: {bad})" in out


def test_skip_in_verify_and_a_batch_of_bad_images_only(tmp_path, capsys):
    root = _write_folder(tmp_path / "val", classes=10, per_class=1)
    for i in range(3):
        _truncated_jpeg(root / "c0" / f"bad{i}.jpg")  # c0's files sort first: a whole batch is unreadable
    argv = ["verify", DEMO, "--data", str(root), "--workers", "0", "--batch-size", "3", "--skip-bad-images"]
    assert main([*argv, "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "images: 10 " in out and "skipped 3 unreadable images" in out


def test_collate_drops_markers_and_carries_paths():
    x = torch.zeros(3, 2, 2)
    batch = collate([(x, 1), Skipped("a.jpg"), (x + 1, 2)])
    assert isinstance(batch, Batch) and batch.images.shape == (2, 3, 2, 2) and batch.targets.tolist() == [1, 2]
    assert batch.skipped == ("a.jpg",)
    assert collate([Skipped("a"), Skipped("b")]) == Batch(None, None, ("a", "b"))


def test_root_with_train_and_val_uses_val(tmp_path, capsys):
    _write_folder(tmp_path / "train", per_class=3)
    _write_folder(tmp_path / "val", per_class=1)
    assert main(["eval", DEMO, "--data", str(tmp_path), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 10
    assert result["data"].startswith(f"{tmp_path / 'val'} (the val/ split of {tmp_path}; 10 classes)")


def test_root_with_train_and_test_uses_test(tmp_path, capsys):
    _write_folder(tmp_path / "train", per_class=1)
    _write_folder(tmp_path / "test", per_class=2)
    assert main(["eval", DEMO, "--data", str(tmp_path), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 20 and "the test/ split of" in result["data"]


def test_class_count_differs_warns_and_evaluates(tmp_path, capsys, caplog):
    root = _write_folder(tmp_path / "three", classes=3)
    with caplog.at_level(logging.WARNING, logger="shiftwise.evaluate"):
        assert main(["eval", DEMO, "--data", str(root), "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "has 3 classes but the model predicts 10" in warnings[0]


def test_training_data_skips_and_counts(tmp_path):
    _write_folder(tmp_path / "train", classes=2, per_class=4, size=24)
    _write_folder(tmp_path / "val", classes=2, per_class=2, size=24)
    bad = _truncated_jpeg(tmp_path / "train" / "c1" / "bad.jpg")
    _truncated_jpeg(tmp_path / "val" / "c0" / "bad.jpg")
    train, test, num_classes = load_data(str(tmp_path), 16)
    with pytest.raises(BadImageError, match="bad.jpg"):
        [Batches(train, 3, 0, 0, 1, 0, 0)(s) for s in range(3)]
    train, test, num_classes = load_data(str(tmp_path), 16, skip_bad_images=True)
    batches = Batches(train, 3, 0, 0, 1, 0, 0)
    sizes = [len(batches(s)[1]) for s in range(6)]  # 9 images, 3 steps an epoch: two epochs
    assert sorted(sizes) == [2, 2, 3, 3, 3, 3] and batches.skipped == [str(bad)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    res = accuracy(model, test, torch.device("cpu"), batch_size=2)
    assert res["skipped"] == 1 and 0 <= res["acc"] <= 100


def test_train_and_val_class_folders_must_match(tmp_path):
    _write_folder(tmp_path / "train", classes=3, per_class=1, size=8)
    _write_folder(tmp_path / "val", classes=2, per_class=1, size=8)
    with pytest.raises(ShiftwiseError, match=r"same class folders: 3 vs 2, only in train/: c2, only in val/: none"):
        load_data(str(tmp_path), 8)


def test_loader_without_skipping_yields_pairs(tmp_path):
    root = _write_folder(tmp_path / "val", classes=2, per_class=1, size=8)
    assert len(next(iter(make_loader(ImageFolder(root, lambda im: torch.zeros(1)), 2, workers=0)))) == 2
