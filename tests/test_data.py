"""Evaluation data: the sources' transforms, ImageFolder on real files, the embedded digits, evaluate/verify."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from shiftwise.data import (IMAGENET_MEAN, IMAGENET_STD, Digits, EvalTransform, ImageFolder, TrainTransform,
                            make_loader, resize, subset, transform_for)
from shiftwise.evaluate import evaluate, verify
from shiftwise.sparse.train_data import Batches, load_data, mix_batch, soft_targets


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


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_train_transform_shape_and_normalisation():
    colour = (200, 30, 90)
    out = TrainTransform(24)(Image.new("RGB", (57, 41), colour), generator=_gen(0))
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 24, 24), atol=1e-6)
    half = TrainTransform(8, mean=(0.5,) * 3, std=(0.5,) * 3)(torch.full((3, 9, 9), 255, dtype=torch.uint8))
    assert torch.allclose(half, torch.ones(3, 8, 8))


@pytest.mark.parametrize("hw", [(40, 40), (30, 90), (120, 20), (7, 5)])
def test_train_crops_lie_inside_the_image_with_the_asked_area_and_ratio(hw):
    h, w = hw
    t = TrainTransform(16, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    gen = _gen(1)
    for _ in range(200):
        top, left, ch, cw = t.crop_box(h, w, gen)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
    big = 400 * 400
    for _ in range(200):  # on a large image the rounding is small: area and ratio within the ranges
        _, _, ch, cw = t.crop_box(400, 400, gen)
        assert 0.2 * 0.98 <= ch * cw / big <= 0.9 * 1.02 and 0.5 * 0.98 <= cw / ch <= 2.0 * 1.02


def test_train_crop_falls_back_to_the_centre_at_the_nearest_ratio():
    # a crop of the whole area at ratio >= 2 never fits a square: the centred 40x20 (w x h) window
    assert TrainTransform(8, scale=(1.0, 1.0), ratio=(2.0, 3.0)).crop_box(40, 40, _gen(0)) == (10, 0, 20, 40)
    assert TrainTransform(8, scale=(1.0, 1.0), ratio=(0.25, 0.5)).crop_box(40, 40, _gen(0)) == (0, 10, 40, 20)
    assert TrainTransform(8, scale=(1.0, 1.0)).crop_box(30, 60, _gen(0)) == (0, 10, 30, 40)  # 60/30 > 4/3


def test_train_transform_is_crop_then_pillow_bicubic_then_flip():
    a = _photo(64, 80)
    t = TrainTransform(32, hflip=0.0)
    top, left, h, w = t.crop_box(64, 80, _gen(5))
    ref = np.asarray(Image.fromarray(a).crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC),
                     dtype=np.float64)
    ref = (ref / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    out = t(Image.fromarray(a), generator=_gen(5))
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() <= 2 / 255 / min(IMAGENET_STD) + 1e-6
    flipped = TrainTransform(32, hflip=1.0)(Image.fromarray(a), generator=_gen(5))
    assert torch.equal(flipped, out.flip(-1))


def test_train_transform_is_reproducible_with_a_seeded_generator():
    image = Image.fromarray(_photo(50, 70))
    t = TrainTransform(20)
    runs = [t(image, generator=_gen(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    whole = TrainTransform(20, scale=(1.0, 1.0), ratio=(1.4, 1.4))  # 70x50 at ratio 1.4: always the whole image
    outs = [whole(image, generator=_gen(s)) for s in range(40)]
    mirrored = sum(torch.equal(o, outs[0].flip(-1)) for o in outs)
    assert 5 < mirrored < 35  # about half of the otherwise identical crops are flipped


def test_image_folder_seeded_items_are_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(_photo(30, 40)).save(tmp_path / "a" / "x.png")
    ds = ImageFolder(tmp_path, TrainTransform(12))
    assert torch.equal(ds[(0, 11)][0], ds[(0, 11)][0]) and not torch.equal(ds[(0, 11)][0], ds[(0, 12)][0])
    assert torch.equal(ds[(0, 11)][0], TrainTransform(12)(Image.fromarray(_photo(30, 40)), generator=_gen(11)))


def _constant_batch(n, size=10):
    """Image i is the constant i + 1 (every pixel tells which image it came from); label i."""
    return torch.arange(1.0, n + 1).view(n, 1, 1, 1).expand(n, 3, size, size).clone(), torch.arange(n)


def test_soft_targets_match_cross_entropy_label_smoothing():
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    for s in (0.0, 0.1, 0.3):
        t = soft_targets(y, 5, s)
        assert torch.allclose(t.sum(1), torch.ones(6))
        assert torch.allclose(F.cross_entropy(logits, t), F.cross_entropy(logits, y, label_smoothing=s))
    x, _ = _constant_batch(6)
    same, t = mix_batch(x, y, 5, 0.0, 0.0, 0.1, _gen(0))
    assert same is x and torch.equal(t, soft_targets(y, 5, 0.1))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_targets_are_the_pixel_area_mix(seed):
    n = 5
    x, y = _constant_batch(n, 16)
    mixed, t = mix_batch(x, y, n, 0.0, 1.0, 0.0, _gen(seed))
    assert torch.allclose(t.sum(1), torch.ones(n))
    for i in range(n):
        own = float((mixed[i] == i + 1).float().mean())
        partner = n - 1 - i
        if partner != i:
            assert t[i, i].item() == pytest.approx(own) and t[i, partner].item() == pytest.approx(1 - own)
            assert set(mixed[i].unique().tolist()) <= {i + 1.0, partner + 1.0}
        else:
            assert t[i, i].item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_blends_pixels_and_targets_alike(seed):
    n = 4
    x, y = _constant_batch(n)
    mixed, t = mix_batch(x, y, 6, 0.4, 0.0, 0.1, _gen(seed))
    lam = (mixed[0, 0, 0, 0].item() - n) / (1 - n)  # image 0 (value 1) mixed with image 3 (value 4)
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], lam * 1 + (1 - lam) * n))
    ref = lam * soft_targets(y, 6, 0.1) + (1 - lam) * soft_targets(y.flip(0), 6, 0.1)
    assert torch.allclose(t, ref, atol=1e-6) and torch.allclose(t.sum(1), torch.ones(n))


def test_mix_batch_picks_mixup_or_cutmix_and_is_reproducible():
    x, y = _constant_batch(4)
    kinds = set()
    for seed in range(20):
        mixed, t = mix_batch(x, y, 4, 0.8, 1.0, 0.0, _gen(seed))
        again = mix_batch(x, y, 4, 0.8, 1.0, 0.0, _gen(seed))
        assert torch.equal(mixed, again[0]) and torch.equal(t, again[1])
        values = set(mixed[0].unique().tolist())
        kinds.add("cutmix" if values <= {1.0, 4.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}
    with pytest.raises(ValueError, match="alphas"):
        mix_batch(x, y, 4, -1.0, 0.0)


def test_augmented_batches_are_a_function_of_the_step(tmp_path):
    for split, n in (("train", 6), ("val", 1)):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_image(20, 26, seed=10 * c + i)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    train, _, classes = load_data(str(tmp_path), 12)
    assert classes == 2 and isinstance(train.transform, TrainTransform)
    run = [Batches(train, 4, 1, 0, 1, 0, 0)(s)[0] for s in range(6)]  # 3 steps an epoch
    resumed = Batches(train, 4, 1, 0, 1, 0, 2)  # another number of worker processes, started at step 4
    assert all(torch.equal(resumed(s)[0], run[s]) for s in (4, 5))
    assert not torch.equal(run[0], run[3])  # the next epoch: another order, other crops
    plain, _, _ = load_data(str(tmp_path), 12, augment=False)  # the evaluation transform: no randomness
    batches = Batches(plain, 4, 1, 0, 1, 0, 0)
    assert isinstance(plain.transform, EvalTransform)
    assert torch.equal(batches(0)[0], torch.stack([plain[i][0] for i in batches.indices(0).tolist()]))
