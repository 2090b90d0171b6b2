"""Evaluation data: the sources' transforms, ImageFolder on real files, the embedded digits, evaluate/verify."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shiftwise.data import (IMAGENET_MEAN, IMAGENET_STD, Digits, EvalTransform, ImageFolder, make_loader, resize,
                            subset, transform_for)
from shiftwise.evaluate import evaluate, verify


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _photo(h, w):
    """A smooth, photo-like image (gradients and a disc), where Pillow's uint8 rounding barely matters."""
    y, x = np.mgrid[0:h, 0:w]
    disc = ((y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 4) ** 2) * 80
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w) + disc], -1).astype(np.uint8)


def test_transform_by_hand_crop_offsets_and_normalisation():
    # S=7: the short side goes to int(7/0.875) = 8, which an 8x10 image already has (no resampling);
    # the crop starts at round(0.5) = 0 rows and round(1.5) = 2 columns, as torchvision rounds
    a = _image(8, 10)
    out = EvalTransform(7)(Image.fromarray(a))
    assert out.shape == (3, 7, 7)
    for c, (i, j) in enumerate([(0, 0), (6, 6), (3, 4)]):
        expected = (a[i, j + 2, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert out[c, i, j].item() == pytest.approx(expected, abs=1e-6)
    tall = EvalTransform(7)(torch.from_numpy(_image(11, 8)).permute(2, 0, 1))  # (3, H, W) uint8 works too
    assert torch.allclose(tall[0, :, 0], (torch.from_numpy(_image(11, 8))[2:9, 0, 0] / 255.0 - 0.485) / 0.229)


@pytest.mark.parametrize("size,hw,resized", [(224, (300, 400), (256, 341)), (224, (500, 375), (341, 256)),
                                             (32, (8, 8), (36, 36))])
def test_short_side_resize_then_centre_crop_matches_pillow(size, hw, resized):
    a = _photo(*hw)
    out = EvalTransform(size)(Image.fromarray(a))
    ref = np.asarray(Image.fromarray(a).resize(resized[::-1], Image.BICUBIC), dtype=np.float64)
    top, left = int(round((resized[0] - size) / 2)), int(round((resized[1] - size) / 2))
    ref = (ref[top:top + size, left:left + size] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    diff = np.abs(out.permute(1, 2, 0).numpy() - ref)
    assert diff.max() <= 2 / 255 / min(IMAGENET_STD) + 1e-6  # Pillow's fixed-point weights: 2 grey levels


def test_large_sizes_resize_to_square_without_crop():
    a = _photo(120, 200)
    out = EvalTransform(384)(Image.fromarray(a))
    ref = np.asarray(Image.fromarray(a).resize((384, 384), Image.BICUBIC), dtype=np.float64)
    ref = (ref / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    assert out.shape == (3, 384, 384)
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() <= 2 / 255 / min(IMAGENET_STD) + 1e-6


@pytest.mark.parametrize("hw,out", [((50, 70), (36, 50)), ((8, 8), (36, 36)), ((20, 30), (40, 60))])
def test_resize_is_pillow_bicubic_even_on_noise(hw, out):
    a = _image(*hw)
    ref = np.asarray(Image.fromarray(a).resize(out[::-1], Image.BICUBIC)).astype(int)
    got = resize(torch.from_numpy(a).permute(2, 0, 1), out).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - ref).max() <= 2


def test_transform_per_family():
    xl = transform_for({"name": "replknet_xl", "kwargs": {"dw_ratio": 1.5}}, 320)
    assert xl.mean.flatten().tolist() == [0.5] * 3 and xl.std.flatten().tolist() == [0.5] * 3
    t = transform_for({"name": "slak_tiny", "kwargs": {}}, 224)
    assert torch.allclose(t.mean.flatten(), torch.tensor(IMAGENET_MEAN)) and t.size == 224
    with pytest.raises(ValueError, match="image size"):
        EvalTransform(0)


def test_image_folder_on_real_png_and_jpeg_files(tmp_path):
    root = tmp_path / "val"
    files = {"n02_zebra": ["b.png", "a.JPEG", "sub/c.png"], "n01_apple": ["x.jpg"], "n03_empty": []}
    for cls, names in files.items():
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            (root / cls / name).parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(_photo(20 + i, 30))
            image = image.convert("L") if name.endswith("c.png") else image  # a greyscale file
            image.save(root / cls / name)
    (root / "n01_apple" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(b"")  # files at the top level are not a class
    ds = ImageFolder(root, EvalTransform(16))
    assert ds.classes == ["n01_apple", "n02_zebra", "n03_empty"]
    assert [(os.path.relpath(p, root), t) for p, t in ds.samples] == [
        ("n01_apple/x.jpg", 0), ("n02_zebra/a.JPEG", 1), ("n02_zebra/b.png", 1), ("n02_zebra/sub/c.png", 1)]
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and y == 1
    grey = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-6)  # a greyscale file decoded as RGB
    batches = list(make_loader(ds, batch_size=3, workers=0))
    assert [b[0].shape[0] for b in batches] == [3, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(NotADirectoryError):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)


def test_embedded_digits_split():
    train, test = Digits("train"), Digits("test")
    assert (len(train), len(test)) == (1438, 359)
    assert sorted(set(test.targets.tolist())) == list(range(10))
    assert test.images.dtype == torch.uint8 and test.images.max() == 255
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert torch.equal(Digits("test").images, test.images)
    with pytest.raises(ValueError, match="split"):
        Digits("val")


def test_limit_spreads_over_the_data_set():
    ordered = [(None, i // 50) for i in range(1000)]  # sorted by class, as ImageFolder lists ImageNet val
    part = subset(ordered, 20)
    assert len(part) == 20 and {ordered[i][1] for i in part.indices} == set(range(20))
    assert subset(ordered, None) is ordered and subset(ordered, 10_000) is ordered
    with pytest.raises(ValueError):
        subset(ordered, 0)


class _Fixed(nn.Module):
    """Logits that rank the classes as given per image (a stand-in model with known answers)."""

    def __init__(self, ranking):
        super().__init__()
        self.ranking = ranking
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        idx = x[:, 0, 0, 0].long()
        return self.ranking[idx] + self.dummy


def _loader(n=10):
    xs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    ys = torch.arange(n) % 7
    return torch.utils.data.DataLoader(list(zip(xs, ys)), batch_size=4)


def test_evaluate_top1_top5_by_hand():
    n, classes = 10, 7
    ranking = torch.zeros(n, classes)
    for i in range(n):
        target = i % 7
        # images 0-3: right at rank 1; 4-5: rank 3; 6-9: rank 6 (wrong for top-5)
        rank = 0 if i < 4 else (2 if i < 6 else 5)
        order = [c for c in range(classes) if c != target]
        order.insert(rank, target)
        ranking[i, order] = torch.arange(classes, 0, -1, dtype=torch.float32)
    r = evaluate(_Fixed(ranking), _loader(n))
    assert (r.images, r.top1, r.top5) == (10, 40.0, 60.0)
    assert r.seconds > 0 and r.throughput > 0


def test_verify_passes_identical_and_fails_perturbed():
    ranking = torch.randn(10, 7)
    same = verify(_Fixed(ranking), _Fixed(ranking.clone()), _loader())
    assert same.passed and same.agreement == 1.0 and same.max_abs_diff == 0.0 and "PASS" in same.report()
    flipped = ranking.clone()
    flipped[3] = -flipped[3]
    bad = verify(_Fixed(ranking), _Fixed(flipped), _loader())
    assert not bad.passed and bad.agreement == 0.9 and "FAIL" in bad.report()
    assert any("agreement" in f for f in bad.failures) and any("logit" in f for f in bad.failures)
    near = verify(_Fixed(ranking), _Fixed(ranking + 2e-3), _loader())
    assert not near.passed and near.agreement == 1.0 and near.failures == ["max |logit difference| 2.00e-03 > 0.001"]
