"""Top-1/top-5 evaluation of a classifier, and the original-vs-converted verification.

``evaluate`` and ``verify`` take models and a data loader. ``evaluate_checkpoint`` and
``verify_checkpoint`` start from a checkpoint file: they read it, pick the data (an image
folder, or the embedded digits for 10-class models) and the device, and return a result that
prints as the ``shiftwise eval`` / ``shiftwise verify`` report or as JSON.

``verify`` passes only if top-1 is identical, the predictions agree on at least 99.99 % of the
images and no logit differs by more than 1e-3 (``CRITERIA``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import logging
import os
import time
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from shiftwise.convert.io import Checkpoint, build_model, demo_path, read_checkpoint
from shiftwise.convert.swap import convert_model

from .data import DIGITS_SIZE, Digits, ImageFolder, held_out_split, make_loader, package_file, unpack
from .dispatch import resolve_backend
from .modules import ShiftWiseConv2d, set_backend
from .progress import bar as progress_bar

logger = logging.getLogger(__name__)

DEMO_CHECKPOINT = "slak_demo.pth"  # the embedded SLaK that verify checks without arguments
CRITERIA = {"min_agreement": 0.9999, "max_abs_diff": 1e-3}


@dataclasses.dataclass
class EvalResult:
    """Accuracy and speed of one model on one data set (accuracies in percent)."""

    images: int
    top1: float
    top5: float
    seconds: float  # forward passes only (data loading excluded), device synchronised
    throughput: float  # images per second of forward passes after the first (warm-up) batch
    skipped: int = 0  # unreadable images left out (``skip_bad_images``)
    first_skipped: Optional[str] = None  # the path of the first of them

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def skipped_line(self) -> Optional[str]:
        """The report line on skipped images, None when there were none."""
        if not self.skipped:
            return None
        return f"skipped {self.skipped} unreadable image{'s' if self.skipped > 1 else ''} (first: {self.first_skipped})"


@dataclasses.dataclass
class VerifyResult:
    """Original and converted model on the same batches, and the pass/fail verdict."""

    original: EvalResult
    converted: EvalResult
    agreement: float  # fraction of images whose top-1 class is the same
    max_abs_diff: float  # max |logit difference| over all images and classes
    passed: bool
    failures: List[str]

    def as_dict(self) -> dict:
        return {"original": self.original.as_dict(), "converted": self.converted.as_dict(),
                "agreement": self.agreement, "max_abs_diff": self.max_abs_diff, "passed": self.passed,
                "failures": self.failures, "criteria": dict(CRITERIA, top1="identical")}

    def report(self) -> str:
        """The human-readable report that ``shiftwise verify`` prints."""
        o, c = self.original, self.converted
        n = o.images
        same = round(self.agreement * n)
        lines = [
            f"{'':12}{'top-1':>9}{'top-5':>9}{'images/s':>11}",
            f"{'original':12}{o.top1:8.2f}%{o.top5:8.2f}%{o.throughput:11.1f}",
            f"{'shift-wise':12}{c.top1:8.2f}%{c.top5:8.2f}%{c.throughput:11.1f}",
            f"images: {n}   prediction agreement: {100 * self.agreement:.2f}% ({same}/{n})   "
            f"max |logit difference|: {self.max_abs_diff:.2e}",
        ]
        if o.skipped:
            lines.append(o.skipped_line())
        if self.passed:
            lines.append(f"PASS: top-1 identical, agreement >= {100 * CRITERIA['min_agreement']:.2f}%, "
                         f"max |difference| <= {CRITERIA['max_abs_diff']:g}")
        else:
            lines.append("FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


class _Clock:
    """Forward time of one model. The first batch (JIT compilation, allocator warm-up) is left out
    of the throughput unless it is the only one."""

    def __init__(self):
        self.seconds = 0.0
        self._first = None
        self._images = 0
        self._timed = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.seconds += seconds
        if self._first is None:
            self._first = (images, seconds)
        else:
            self._images += images
            self._timed += seconds

    @property
    def throughput(self) -> float:
        images, seconds = (self._images, self._timed) if self._images else (self._first or (0, 0.0))
        return images / seconds if seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_forward(model: nn.Module, x: Tensor) -> tuple:
    _sync(x.device)
    start = time.perf_counter()
    logits = model(x)
    _sync(x.device)
    return logits, time.perf_counter() - start


def _topk_correct(logits: Tensor, target: Tensor) -> tuple:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(target[:, None])
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def _check_classes(model_out: int, dataset_classes: Optional[int]) -> None:
    if dataset_classes is not None and dataset_classes != model_out:
        logger.warning("the data set has %d classes but the model predicts %d: accuracy compares class indices "
                       "(folder ranks) with the model's outputs; check that --data is the data set the model was "
                       "trained for (root/<class>/<image>)", dataset_classes, model_out)


def _batches(loader: Iterable, device: torch.device, progress, skipped: List[str]):
    """The loader's non-empty batches on ``device``; the paths of skipped images go to ``skipped``.

    When the loop ends early (an unreadable image, a wrong class count), the loader's worker
    processes are stopped at once: left alone, one blocked on a full pipe holds up the
    iterator's shutdown for seconds."""
    batches = iter(loader)
    try:
        for batch in batches:
            images, target, lost = unpack(batch)
            skipped += lost
            progress.update(len(lost) + (len(target) if target is not None else 0))
            if target is not None and len(target):
                yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)
    except BaseException:
        for worker in getattr(batches, "_workers", ()):
            worker.terminate()
        raise


