"""Training data of ``shiftwise train``: the embedded digits or an image folder, the batches of
every step (a function of the step, so a resumed run reads the very batches it would have),
mixup/cutmix, and the accuracy of a model on the held-out split."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data
from ..errors import ShiftwiseError


def load_data(source: str, image_size: int, mean: Sequence[float] = data.IMAGENET_MEAN,
              std: Sequence[float] = data.IMAGENET_STD, augment: bool = True, skip_bad_images: bool = False
              ) -> tuple:
    """``(train, test, num_classes)`` of ``--data``: ``"digits"`` or an image folder root.

    The digits come as in-memory ``(images, labels)`` tensors (evaluation transform; ``Batches``
    shifts them at random). An image folder root holds ``train/`` and ``val/`` (else ``test/``),
    each ``<class>/<image>`` with the same class folders; its training split is augmented with
    :class:`shiftwise.data.TrainTransform` when ``augment`` (else read like the held-out split,
    with :class:`shiftwise.data.EvalTransform`). ``mean``/``std`` normalise both (a pretrained
    model's preprocessing). ``skip_bad_images``: see :class:`shiftwise.data.ImageFolder`.

    Example::

        >>> train, test, num_classes = load_data("imagenet", 224)
    """
    mean, std = tuple(mean), tuple(std)
    if source == "digits":
        return _digits("train", image_size, mean, std), _digits("test", image_size, mean, std), 10
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {source!r} is neither 'digits' nor a directory")
    split = data.held_out_split(root)
    if split is None:
        raise FileNotFoundError(f"ImageFolder root {root} needs train/ and val/ (or test/) subfolders")
    transform = data.TrainTransform if augment else data.EvalTransform
    train_set = data.ImageFolder(root / "train", transform(image_size, mean, std), skip_bad_images=skip_bad_images)
    test_set = data.ImageFolder(root / split, data.EvalTransform(image_size, mean, std),
                                skip_bad_images=skip_bad_images)
    if train_set.classes != test_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))
        only_test = sorted(set(test_set.classes) - set(train_set.classes))
        raise ShiftwiseError(
            f"{root / 'train'} and {root / split} must hold the same class folders: {len(train_set.classes)} vs "
            f"{len(test_set.classes)}, only in train/: {_names(only_train)}, only in {split}/: {_names(only_test)}")
    return train_set, test_set, len(train_set.classes)


def _names(names: List[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@functools.lru_cache(maxsize=4)
def _digits(split: str, size: int, mean: tuple, std: tuple) -> tuple:
    ds = data.Digits(split, data.EvalTransform(size, mean, std))
    return ds.transform(ds.images), ds.targets.clone()  # all 8x8: one batched transform


def _size(dataset) -> int:
    return len(dataset[1]) if isinstance(dataset, tuple) else len(dataset)


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill), one offset per image."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off)])


class Batches:
    """The global batch of every step: a fixed permutation per epoch, each rank its slice.

    A function of the step (and seed), so a resumed run reads the very batches it would have.
    In-memory data is indexed directly; an ImageFolder is read by one ``DataLoader`` per epoch
    (``workers`` processes) that starts at the step asked for. Each image of an epoch gets a
    seed of its own for its random augmentation (:class:`shiftwise.data.TrainTransform`), so
    the crops too are a function of the step, whatever the number of workers or processes.

    Over an ImageFolder that skips bad images, a batch holds the images that could be read;
    ``skipped`` lists the distinct paths left out so far (on this rank), and a batch none of
    whose images can be read raises :class:`ShiftwiseError`.

    Example::

        >>> batches = Batches((images, labels), batch_size=64, seed=0, rank=0, world=1, max_shift=2, workers=0)
        >>> x, y = batches(step)
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, max_shift: int, workers: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.max_shift, self.workers = rank, world, max_shift, workers
        self.per_epoch = _size(dataset) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"--batch-size {batch_size} is larger than the training set ({_size(dataset)} images)")
        self.skipped: List[str] = []
        self._seen = set()
        self._epoch, self._perm, self._seeds = -1, None, None
        self._loader, self._next = None, None

    def _positions(self, step: int) -> slice:
        i = step % self.per_epoch
        return slice(i * self.batch_size + self.rank, (i + 1) * self.batch_size, self.world)

    def _start_epoch(self, step: int) -> None:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(_size(self.dataset), generator=gen)
            self._seeds = torch.randint(0, 2 ** 62, (_size(self.dataset),), generator=gen)
            self._epoch = epoch

    def indices(self, step: int) -> Tensor:
        """This rank's dataset indices at ``step``."""
        self._start_epoch(step)
        return self._perm[self._positions(step)]

    def _items(self, step: int) -> list:
        """What the loader asks the data set for at ``step``: indices, or ``(index, seed)`` pairs."""
        idx = self.indices(step).tolist()
        if not isinstance(self.dataset, data.ImageFolder):
            return idx
        return list(zip(idx, self._seeds[self._positions(step)].tolist()))

    def __call__(self, step: int) -> tuple:
        if isinstance(self.dataset, tuple):
            idx = self.indices(step)
            x, y = self.dataset[0][idx], self.dataset[1][idx]
        else:
            if self._next != step:  # start (or restart) this epoch's loader at `step`
                last = (step // self.per_epoch + 1) * self.per_epoch
                sampler = [self._items(s) for s in range(step, last)]
                workers_seed = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2 ** 63)
                self._loader = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=sampler, num_workers=self.workers, generator=workers_seed,
                    collate_fn=data.collate if data.skips_bad_images(self.dataset) else None))
            x, y, lost = data.unpack(next(self._loader))
            self._next = step + 1 if (step + 1) % self.per_epoch else None
            self._note(lost)
            if y is None:
                raise ShiftwiseError(f"none of the {len(lost)} images of the batch at step {step} can be read "
                                     f"(first: {lost[0]}); remove or replace the files")
        gen = torch.Generator().manual_seed(self.seed * 104729 + step * self.world + self.rank)
        return _shift(x, self.max_shift, gen), y

    def _note(self, paths) -> None:
        for p in paths:
            if p not in self._seen:
                self._seen.add(p)
                self.skipped.append(p)


