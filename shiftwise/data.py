"""Image data: ImageFolder datasets, the sources' ImageNet transforms, training augmentation,
the embedded digits.

The transforms follow the SLaK/ConvNeXt, RepLKNet and UniRepLKNet evaluation code, written with
torch ops instead of torchvision:

* ``S < 384``: resize the short side to ``int(S / 0.875)`` (bicubic, antialiased), centre-crop
  ``S x S``;
* ``S >= 384``: resize to ``(S, S)``, no crop;
* scale to ``[0, 1]`` and normalise with the ImageNet mean/std (RepLKNet-XL: 0.5/0.5).

Training on image files uses :class:`TrainTransform` (random resized crop and horizontal flip, the
standard ImageNet recipe). An image that cannot be decoded raises :class:`BadImageError` naming
the file, or, with ``skip_bad_images``, is dropped from its batch by :func:`collate` and its
path travels with the batch (:class:`Batch`), so the count reaches the caller from worker
processes too.

The embedded dataset is the UCI optical handwritten digits (1797 8x8 images, CC BY 4.0), stored
in ``shiftwise/data/digits.npz`` with a fixed train/test split; it serves as a small real image
dataset for ``shiftwise verify`` and ``shiftwise train`` without downloads.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .errors import BadImageError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)  # RepLKNet-XL
CROP_PCT = 0.875
SPLITS = ("val", "test")  # the held-out folder of a root that also holds train/, in order of preference
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_FILE = "digits.npz"
DIGITS_SIZE = 32  # the demo model's input side: 8x8 digits upsampled through the ImageNet transform


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as a uint8 ``(3, H, W)`` tensor (converted to RGB first)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def resize(image: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of a uint8 ``(C, H, W)`` image (or ``(B, C, H, W)`` images of one
    size) to ``size`` ``(h, w)``.

    Pillow's algorithm, which the sources' torchvision transforms call: the antialiased bicubic
    filter (``a = -0.5``), width first, then height, rounding to uint8 after each pass. Matches
    ``PIL.Image.resize(..., BICUBIC)`` to within 2 grey levels (Pillow uses fixed-point weights).
    """
    out = image if image.dim() == 4 else image[None]
    for target in ((image.shape[-2], size[1]), tuple(size)):
        if tuple(out.shape[-2:]) != target:
            out = F.interpolate(out.float(), size=target, mode="bicubic", align_corners=False, antialias=True)
            out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if image.dim() == 4 else out[0]


def center_crop(image: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of ``(C, H, W)`` (offsets rounded as torchvision does)."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[..., top:top + size, left:left + size]


class EvalTransform:
    """The evaluation transform of the sources: PIL image or uint8 ``(3, H, W)`` -> float ``(3, S, S)``.

    Args:
        size: output side ``S`` (default 224).
        mean, std: per-channel normalisation (default ImageNet's).
        crop_pct: resize the short side to ``int(S / crop_pct)`` before the centre crop, for
            ``S < 384`` (default 0.875); at ``S >= 384`` the image is resized to ``(S, S)``.

    Example::

        >>> t = EvalTransform(224)
        >>> t(Image.new("RGB", (500, 375))).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop_pct: float = CROP_PCT):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"image size must be a positive int, got {size!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        self.size = size
        self.crop_pct = crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> Tensor:
        # `generator` is accepted (and unused) so that either transform reads seeded items
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        s = self.size
        if s >= 384:
            image = resize(image, (s, s))
        else:
            h, w = image.shape[-2:]
            short = int(s / self.crop_pct)
            # the short side becomes `short`, the long side int(short * long / short_old)
            size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            image = center_crop(resize(image, size), s)
        return (image.float() / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"EvalTransform(size={self.size}, crop_pct={self.crop_pct}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()})")


class TrainTransform:
    """Training augmentation: PIL image or uint8 ``(3, H, W)`` -> float ``(3, S, S)``.

    A random resized crop (an area fraction drawn from ``scale``, an aspect ratio ``w / h``
    drawn log-uniformly from ``ratio``; 10 draws, then the whole image centre-cropped to the
    nearest allowed ratio), resized to ``S x S`` with the bicubic antialiased :func:`resize`,
    flipped left-right with probability ``hflip``, then normalised like :class:`EvalTransform`.

    Args:
        size: output side ``S``.
        mean, std: per-channel normalisation (default ImageNet's).
        scale: range of the crop's area as a fraction of the image's (default (0.08, 1)).
        ratio: range of the crop's aspect ratio (default (3/4, 4/3)).
        hflip: probability of a horizontal flip (default 0.5).

    Randomness comes from the ``generator`` given to the call (the global torch generator
    without one), so a seeded generator gives the same crop again.

    Example::

        >>> t = TrainTransform(224)
        >>> t(Image.new("RGB", (500, 375)), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"image size must be a positive int, got {size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio!r}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def crop_box(self, height: int, width: int, generator: Optional[torch.Generator] = None
                 ) -> Tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random crop of a ``height x width`` image."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        # no draw fitted: the largest centred crop whose ratio is inside `ratio`
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, max(1, int(round(width / self.ratio[0])))
        elif aspect > self.ratio[1]:
            w, h = max(1, int(round(height * self.ratio[1]))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> Tensor:
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1], generator)
        image = resize(image[..., top:top + h, left:left + w], (self.size, self.size))
        if float(torch.rand((), generator=generator)) < self.hflip:
            image = image.flip(-1)
        return (image.float() / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})")


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=generator))


