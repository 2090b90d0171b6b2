"""A sparse (fine-tuned, compacted) model against the checkpoint it came from.

:func:`compare_checkpoints` runs a shift-wise file (``convert``'s output, ``train``'s
``checkpoint.pt`` or ``compact.pt``) and its origin on the same batches and reports what the
sparsity cost and bought: top-1/top-5 of each, the accuracy difference in points, how often the
predictions agree, the tiles kept and the forward throughput over the origin's, both in the
origin's original form and converted to shift-wise at the same tile size. ``shiftwise verify
FILE --against ORIGIN`` prints it.

The origin of a file that records the sha256 of the embedded demo is found without asking. A
lossless conversion (kind ``"converted"``) is held to the conversion contract of
:func:`shiftwise.evaluate.verify` (``CRITERIA``, top-1 identical); a trained file passes unless
its top-1 drops by more than ``max_drop`` points.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from shiftwise.convert.io import DEMO, Checkpoint, build_model, demo_path, read_checkpoint, sha256_file
from shiftwise.convert.swap import convert_model

from .data import make_loader
from .evaluate import (CRITERIA, EvalResult, _batches, _check_classes, _Clock, _no_images, _num_classes,
                       _timed_forward, _topk_correct, dataset_for, resolve_device)
from .modules import ShiftWiseConv2d, set_backend
from .progress import bar as progress_bar

logger = logging.getLogger(__name__)


class NoOriginError(ValueError):
    """A trained or converted file was given without the checkpoint it should be compared with."""


@dataclasses.dataclass
class LayerTiles:
    """Alive tiles of one shift-wise layer of the sparse model, and its tiles in the full conversion."""

    name: str
    kept: int
    dense: int


@dataclasses.dataclass
class TilesKept:
    """Alive tiles of the sparse model over the tiles of its origin converted at the same tile size.

    A layer's alive tiles are those it holds when compacted, else those not all zero (the
    pruned tiles of a training file are zero). ``recorded`` is the count the file states: its
    masks' count, which includes kept tiles that are still zero (regrown at a last update).
    """

    kept: int
    dense: int
    layers: List[LayerTiles]  # empty when the two models' layers do not correspond
    source: str  # "measured" (origin converted here) or "recorded" (the file's metadata)
    recorded: Optional[int] = None

    @property
    def fraction(self) -> float:
        return self.kept / self.dense if self.dense else float("nan")

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dense": self.dense, "fraction": self.fraction, "source": self.source,
                "recorded": self.recorded, "layers": [dataclasses.asdict(layer) for layer in self.layers]}


@dataclasses.dataclass
class SparseComparison:
    """What :func:`compare_checkpoints` measured (accuracies in percent, differences in points)."""

    sparse_path: str
    sparse_ckpt: Checkpoint
    origin_path: str
    origin_ckpt: Checkpoint
    found_by_hash: bool  # the origin (the embedded demo) was found by the hash the sparse file records
    matches_record: Optional[bool]  # the origin's sha256 is the one the sparse file records (None: none recorded)
    data: str
    device: torch.device
    batch_size: int
    backend: Optional[str]  # of the shift-wise layers; None: their own
    wall_seconds: float
    sparse: EvalResult
    origin: EvalResult  # the origin as its file builds it (an official file: its original architecture)
    origin_shiftwise: Optional[EvalResult]  # an official origin converted at the sparse file's tile size
    agreement: float  # fraction of images where sparse and origin predict the same class
    max_abs_diff: float  # max |logit difference| between sparse and origin
    tiles: Optional[TilesKept]
    max_drop: Optional[float] = None  # points of top-1 the sparse model may lose

    @property
    def exact(self) -> bool:
        """The sparse file is a lossless conversion, held to the conversion contract."""
        return self.sparse_ckpt.kind == "converted"

    @property
    def top1_difference(self) -> float:
        return self.sparse.top1 - self.origin.top1

    @property
    def top5_difference(self) -> float:
        return self.sparse.top5 - self.origin.top5

    @property
    def speedup(self) -> float:
        """Forward throughput of the sparse model over the origin's (in its original form)."""
        return self.sparse.throughput / self.origin.throughput

    @property
    def speedup_over_shiftwise(self) -> Optional[float]:
        """Over the origin converted to shift-wise: what the sparsity itself bought."""
        if self.origin_shiftwise is None:
            return None
        return self.sparse.throughput / self.origin_shiftwise.throughput

    @property
    def failures(self) -> List[str]:
        out = []
        if self.exact:
            if self.sparse.top1 != self.origin.top1:  # same images, same formula: equal counts give equal floats
                out.append(f"top-1 differs ({self.origin.top1:.2f}% vs {self.sparse.top1:.2f}%)")
            if self.agreement < CRITERIA["min_agreement"]:
                out.append(f"agreement {100 * self.agreement:.2f}% < {100 * CRITERIA['min_agreement']:.2f}%")
            if not self.max_abs_diff <= CRITERIA["max_abs_diff"]:
                out.append(f"max |logit difference| {self.max_abs_diff:.2e} > {CRITERIA['max_abs_diff']:g}")
        if self.max_drop is not None and -self.top1_difference > self.max_drop + 1e-9:
            out.append(f"top-1 drops by {-self.top1_difference:.2f} points, more than {self.max_drop:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def _origin_label(self) -> str:
        if self.origin_ckpt.path == demo_path():
            label = f"embedded demo ({os.path.basename(self.origin_path)})"
        else:
            label = self.origin_path
        if self.found_by_hash:
            label += f", found by the sha256 that {os.path.basename(self.sparse_path)} records"
        return label

    def as_dict(self) -> dict:
        s, o = self.sparse_ckpt, self.origin_ckpt

        def entry(path, ckpt, result):
            return {"path": path, "kind": ckpt.kind, "family": ckpt.family, "model": ckpt.config,
                    "tile_size": ckpt.tile_size, "sha256": ckpt.sha256, **result.as_dict()}

        return {
            "sparse": entry(self.sparse_path, s, self.sparse),
            "origin": {**entry(self.origin_path, o, self.origin), "embedded_demo": o.path == demo_path(),
                       "found_by_hash": self.found_by_hash, "matches_record": self.matches_record},
            "origin_shiftwise": self.origin_shiftwise.as_dict() if self.origin_shiftwise else None,
            "top1_difference": self.top1_difference, "top5_difference": self.top5_difference,
            "agreement": self.agreement, "max_abs_diff": self.max_abs_diff,
            "tiles": self.tiles.as_dict() if self.tiles else None,
            "speedup": self.speedup, "speedup_over_shiftwise": self.speedup_over_shiftwise,
            "data": self.data, "device": str(self.device), "batch_size": self.batch_size,
            "backend": self.backend, "wall_seconds": self.wall_seconds, "exact": self.exact,
            "criteria": dict(CRITERIA, top1="identical") if self.exact else None, "max_drop": self.max_drop,
            "passed": self.passed, "failures": self.failures,
        }

    def report(self) -> str:
        """The human-readable report that ``shiftwise verify FILE --against ORIGIN`` prints."""
        s, o = self.sparse_ckpt, self.origin_ckpt
        n = self.sparse.images
        rows = [("origin" if o.kind == "official" else f"origin ({o.kind})", self.origin)]
        if self.origin_shiftwise is not None:
            rows.append(("  shift-wise", self.origin_shiftwise))
        rows.append((s.kind if s.kind != "official" else "compared", self.sparse))
        lines = [
            f"shiftwise verify: {s.description}, {s.kind} file {self.sparse_path}",
            f"origin: {self._origin_label()}",
            f"data: {self.data}, batch {self.batch_size}, device {self.device}, "
            f"backend {self.backend or 'of each layer'}",
            f"{'':20}{'top-1':>9}{'top-5':>9}{'images/s':>11}",
            *(f"{name:20}{r.top1:8.2f}%{r.top5:8.2f}%{r.throughput:11.1f}" for name, r in rows),
            f"images: {n}   top-1 difference: {self.top1_difference:+.2f} points   top-5 difference: "
            f"{self.top5_difference:+.2f} points",
            f"prediction agreement: {100 * self.agreement:.2f}% ({round(self.agreement * n)}/{n})   "
            f"max |logit difference|: {self.max_abs_diff:.2e}",
        ]
        if self.sparse.skipped:
            lines.append(self.sparse.skipped_line())
        if self.tiles is not None:
            t = self.tiles
            line = f"tiles kept: {t.kept}/{t.dense} ({100 * t.fraction:.1f}%)"
            if t.source == "recorded":
                line += " as the file records (the origin cannot be converted at its tile size here)"
            elif t.recorded is not None and t.recorded != t.kept:
                line += f" (the file records {t.recorded}: its masks also keep tiles that are still zero)"
            if t.layers:
                line += "; per layer: " + ", ".join(f"{layer.name} {layer.kept}/{layer.dense}" for layer in t.layers)
            lines.append(line)
        speed = f"speed: {self.speedup:.2f}x the origin's throughput"
        if self.origin_shiftwise is not None:
            speed += f", {self.speedup_over_shiftwise:.2f}x that of its shift-wise conversion (what sparsity bought)"
        lines.append(speed)
        if self.failures:
            lines.append("FAIL: " + "; ".join(self.failures))
        elif self.exact:
            lines.append(f"PASS: top-1 identical, agreement >= {100 * CRITERIA['min_agreement']:.2f}%, "
                         f"max |difference| <= {CRITERIA['max_abs_diff']:g}")
        elif self.max_drop is not None:
            drop = max(0.0, -self.top1_difference)
            lines.append(f"PASS: top-1 drops by {drop:.2f} points, at most {self.max_drop:g}")
        lines.append(f"wall time: {self.wall_seconds:.1f} s")
        return "\n".join(lines)


def recorded_origin(ckpt: Checkpoint) -> Optional[str]:
    """The sha256 of the checkpoint ``ckpt`` was made from: the official file at the root of its
    chain, else the file it was made from; None when it records neither (trained from scratch)."""
    return ckpt.origin_sha256 or ckpt.source_sha256


def derived(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` was made from another checkpoint (converted, trained, compacted), so that
    it is compared with that origin instead of being converted and held to the conversion."""
    return ckpt.kind != "official" or recorded_origin(ckpt) not in (None, ckpt.sha256)


def _read(ckpt) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else read_checkpoint(ckpt)


def find_origin(sparse: Checkpoint) -> Checkpoint:
    """The embedded demo when ``sparse`` records its sha256 as its origin; else :class:`NoOriginError`."""
    if sparse.kind == "official":
        raise NoOriginError(f"{sparse.path} is an official checkpoint; pass the checkpoint to compare it with")
    recorded = recorded_origin(sparse)
    if recorded is not None and recorded == sha256_file(demo_path()):
        return read_checkpoint(DEMO)
    name = sparse.origin_name or sparse.source_name
    what = "is already converted" if sparse.kind == "converted" else f"is a {sparse.kind} file of shiftwise train"
    made = f"from {name}" if name and recorded else "trained from scratch, no origin recorded"
    raise NoOriginError(f"{sparse.path} {what} ({made}); pass --against ORIGIN, the checkpoint to compare it with")


def _tiles(sparse: nn.Module, reference: Optional[nn.Module], ckpt: Checkpoint) -> Optional[TilesKept]:
    layers = {name: m for name, m in sparse.named_modules() if isinstance(m, ShiftWiseConv2d)}
    if not layers:
        return None
    dense = {name: m.weight.shape[0] for name, m in reference.named_modules()
             if isinstance(m, ShiftWiseConv2d)} if reference is not None else {}
    kept = {}
    for name, m in layers.items():
        held = m.weight.shape[0]
        kept[name] = held if held < dense.get(name, 0) else int(m.weight.detach().flatten(1).ne(0).any(1).sum())
    recorded = int(ckpt.tiles["kept"]) if ckpt.tiles else None
    if dense.keys() == kept.keys():
        return TilesKept(sum(kept.values()), sum(dense.values()),
                         [LayerTiles(name, kept[name], dense[name]) for name in kept], "measured", recorded)
    if dense:
        return TilesKept(sum(kept.values()), sum(dense.values()), [], "measured", recorded)
    if ckpt.tiles:
        return TilesKept(recorded, int(ckpt.tiles["dense"]), [], "recorded", recorded)
    return None


@torch.no_grad()
def _run(models: Dict[str, nn.Module], loader, device: torch.device, progress: bool):
    """Every model on the same batches: per model an :class:`EvalResult`, and the agreement and
    max |logit difference| of ``"sparse"`` with ``"origin"``."""
    for m in models.values():
        m.eval().to(device)
    bar = progress_bar(total=len(getattr(loader, "dataset", ())), desc="compare", unit="img", enabled=progress)
    classes = _num_classes(loader)
    clocks = {k: _Clock() for k in models}
    hits = {k: [0, 0] for k in models}
    n = agree = 0
    max_diff = 0.0
    skipped: List[str] = []
    try:
        for images, target in _batches(loader, device, bar, skipped):
            if n == 0:  # kernel compilation and allocator warm-up stay out of the times
                for model in models.values():
                    model(images)
            logits = {}
            for key, model in models.items():
                logits[key], dt = _timed_forward(model, images)
                clocks[key].add(len(target), dt)
            ls, lo = logits["sparse"], logits["origin"]
            if ls.shape != lo.shape:
                raise ValueError(f"the two models predict different numbers of classes ({ls.shape[1]} and "
                                 f"{lo.shape[1]}): compare a model with the checkpoint it was fine-tuned from only "
                                 "when the head was kept; evaluate each with shiftwise eval instead")
            if n == 0:
                _check_classes(lo.shape[1], classes)
            for key, out in logits.items():
                c1, c5 = _topk_correct(out, target)
                hits[key][0] += c1
                hits[key][1] += c5
            agree += int(ls.argmax(1).eq(lo.argmax(1)).sum())
            diff = (ls.double() - lo.double()).abs().max().item()
            max_diff = max(max_diff, diff if diff == diff else float("inf"))  # NaN counts as different
            n += len(target)
    finally:
        bar.close()
    if n == 0:
        raise ValueError(_no_images(skipped))
    results = {k: EvalResult(n, 100.0 * hits[k][0] / n, 100.0 * hits[k][1] / n, clocks[k].seconds,
                             clocks[k].throughput, len(skipped), skipped[0] if skipped else None) for k in models}
    return results, agree / n, max_diff


def compare_checkpoints(sparse, origin=None, data: Optional[str] = None, image_size: Optional[int] = None,
                        batch_size: int = 64, workers: Optional[int] = None, limit: Optional[int] = None,
                        device=None, backend: Optional[str] = None, progress: bool = False,
                        skip_bad_images: bool = False, max_drop: Optional[float] = None) -> SparseComparison:
    """Compare the shift-wise file ``sparse`` with the checkpoint ``origin`` on the same batches.

    Args:
        sparse: a file from ``shiftwise convert`` or ``shiftwise train`` (path, ``"demo"`` or a
            :class:`Checkpoint`); any checkpoint works, but only shift-wise ones have tiles to count.
        origin: the checkpoint it came from; None finds it by the sha256 that ``sparse`` records
            (the embedded demo), else raises :class:`NoOriginError`. An origin whose sha256 is
            not the recorded one is compared all the same, with a logged warning.
        data, image_size, batch_size, workers, limit, device, skip_bad_images: as for
            :func:`shiftwise.evaluate.evaluate_checkpoint`; the data and preprocessing are the origin's.
        backend: backend of the shift-wise layers (default: each layer's own, ``auto``).
        progress: a progress bar on stderr.
        max_drop: top-1 points the sparse model may lose before :attr:`SparseComparison.passed` is False.

    The origin runs twice when it is an official file: in its original form and converted at the
    sparse file's tile size, so the throughput ratios separate what the shift-wise form and what
    the sparsity bought. Tiles kept are the sparse layers' non-zero tiles over those of that conversion.

    Example::

        >>> r = compare_checkpoints("run/compact.pt", "demo")
        >>> text = r.report(); r.top1_difference, r.tiles.fraction, r.speedup
    """
    start = time.perf_counter()
    device = resolve_device(device)
    if max_drop is not None and not max_drop >= 0:
        raise ValueError(f"the allowed top-1 drop must be >= 0 points, got {max_drop}")
    sparse_ckpt = _read(sparse)
    found_by_hash = origin is None
    origin_ckpt = find_origin(sparse_ckpt) if origin is None else _read(origin)
    recorded = {sparse_ckpt.origin_sha256, sparse_ckpt.source_sha256} - {None}
    matches = origin_ckpt.sha256 in recorded if recorded else None
    if matches is False:
        name = sparse_ckpt.origin_name or sparse_ckpt.source_name or "another file"
        logger.warning("%s was made from %s (sha256 %s...), not from %s (sha256 %s...); comparing them anyway",
                       sparse_ckpt.path, name, recorded_origin(sparse_ckpt)[:12], origin_ckpt.path,
                       origin_ckpt.sha256[:12])
    if (sparse_ckpt.preprocessing and origin_ckpt.preprocessing
            and sparse_ckpt.preprocessing != origin_ckpt.preprocessing):
        logger.warning("%s records another preprocessing than %s (%s vs %s); both run on the origin's",
                       sparse_ckpt.path, origin_ckpt.path, sparse_ckpt.preprocessing, origin_ckpt.preprocessing)

    models = {"sparse": build_model(sparse_ckpt), "origin": build_model(origin_ckpt)}
    reference = models["origin"] if origin_ckpt.kind != "official" else None
    if origin_ckpt.kind == "official":
        tile = sparse_ckpt.tile_size if sparse_ckpt.kind != "official" else None
        reference = models["origin_shiftwise"] = convert_model(models["origin"], tile_size=tile)
    elif origin_ckpt.tile_size != sparse_ckpt.tile_size:
        reference = None  # tiles of another size do not count against each other
    for m in models.values():
        set_backend(m, backend)
    tiles = _tiles(models["sparse"], reference, sparse_ckpt)

    dataset, description = dataset_for(origin_ckpt, data, image_size, skip_bad_images)
    loader = make_loader(dataset, batch_size, workers, limit, device)
    results, agreement, max_diff = _run(models, loader, device, progress)
    return SparseComparison(
        sparse_ckpt.path, sparse_ckpt, origin_ckpt.path, origin_ckpt, found_by_hash, matches, description, device,
        batch_size, backend, time.perf_counter() - start, results["sparse"], results["origin"],
        results.get("origin_shiftwise"), agreement, max_diff, tiles, max_drop)
