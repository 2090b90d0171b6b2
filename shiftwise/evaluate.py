"""Top-1/top-5 evaluation of a classifier, and the original-vs-converted verification.

``verify`` runs the same batches through both models and passes only if top-1 is identical,
the predictions agree on at least 99.99 % of the images and no logit differs by more than
1e-3 (``CRITERIA``).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Iterable, List, Optional

import torch
from torch import Tensor, nn

CRITERIA = {"min_agreement": 0.9999, "max_abs_diff": 1e-3}


@dataclasses.dataclass
class EvalResult:
    """Accuracy and speed of one model on one data set (accuracies in percent)."""

    images: int
    top1: float
    top5: float
    seconds: float  # forward passes only (data loading excluded), device synchronised
    throughput: float  # images per second of forward passes after the first (warm-up) batch

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        if self.passed:
            lines.append(f"PASS: top-1 identical, agreement >= {100 * CRITERIA['min_agreement']:.2f}%, "
                         f"max |difference| <= {CRITERIA['max_abs_diff']:g}")
        else:
            lines.append("FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain-text line (none when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self._bar = None
        self._last = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415 (optional)
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.done < self.total and now - self._last < (0.2 if sys.stderr.isatty() else 10.0):
            return
        self._last = now
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"{self.desc}: {self.done}/{self.total} images{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and sys.stderr.isatty():
            sys.stderr.write(" " * (len(self.desc) + 40) + "\r")
            sys.stderr.flush()


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
    if dataset_classes is not None and dataset_classes > model_out:
        raise ValueError(f"the data set has {dataset_classes} classes but the model predicts {model_out}; "
                         "point --data at the validation folder (root/<class>/<image>)")


def _batches(loader: Iterable, device: torch.device, progress: Progress):
    for images, target in loader:
        yield images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        progress.update(len(target))


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
    bar = Progress(len(getattr(loader, "dataset", ())), "eval", progress)
    n = top1 = top5 = 0
    clock = _Clock()
    classes = _num_classes(loader)
    try:
        for images, target in _batches(loader, device, bar):
            logits, dt = _timed_forward(model, images)
            _check_classes(logits.shape[1], classes)
            clock.add(len(target), dt)
            c1, c5 = _topk_correct(logits, target)
            n, top1, top5 = n + len(target), top1 + c1, top5 + c5
    finally:
        bar.close()
    if n == 0:
        raise ValueError("the data loader yielded no images")
    return EvalResult(n, 100.0 * top1 / n, 100.0 * top5 / n, clock.seconds, clock.throughput)


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
    bar = Progress(len(getattr(loader, "dataset", ())), "verify", progress)
    classes = _num_classes(loader)
    n = agree = 0
    hits = {"o1": 0, "o5": 0, "c1": 0, "c5": 0}
    clocks = {"o": _Clock(), "c": _Clock()}
    max_diff = 0.0
    try:
        for images, target in _batches(loader, device, bar):
            lo, dto = _timed_forward(original, images)
            lc, dtc = _timed_forward(converted, images)
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
        raise ValueError("the data loader yielded no images")
    o, c = (EvalResult(n, 100.0 * hits[k + "1"] / n, 100.0 * hits[k + "5"] / n, clocks[k].seconds,
                       clocks[k].throughput) for k in ("o", "c"))
    agreement = agree / n
    failures = []
    if hits["o1"] != hits["c1"]:
        failures.append(f"top-1 differs ({o.top1:.2f}% vs {c.top1:.2f}%)")
    if agreement < CRITERIA["min_agreement"]:
        failures.append(f"agreement {100 * agreement:.2f}% < {100 * CRITERIA['min_agreement']:.2f}%")
    if not max_diff <= CRITERIA["max_abs_diff"]:
        failures.append(f"max |logit difference| {max_diff:.2e} > {CRITERIA['max_abs_diff']:g}")
    return VerifyResult(o, c, agreement, max_diff, not failures, failures)