def soft_targets(y: Tensor, num_classes: int, label_smoothing: float = 0.0) -> Tensor:
    """One-hot ``(B, num_classes)`` targets of labels ``y (B,)``, smoothed as ``F.cross_entropy``
    smooths: ``1 - s + s / K`` on the label, ``s / K`` elsewhere."""
    off = label_smoothing / num_classes
    out = torch.full((len(y), num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y[:, None], 1.0 - label_smoothing + off)


def mix_batch(x: Tensor, y: Tensor, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              label_smoothing: float = 0.0, gen: Optional[torch.Generator] = None) -> tuple:
    """Mixup or CutMix of a batch: ``(x (B, C, H, W), y (B,))`` -> ``(mixed x, soft targets (B, K))``.

    Each image is mixed with its partner in the flipped batch (image ``i`` with ``B - 1 - i``)
    with one weight ``lam ~ Beta(alpha, alpha)`` for the whole batch. Mixup blends the pixels,
    ``lam * x + (1 - lam) * partner``; CutMix pastes a box of the partner whose area is about
    ``1 - lam`` of the image (centre uniform, clipped at the borders), and ``lam`` becomes the
    area actually kept. With both alphas positive each batch uses one of the two, with
    probability 1/2; with neither, the batch is returned as it is. The targets are
    ``lam * t + (1 - lam) * partner's t`` for the smoothed one-hot ``t`` (:func:`soft_targets`);
    train with ``F.cross_entropy(logits, targets)``. Randomness comes from ``gen``.

    Example::

        >>> x, targets = mix_batch(x, y, 1000, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, gen=gen)
        >>> loss = F.cross_entropy(model(x), targets)
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    targets = soft_targets(y, num_classes, label_smoothing)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or float(torch.rand((), generator=gen)) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler takes no generator: a NumPy generator seeded from `gen` keeps it reproducible
    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 62, (), generator=gen))).beta(alpha, alpha))
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        side = math.sqrt(1.0 - lam)
        bh, bw = int(h * side), int(w * side)
        cy, cx = (int(torch.randint(0, n, (), generator=gen)) for n in (h, w))
        top, bottom = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
        left, right = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
        x = x.clone()
        x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * partner
    return x, lam * targets + (1.0 - lam) * targets.flip(0)


def _eval_batches(dataset, batch_size: int, workers: int):
    if isinstance(dataset, tuple):
        return zip(dataset[0].split(batch_size), dataset[1].split(batch_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       collate_fn=data.collate if data.skips_bad_images(dataset) else None)


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device, batch_size: int, workers: int = 0,
             amp: Optional[torch.dtype] = None) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``, over the images
    that could be read: ``{"acc", "loss", "skipped"}``, ``skipped`` the number of unreadable images
    left out (an ImageFolder that skips bad images)."""
    was = model.training
    model.eval()
    correct, loss, n, skipped = 0, 0.0, 0, []
    for batch in _eval_batches(dataset, batch_size, workers):
        x, y, lost = data.unpack(batch)
        skipped += lost
        if y is None:
            continue
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    if n == 0:
        raise ShiftwiseError(f"none of the {len(skipped)} held-out images can be read"
                             + (f" (first: {skipped[0]})" if skipped else ""))
    return {"acc": 100.0 * correct / n, "loss": loss / n, "skipped": len(skipped)}