def _num_classes(loader) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # through Subset
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device=None, progress: bool = False) -> EvalResult:
    """Top-1/top-5 accuracy (percent) and forward throughput of ``model`` over ``loader``.

    ``loader`` yields ``(images (B, 3, S, S), targets (B,))``; ``model`` maps images to logits
    ``(B, classes)``. The model is put in eval mode and on ``device`` (default: where its
    parameters are).

    Example::

        >>> loader = make_loader(ImageFolder("val", EvalTransform(224)), batch_size=64)
        >>> r = evaluate(model, loader)
        >>> r.top1, r.top5, r.throughput
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    bar = progress_bar(total=len(getattr(loader, "dataset", ())), desc="eval", unit="img", enabled=progress)
    n = top1 = top5 = 0
    clock = _Clock()
    classes = _num_classes(loader)
    skipped: List[str] = []
    try:
        for images, target in _batches(loader, device, bar, skipped):
            logits, dt = _timed_forward(model, images)
            if n == 0:
                _check_classes(logits.shape[1], classes)
            clock.add(len(target), dt)
            c1, c5 = _topk_correct(logits, target)
            n, top1, top5 = n + len(target), top1 + c1, top5 + c5
    finally:
        bar.close()
    if n == 0:
        raise ValueError(_no_images(skipped))
    return EvalResult(n, 100.0 * top1 / n, 100.0 * top5 / n, clock.seconds, clock.throughput, len(skipped),
                      skipped[0] if skipped else None)


def _no_images(skipped: List[str]) -> str:
    if skipped:
        return f"every image was unreadable ({len(skipped)} skipped, first: {skipped[0]})"
    return "the data loader yielded no images"


@torch.no_grad()
def verify(original: nn.Module, converted: nn.Module, loader: Iterable, device=None,
           progress: bool = False) -> VerifyResult:
    """Run the same batches through ``original`` and ``converted`` and compare them.

    Passes iff top-1 accuracy is identical, the top-1 predictions agree on at least
    ``CRITERIA["min_agreement"]`` of the images and ``max |logit difference|`` is at most
    ``CRITERIA["max_abs_diff"]``.

    Example::

        >>> r = verify(model, convert_model(copy.deepcopy(model)), loader)
        >>> print(r.report()); r.passed
    """
    device = torch.device(device) if device is not None else next(original.parameters()).device
    original.eval().to(device)
    converted.eval().to(device)
    bar = progress_bar(total=len(getattr(loader, "dataset", ())), desc="verify", unit="img", enabled=progress)
    classes = _num_classes(loader)
    n = agree = 0
    hits = {"o1": 0, "o5": 0, "c1": 0, "c5": 0}
    clocks = {"o": _Clock(), "c": _Clock()}
    max_diff = 0.0
    skipped: List[str] = []
    try:
        for images, target in _batches(loader, device, bar, skipped):
            lo, dto = _timed_forward(original, images)
            lc, dtc = _timed_forward(converted, images)
            if n == 0:
                _check_classes(lo.shape[1], classes)
            if lc.shape != lo.shape:
                raise ValueError(f"converted model returns logits of shape {tuple(lc.shape)}, "
                                 f"the original {tuple(lo.shape)}")
            clocks["o"].add(len(target), dto)
            clocks["c"].add(len(target), dtc)
            for key, logits in (("o", lo), ("c", lc)):
                c1, c5 = _topk_correct(logits, target)
                hits[key + "1"] += c1
                hits[key + "5"] += c5
            agree += int(lo.argmax(1).eq(lc.argmax(1)).sum())
            diff = (lo.double() - lc.double()).abs().max().item()
            max_diff = max(max_diff, diff if diff == diff else float("inf"))  # NaN counts as a failure
            n += len(target)
    finally:
        bar.close()
    if n == 0:
        raise ValueError(_no_images(skipped))
    o, c = (EvalResult(n, 100.0 * hits[k + "1"] / n, 100.0 * hits[k + "5"] / n, clocks[k].seconds,
                       clocks[k].throughput, len(skipped), skipped[0] if skipped else None) for k in ("o", "c"))
    agreement = agree / n
    failures = []
    if hits["o1"] != hits["c1"]:
        failures.append(f"top-1 differs ({o.top1:.2f}% vs {c.top1:.2f}%)")
    if agreement < CRITERIA["min_agreement"]:
        failures.append(f"agreement {100 * agreement:.2f}% < {100 * CRITERIA['min_agreement']:.2f}%")
    if not max_diff <= CRITERIA["max_abs_diff"]:
        failures.append(f"max |logit difference| {max_diff:.2e} > {CRITERIA['max_abs_diff']:g}")
    return VerifyResult(o, c, agreement, max_diff, not failures, failures)


# from a checkpoint file ---------------------------------------------------------------------------
def resolve_device(name: Optional[str] = None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``...) as a device that exists here; ``None``
    picks CUDA when available, else the CPU. An unknown or absent device raises ``ValueError``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def dataset_for(ckpt: Checkpoint, data: Optional[str] = None, image_size: Optional[int] = None,
                skip_bad_images: bool = False) -> Tuple[Dataset, str]:
    """``(dataset, description)`` to evaluate ``ckpt`` on: the image folder ``data``
    (``root/<class>/<image>``), or without one the embedded digits, which fit only 10-class
    models. A ``data`` root holding ``train/`` and ``val/`` (else ``test/``) means its ``val/``
    (``test/``) folder, and the description says so. ``image_size`` defaults to the checkpoint's
    evaluation size, else 224 (32 for the digits). ``skip_bad_images``: see :class:`ImageFolder`.
    """
    if data is None:
        if ckpt.config["kwargs"].get("num_classes") != 10:
            raise ValueError("--data DIR is needed (an image folder such as imagenet/val); the embedded digits "
                             "fit only 10-class models such as the embedded demo")
        size = image_size if image_size is not None else ckpt.input_size or DIGITS_SIZE
        return Digits("test", ckpt.transform(size)), f"embedded UCI digits (test split), {size}x{size}"
    size = image_size if image_size is not None else ckpt.input_size or 224
    split = held_out_split(data)
    folder = os.path.join(data, split) if split else data
    dataset = ImageFolder(folder, ckpt.transform(size), skip_bad_images=skip_bad_images)
    where = f"the {split}/ split of {data}; " if split else ""
    return dataset, f"{folder} ({where}{len(dataset.classes)} classes), {size}x{size}"


@contextlib.contextmanager
def _source(src: Optional[str]) -> Iterator[Tuple[str, bool]]:
    """``(path, embedded)``: ``src``, or the embedded demo checkpoint when ``src`` is None."""
    if src is not None:
        yield os.fspath(src), False
        return
    with importlib.resources.as_file(package_file(DEMO_CHECKPOINT)) as path:
        yield str(path), True


@dataclasses.dataclass
class CheckpointEval:
    """What :func:`evaluate_checkpoint` measured, and on what."""

    checkpoint: str
    ckpt: Checkpoint
    data: str  # description of the data set
    device: torch.device
    batch_size: int
    wall_seconds: float
    result: EvalResult

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "family": self.ckpt.family, "model": self.ckpt.config,
                "converted": self.ckpt.converted, "data": self.data, "device": str(self.device),
                "wall_seconds": self.wall_seconds, **self.result.as_dict()}

    def report(self) -> str:
        """The human-readable report that ``shiftwise eval`` prints."""
        r = self.result
        c = self.ckpt
        share = f", {100 * c.density:.1f}% of its tiles" if c.converted and c.density is not None and c.density < 1 else ""
        kind = f"{c.kind}, tile {c.tile_size}{share}" if c.converted else "original"
        lines = [
            f"shiftwise eval: {self.ckpt.description} ({kind}) from {self.checkpoint}",
            f"data: {self.data}, {r.images} images, batch {self.batch_size}, device {self.device}",
            f"top-1 {r.top1:.2f}%   top-5 {r.top5:.2f}%   {r.throughput:.1f} images/s   ({self.wall_seconds:.1f} s)",
        ]
        return "\n".join(lines + ([r.skipped_line()] if r.skipped else []))


def evaluate_checkpoint(path, data: Optional[str] = None, image_size: Optional[int] = None, batch_size: int = 64,
                        workers: Optional[int] = None, limit: Optional[int] = None, device=None,
                        tile_size: Optional[int] = None, family: Optional[str] = None, ema: bool = False,
                        backend: Optional[str] = None, progress: bool = False,
                        skip_bad_images: bool = False) -> CheckpointEval:
    """Top-1/top-5 of an official or converted checkpoint file on ``data`` (see :func:`dataset_for`).

    Args:
        path: checkpoint file (official or converted).
        data: image folder ``root/<class>/<image>``; None for the embedded digits (10-class models).
        image_size: input side (default: the checkpoint's, else 224).
        batch_size, workers, limit: see :func:`shiftwise.data.make_loader`.
        device: ``"cpu"``, ``"cuda"``...; None picks CUDA when available.
        tile_size: convert an original checkpoint with this tile size before evaluating.
        family, ema: see :func:`shiftwise.convert.io.read_checkpoint`.
        backend: backend of the shift-wise layers (default: theirs).
        skip_bad_images: leave out unreadable images (counted in the result) instead of raising
            :class:`shiftwise.errors.BadImageError`.

    Example::

        >>> r = evaluate_checkpoint("slak_tiny_sw.pth", data="imagenet/val")
        >>> print(r.report()); r.result.top1
    """
    path = os.fspath(path)
    device = resolve_device(device)
    ckpt = read_checkpoint(path, ema=ema, family=family)
    model = build_model(ckpt)
    if tile_size is not None:
        if ckpt.converted:
            raise ValueError(f"{path} is already converted (tile size {ckpt.tile_size}); a tile size applies to an "
                             "original checkpoint, so leave it out")
        model = convert_model(model, tile_size=tile_size, inplace=True)
    set_backend(model, backend)
    dataset, description = dataset_for(ckpt, data, image_size, skip_bad_images)
    loader = make_loader(dataset, batch_size, workers, limit, device)
    start = time.perf_counter()
    result = evaluate(model, loader, device, progress=progress)
    return CheckpointEval(path, ckpt, description, device, batch_size, time.perf_counter() - start, result)


@dataclasses.dataclass
class CheckpointVerify:
    """What :func:`verify_checkpoint` compared, and the verdict (``passed``)."""

    source: str
    embedded: bool  # the embedded demo checkpoint
    ckpt: Checkpoint
    tile_size: Optional[int]
    layers: int  # ShiftWiseConv2d modules of the conversion
    tiles: int
    backend: str
    data: str
    device: torch.device
    batch_size: int
    wall_seconds: float
    result: VerifyResult

    @property
    def passed(self) -> bool:
        return self.result.passed

    def as_dict(self) -> dict:
        return {"source": "embedded demo" if self.embedded else self.source, "family": self.ckpt.family,
                "model": self.ckpt.config, "tile_size": self.tile_size, "layers": self.layers, "tiles": self.tiles,
                "backend": self.backend, "data": self.data, "device": str(self.device),
                "wall_seconds": self.wall_seconds, **self.result.as_dict()}

    def report(self) -> str:
        """The human-readable report that ``shiftwise verify`` prints."""
        where = f"embedded demo ({DEMO_CHECKPOINT})" if self.embedded else self.source
        return "\n".join([
            f"shiftwise verify: {self.ckpt.description} from {where}",
            f"converted: {self.layers} large-kernel layers -> ShiftWiseConv2d, tile {self.tile_size}, "
            f"{self.tiles} tiles, backend {self.backend}",
            f"data: {self.data}, batch {self.batch_size}, device {self.device}",
            self.result.report(),
            f"wall time: {self.wall_seconds:.1f} s",
        ])


def verify_checkpoint(src=None, data: Optional[str] = None, image_size: Optional[int] = None, batch_size: int = 64,
                      workers: Optional[int] = None, limit: Optional[int] = None, device=None,
                      tile_size: Optional[int] = None, family: Optional[str] = None, ema: bool = False,
                      backend: Optional[str] = None, progress: bool = False,
                      skip_bad_images: bool = False) -> CheckpointVerify:
    """Convert the official checkpoint ``src`` in memory and :func:`verify` it against the original.

    ``src`` is a path, ``"demo"`` or a :class:`Checkpoint` already read; without it, the embedded
    demo SLaK on the embedded digits. Files that :mod:`shiftwise` wrote (converted, trained) are
    refused: :func:`shiftwise.compare.compare_checkpoints` compares them with their origin.

    ``backend`` is that of the converted copy; by default ``SHIFTWISE_BACKEND``, else the Taichi
    kernels wherever they can run (``"auto"`` would run small maps on a CPU as dense convolutions
    of the merged kernels, which checks only the split and merge), else ``"torch"``. Other
    arguments as for :func:`evaluate_checkpoint`.

    Example::

        >>> r = verify_checkpoint()  # the embedded demo
        >>> r.passed, r.result.agreement
        (True, 1.0)
    """
    start = time.perf_counter()
    device = resolve_device(device)
    if isinstance(src, Checkpoint):
        ckpt, path, embedded = src, src.path, False
    else:
        with _source(src) as (path, embedded):
            ckpt = read_checkpoint(path, ema=ema, family=family)
    embedded = embedded or ckpt.path == demo_path()
    if ckpt.converted:
        what = "is already converted" if ckpt.kind == "converted" else f"is a {ckpt.kind} file of shiftwise train"
        raise ValueError(f"{path} {what}, not an official checkpoint; compare it with the checkpoint it came from: "
                         f"shiftwise verify {path} --against ORIGIN")
    original = build_model(ckpt)
    backend = backend or os.environ.get("SHIFTWISE_BACKEND") or (
        "taichi" if resolve_backend("auto", device) == "taichi" else "torch")
    converted = convert_model(original, tile_size=tile_size, backend=backend)
    layers = [m for m in converted.modules() if isinstance(m, ShiftWiseConv2d)]
    dataset, description = dataset_for(ckpt, data, image_size, skip_bad_images)
    loader = make_loader(dataset, batch_size, workers, limit, device)
    result = verify(original, converted, loader, device, progress=progress)
    return CheckpointVerify(path, embedded, ckpt, layers[0].small_kernel if layers else None, len(layers),
                            sum(m.weight.shape[0] for m in layers), backend, description, device, batch_size,
                            time.perf_counter() - start, result)