def transform_for(config: Optional[dict] = None, size: int = 224) -> EvalTransform:
    """The evaluation transform the sources use for a model config (``model_config(model)``).

    RepLKNet-XL (``dw_ratio`` 1.5 or a name ending in ``xl``) is normalised with mean/std 0.5;
    every other model with the ImageNet statistics.
    """
    name = str((config or {}).get("name", "")).lower()
    kwargs = (config or {}).get("kwargs", {}) or {}
    half = name.startswith("replknet") and (name.endswith("xl") or float(kwargs.get("dw_ratio", 1)) == 1.5)
    return EvalTransform(size, HALF_MEAN if half else IMAGENET_MEAN, HALF_STD if half else IMAGENET_STD)


def held_out_split(root) -> Optional[str]:
    """The held-out folder of a data root holding ``train/`` and ``val/`` (else ``test/``):
    ``"val"`` or ``"test"``; None when ``root`` is not such a root."""
    root = os.fspath(root)
    if not os.path.isdir(os.path.join(root, "train")):
        return None
    return next((s for s in SPLITS if os.path.isdir(os.path.join(root, s))), None)


def load_image(path: str) -> Image.Image:
    """The image file ``path`` fully decoded as RGB; :class:`BadImageError` naming the file if
    it cannot be read (not an image, truncated, corrupt, unreadable)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every byte: a truncated file fails here, not later
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, _reason(exc)) from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file Pillow can identify"
    if isinstance(exc, OSError) and exc.strerror:  # FileNotFoundError, PermissionError...: no repeated path
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What :class:`ImageFolder` returns for an image it could not read under ``skip_bad_images``."""

    path: str


class Batch(NamedTuple):
    """A batch of :func:`collate`: the images read, their targets (both None when every image of
    the batch was unreadable) and the paths of the skipped images."""

    images: Optional[Tensor]
    targets: Optional[Tensor]
    skipped: Tuple[str, ...]


def collate(samples: list) -> Batch:
    """The ``collate_fn`` of a loader over an :class:`ImageFolder` that skips bad images: drops
    the :class:`Skipped` markers and carries their paths in the batch (from worker processes too)."""
    kept = [s for s in samples if not isinstance(s, Skipped)]
    skipped = tuple(s.path for s in samples if isinstance(s, Skipped))
    if not kept:
        return Batch(None, None, skipped)
    images, targets = default_collate(kept)
    return Batch(images, targets, skipped)


def unpack(batch) -> Tuple[Optional[Tensor], Optional[Tensor], Tuple[str, ...]]:
    """``(images, targets, skipped paths)`` of a :class:`Batch` or of a plain ``(images, targets)`` pair."""
    if isinstance(batch, Batch):
        return batch
    images, targets = batch
    return images, targets, ()


def skips_bad_images(dataset) -> bool:
    """Whether ``dataset`` (or the data set under a ``Subset``) returns :class:`Skipped` markers."""
    while not hasattr(dataset, "skip_bad_images") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return bool(getattr(dataset, "skip_bad_images", False))


class ImageFolder(Dataset):
    """Images in ``root/<class>/**/<file>``; the class index is the rank of the sorted folder name.

    Same layout and class order as torchvision's ``ImageFolder`` (the ImageNet validation
    layout). Files are decoded with Pillow as RGB; ``transform`` maps the PIL image to a tensor.
    A file that cannot be decoded raises :class:`BadImageError`; with ``skip_bad_images`` the
    item is a :class:`Skipped` marker instead, which :func:`collate` drops from its batch.

    The index may also be a pair ``(index, seed)``: the transform is then called with
    ``generator=`` a generator seeded with ``seed`` (as :class:`TrainTransform` takes), so a
    random augmentation is a function of the seed, whichever process reads the image.

    Example::

        >>> ds = ImageFolder("imagenet/val", EvalTransform(224))
        >>> image, label = ds[0]  # (3, 224, 224) float, int
    """

    def __init__(self, root, transform: Optional[Callable] = None, extensions: Sequence[str] = IMG_EXTENSIONS,
                 skip_bad_images: bool = False):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise NotADirectoryError(f"data directory {root!r} does not exist or is not a directory")
        self.root = root
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.classes: List[str] = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ValueError(f"{root!r} has no class folders: expected the ImageFolder layout root/<class>/<image>")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: List[Tuple[str, int]] = []
        empty = []
        for c in self.classes:
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(exts)]
            if not found:
                empty.append(c)
            self.samples += [(p, self.class_to_idx[c]) for p in found]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(exts)}) found under {root!r}")
        if empty:
            logger.warning("%d class folders of %s hold no image (first: %s)", len(empty), root, empty[0])
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        path, target = self.samples[index]
        try:
            image = load_image(path)
        except BadImageError:
            if self.skip_bad_images:
                return Skipped(path)
            raise
        if self.transform is None:
            return image, target
        if seed is None:
            return self.transform(image), target
        return self.transform(image, generator=torch.Generator().manual_seed(seed)), target

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class Digits(Dataset):
    """The embedded UCI handwritten digits (8x8, 16 grey levels), as RGB images of 10 classes.

    ``split`` is ``"train"`` (1438 images) or ``"test"`` (359), a fixed stratified split. Pixels
    are scaled from 0..16 to 0..255 and go through ``transform`` (default
    ``EvalTransform(32)``: upsampled to 36 and centre-cropped to 32).

    Data: E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, UCI Machine
    Learning Repository (1998), CC BY 4.0.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "test", transform: Optional[Callable] = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        with importlib.resources.as_file(package_file(DIGITS_FILE)) as path, np.load(path) as arrays:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        # 0..16 -> 0..255, grey -> RGB: (N, 8, 8) -> (N, 3, 8, 8)
        pixels = torch.from_numpy((images.astype(np.int32) * 255 + 8) // 16).to(torch.uint8)
        self.images = pixels[:, None].expand(-1, 3, -1, -1).contiguous()
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.split = split
        self.transform = transform if transform is not None else EvalTransform(DIGITS_SIZE)
        self._transformed = (None, None)  # (transform, all images through it)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        if isinstance(self.transform, EvalTransform):  # every image the same size: transform them at once
            if self._transformed[0] is not self.transform:
                self._transformed = (self.transform, self.transform(self.images))
            return self._transformed[1][index], int(self.targets[index])
        return self.transform(self.images[index]), int(self.targets[index])

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, {len(self)} images, 10 classes)"


def package_file(name: str):
    """A file shipped in ``shiftwise/data/`` (a ``Traversable``)."""
    return importlib.resources.files("shiftwise").joinpath("data", name)


def subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """``limit`` images spread evenly over ``dataset`` (so a sorted ImageNet val keeps all classes)."""
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    if limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    return Subset(dataset, [i * n // limit for i in range(limit)])


def make_loader(dataset: Dataset, batch_size: int = 64, workers: Optional[int] = None, limit: Optional[int] = None,
                device=None) -> DataLoader:
    """An in-order evaluation ``DataLoader`` over ``dataset`` (or ``limit`` images of it).

    ``workers`` defaults to ``min(8, cpu_count)`` for image files and 0 for in-memory data;
    memory is pinned when ``device`` is CUDA. Over an :class:`ImageFolder` that skips bad images
    the loader yields :class:`Batch` triples (read them with :func:`unpack`), else
    ``(images, targets)`` pairs.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
    if workers is None:
        workers = 0 if isinstance(dataset, Digits) else min(8, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(subset(dataset, limit), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin, persistent_workers=False,
                      collate_fn=collate if skips_bad_images(dataset) else None)
