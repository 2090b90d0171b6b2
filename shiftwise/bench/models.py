"""Whole models side by side (``shiftwise bench --model``): original, merged dense, shift-wise,
sparse and the floor, each checked against its reference before it is timed.

A model is a checkpoint file (official, converted, or written by ``shiftwise train``), the
literal ``demo`` (the embedded demo checkpoint) or a registered architecture name (random
weights, :func:`shiftwise.models.randomize_`). Its forms (:class:`ModelForms`):

* ``original``: the architecture as :mod:`shiftwise.models` builds it, with its own large-kernel
  layers (SLaK's ``K x 5`` + ``5 x K`` + ``5 x 5`` branches with BatchNorm; an SW network's
  training form, its SW layers computing planes and shifted sums), for an official file or a
  registered name (an SW network's ``checkpoint.pt``: its training form, named ``train``);
* ``dense``: every large-kernel layer merged into one dense depthwise conv (converted, then
  :func:`shiftwise.export.densify`), run channels_last; not for SW networks, whose merged
  kernels are SLaK's 51 x 51 (the SLaK forms time those) and would take most of the run;
* ``shiftwise``: converted to ``ShiftWiseConv2d`` (the chosen backend); for a file that is
  already shift-wise, the file's own model, named by its kind (``converted``, ``train``,
  ``compact``);
* ``sparse@D``: the shift-wise model keeping the fraction ``D`` of each channel's tiles (largest
  L1 norm first, :func:`magnitude_masks`), compacted (:func:`shiftwise.sparse.compact`);
* ``floor``: the shift-wise model with its large-kernel layers replaced by ``nn.Identity``: the
  MLPs, norms and downsampling that remain, the time no kernel of the large-kernel layers can
  go below;
* ``onnx_dense`` / ``onnx_shiftwise`` (``onnx=True``, CPU): the shift-wise form exported to ONNX
  in the dense form (each shift-wise layer one depthwise conv of its merged kernel) or the
  shift-wise form (tiles as small convs, shifts and sums as standard ops) and run in onnxruntime
  (:mod:`~shiftwise.bench.ort`): forward only, no memory measured (onnxruntime allocates outside
  PyTorch), the export and session made when the form is built (not timed).

Training steps run in train mode with AdamW. The form ``shiftwise train`` trains
(``train_form`` of a model's record) is the shift-wise one, except for an SW network, trained
in its training form (``original``); its converted form gets no training step. With several
models, ``comparison`` sets them side by side: the converted forward throughput
(``inference_form``) and that training step of each, and the ratios of each model to every
model named after it (``shiftwise bench --model sw_tiny unireplknet_t``: SW-T's throughput as a
multiple of UniRepLKNet-T's, and its training step's time as a multiple of UniRepLKNet-T's).

Each form's first forward (eval, no_grad) on one random batch is compared with its reference's
logits: the original (or, for a shift-wise file, the file's model) for the exact rewrites, the
masked model for a sparse form (pruning changes the function; compaction must not). A relative
difference above the tolerance raises :class:`ModelCheckError` naming the form.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftwise.convert.io import DEMO, build_model, read_checkpoint, tile_size_of
from shiftwise.convert.swap import convert_model

from ..data import DIGITS_SIZE
from ..dispatch import BACKENDS
from ..errors import ShiftwiseError
from ..evaluate import resolve_device
from ..export import densify
from ..models import create_model, list_models, model_config, model_family, randomize_
from ..modules import ShiftWiseConv2d, has_plane_layers, set_backend
from ..sparse import compact
from . import ort
from .report import device_name, device_tag, versions
from .timing import is_oom, peak_step_bytes, time_calls, timed_first

DEFAULT_IMAGE_SIZE = 224
DEMO_MODELS = ("slak_demo",)  # registered architectures sized for DIGITS_SIZE inputs
TOLERANCE = 1e-4  # max |logit difference| / max |reference logit| of an exact rewrite
LEARNING_RATE = 1e-4  # AdamW in the timed training steps (the weights barely move)


class ModelCheckError(ShiftwiseError):
    """A form of a model disagrees with its reference: a bug in a conversion, not a slow path.
    ``report``: what :func:`run_model_bench` had measured until then (the failure recorded)."""

    report: Optional[dict] = None


@dataclasses.dataclass
class BenchModel:
    """A model to benchmark: its network (eval mode, CPU) and where it came from.

    ``kind``: ``"official"``, ``"converted"``, ``"train"`` or ``"compact"`` for a file,
    ``"registered"`` for an architecture name with random weights. ``dense_tiles``: tiles of the
    full conversion (None for an official file or a name, where the conversion counts them).
    """

    spec: str
    kind: str
    family: str
    name: str
    model: nn.Module
    image_size: int
    path: Optional[str] = None
    sha256: Optional[str] = None
    dense_tiles: Optional[int] = None
    origin_sha256: Optional[str] = None  # the official checkpoint a shift-wise file was made from

    @property
    def shiftwise(self) -> bool:
        """Whether the model came with shift-wise layers of its own (a converted, train or compact
        file, unless it holds an SW network's training form)."""
        return self.kind not in ("official", "registered") and not self.training_form

    @property
    def training_form(self) -> bool:
        """Whether the model is an SW network in its training form (converted by the benchmark)."""
        return has_plane_layers(self.model)


def load_bench_model(spec: str, image_size: Optional[int] = None, seed: int = 0) -> BenchModel:
    """``spec`` as a :class:`BenchModel`: an existing file, ``demo``, or a registered name.

    The input size is ``image_size``, else the file's own, else 32 for the demo models and 224.
    A registered name gets random weights with BatchNorm statistics calibrated at that size.

    Example::

        >>> m = load_bench_model("slak_demo")
        >>> m.kind, m.image_size
        ('registered', 32)
    """
    spec = os.fspath(spec)
    if image_size is not None and image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    if os.path.isfile(spec) or spec == DEMO:
        ckpt = read_checkpoint(spec)
        size = image_size or ckpt.input_size or DEFAULT_IMAGE_SIZE
        return BenchModel(spec, ckpt.kind, ckpt.family, ckpt.config["name"], build_model(ckpt).eval(), size,
                          ckpt.path, ckpt.sha256, ckpt.tiles["dense"] if ckpt.tiles else None, ckpt.origin_sha256)
    if spec in list_models():
        size = image_size or (DIGITS_SIZE if spec in DEMO_MODELS else DEFAULT_IMAGE_SIZE)
        model = randomize_(create_model(spec), seed=seed, calibrate=size).eval()
        return BenchModel(spec, "registered", model_family(model), spec, model, size)
    if os.path.exists(spec):
        raise ValueError(f"model {spec!r} is not a file; give a checkpoint file, {DEMO}, or a registered name")
    raise ValueError(f"model {spec!r}: no such file, and not a registered name; give a checkpoint file, {DEMO} "
                     f"(the embedded demo), or one of {', '.join(list_models())}")


# forms -------------------------------------------------------------------------------------
def shiftwise_layers(model: nn.Module) -> List[Tuple[str, ShiftWiseConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShiftWiseConv2d)]


def tile_count(model: nn.Module) -> Tuple[int, int]:
    """``(tiles, alive)``: tiles of the shift-wise layers, and those not all zero."""
    layers = [m for _, m in shiftwise_layers(model)]
    total = sum(m.weight.shape[0] for m in layers)
    alive = sum(int(m.weight.detach().flatten(1).ne(0).any(1).sum()) for m in layers)
    return total, alive


@torch.no_grad()
def magnitude_masks(model: nn.Module, density: float) -> Dict[str, Tensor]:
    """Per ``ShiftWiseConv2d`` of ``model``, the ``(T,)`` bool mask keeping ``floor(density * n + 0.5)``
    (at least one) of each channel's ``n`` tiles, those of largest L1 norm (ties: plan order).

    Example::

        >>> masks = magnitude_masks(convert_model(create_model("slak_demo").eval()), 0.5)
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    masks = {}
    for name, layer in shiftwise_layers(model):
        plan = layer.plan
        counts = plan.counts().cpu()
        keep_n = torch.minimum(torch.floor(counts.double() * density + 0.5).long().clamp_min(1), counts)
        score = layer.weight.detach().abs().sum((1, 2)).cpu()
        channel = plan.tile_channel().long().cpu()
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(channel[order], stable=True)]  # by channel, largest first within each
        start = plan.offsets[:-1].long().cpu()
        rank = torch.arange(order.numel()) - start[channel[order]]  # position within its channel
        keep = torch.zeros(order.numel(), dtype=torch.bool)
        keep[order] = rank < keep_n[channel[order]]
        masks[name] = keep.to(layer.weight.device)
    return masks


def masked(model: nn.Module, masks: Dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` whose tiles outside ``masks`` are zero (plans unchanged)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in masks.items():
            out.get_submodule(name).weight[~keep] = 0
    return out


def floor_model(model: nn.Module) -> nn.Module:
    """A copy of the shift-wise ``model`` with every ``ShiftWiseConv2d`` replaced by ``nn.Identity``."""
    out = copy.deepcopy(model)
    for name, _ in shiftwise_layers(out):
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, nn.Identity())
    return out


@dataclasses.dataclass
class Form:
    """One form of a model: ``build()`` returns the network (eval mode); ``against`` names the form
    whose logits it must match (None: not checked) and ``reference()`` builds that model when no
    form computed its logits before; ``layout`` is ``"nchw"`` or ``"channels_last"``."""

    name: str
    build: Callable[[], nn.Module]
    against: Optional[str] = None
    reference: Optional[Callable[[], nn.Module]] = None
    layout: str = "nchw"
    backend: Optional[str] = None
    train: bool = True  # whether its training step is timed
    runtime: str = "torch"  # "onnxruntime": an exported graph (forward only, no memory measured)


class ModelForms:
    """The forms of a :class:`BenchModel` in table order (:attr:`forms`, see the module docstring).

    The shift-wise model is converted once, on first use, and shared by the forms derived from
    it; every form builds its own copy, so a timed training step changes no other form.
    :attr:`inference_form` names the converted form, :attr:`train_form` the one ``shiftwise
    train`` trains.

    Example::

        >>> [f.name for f in ModelForms(load_bench_model("slak_demo"), densities=[0.5]).forms]
        ['original', 'dense', 'shiftwise', 'sparse@0.5', 'floor']
    """

    def __init__(self, bm: BenchModel, densities: Sequence[float] = (), backend: Optional[str] = None,
                 tile_size: Optional[int] = None, onnx: bool = False):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if bm.shiftwise and tile_size is not None:
            raise ValueError(f"{bm.spec} is already shift-wise (tile {tile_size_of(bm.model)}); --tile-size applies "
                             "to conversions only")
        self.bm, self.backend, self.tile_size = bm, backend, tile_size
        self._sw: Optional[nn.Module] = None
        self._masks: Dict[float, Dict[str, Tensor]] = {}
        own = bm.kind if bm.shiftwise else "shiftwise"
        # what the exact rewrites must match: the file's own model, the original, or an SW
        # network's training form (named by its kind for a file written by shiftwise train)
        exact = own if bm.shiftwise else ("original" if bm.kind in ("official", "registered") else bm.kind)
        self.inference_form = own
        self.train_form = exact if bm.training_form else own
        sw = Form(own, lambda: set_backend(copy.deepcopy(self.shiftwise_model()), backend),
                  None if bm.shiftwise else exact, backend=backend, train=not bm.training_form)
        dense = Form("dense", lambda: densify(self.shiftwise_model()), exact, layout="channels_last")
        if bm.shiftwise:
            self.forms = [sw, dense]
        else:
            self.forms = [Form(exact, lambda: set_backend(copy.deepcopy(bm.model), backend),
                               backend=backend if bm.training_form else None), dense, sw]
        if bm.family == "sw":
            self.forms.remove(dense)
        if onnx:
            for form in ort.FORMS:
                self.forms.append(Form(f"onnx_{form}", lambda form=form: self.onnx_model(form),
                                       own if bm.shiftwise else exact, train=False, runtime="onnxruntime"))
        for d in sorted({float(d) for d in densities if float(d) < 1}, reverse=True):
            self.forms.append(Form(f"sparse@{d:g}", lambda d=d: self.sparse_model(d), f"masked@{d:g}",
                                   reference=lambda d=d: self.masked_model(d), backend=backend))
        self.forms.append(Form("floor", lambda: floor_model(self.shiftwise_model())))

    def shiftwise_model(self) -> nn.Module:
        """The model's shift-wise form (converted once; the model itself for a shift-wise file)."""
        if self._sw is None:
            self._sw = self.bm.model if self.bm.shiftwise else convert_model(self.bm.model, tile_size=self.tile_size)
        return self._sw

    def onnx_model(self, form: str) -> nn.Module:
        """The shift-wise model exported to ONNX in ``form`` and loaded in onnxruntime
        (:func:`~shiftwise.bench.ort.ort_model`; batch dynamic)."""
        model = self.shiftwise_model()
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        return ort.ort_model(model, (1, stem.in_channels, self.bm.image_size, self.bm.image_size), form)

    def masks(self, density: float) -> Dict[str, Tensor]:
        """:func:`magnitude_masks` of the shift-wise model at ``density`` (computed once)."""
        if density not in self._masks:
            self._masks[density] = magnitude_masks(self.shiftwise_model(), density)
        return self._masks[density]

    def masked_model(self, density: float) -> nn.Module:
        """The shift-wise model with the tiles outside :meth:`masks` zeroed (plans kept)."""
        return masked(self.shiftwise_model(), self.masks(density))

    def sparse_model(self, density: float) -> nn.Module:
        """:meth:`masked_model` compacted: the zeroed tiles removed from the plans."""
        return set_backend(compact(self.masked_model(density), self.masks(density), inplace=True), self.backend)

    @property
    def dense_tiles(self) -> int:
        """Tiles of the full conversion (the file's record for a shift-wise file)."""
        return self.bm.dense_tiles or tile_count(self.shiftwise_model())[0]


# measuring ---------------------------------------------------------------------------------
def rel_diff(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref| (in float64)."""
    scale = ref.detach().abs().max().item()
    return (out.detach().double() - ref.detach().double()).abs().max().item() / max(scale, 1e-30)


def _images_per_s(stats: Optional[dict], batch: int) -> Optional[float]:
    med = stats.get("median_ms") if stats else None
    return batch / (med / 1e3) if med and math.isfinite(med) and med > 0 else None


def run_form(form: Form, x: Tensor, target: Tensor, references: Dict[str, Tensor], device: torch.device,
             repeats: int, warmup: int, backward: bool = True, memory: bool = True, tolerance: float = TOLERANCE,
             dense_tiles: Optional[int] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Check then time one form; its logits go into ``references[form.name]``.

    Returns ``{"form", "layout", "backend", "params", "tiles", "tile_density", "check", "fwd",
    "train", "fwd_images_s", "train_images_s", "peak_fwd_bytes", "peak_train_bytes"}`` (times in
    ms, :func:`~shiftwise.bench.timing.time_calls`). Raises :class:`ModelCheckError` when the
    logits differ from the reference's by more than ``tolerance`` (relative).
    """
    log(f"{form.name} build")
    model = form.build().to(device).eval()
    if form.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    tiles, alive = tile_count(model)
    res = {"form": form.name, "layout": form.layout, "backend": form.backend,
           "params": sum(p.numel() for p in model.parameters()),
           "tiles": tiles if shiftwise_layers(model) else None,
           "tile_density": alive / dense_tiles if shiftwise_layers(model) and dense_tiles else None}
    if form.runtime != "torch":
        res.update(runtime=form.runtime, onnx=getattr(model, "info", None))
        memory = False  # allocations outside PyTorch's allocator
    log(f"{form.name} check")
    with torch.no_grad():
        out, first = timed_first(lambda: model(x), device)
    references[form.name] = out
    check = {"against": form.against, "max_rel_diff": None, "tolerance": tolerance}
    if form.against is not None:
        ref = references.get(form.against)
        if ref is None:
            ref_model = form.reference().to(device).eval()
            with torch.no_grad():
                ref = references[form.against] = ref_model(x.contiguous())
            del ref_model
        check["max_rel_diff"] = rel_diff(out, ref)
        if not check["max_rel_diff"] <= tolerance:
            raise ModelCheckError(f"form {form.name}: its logits differ from the {form.against} model's by "
                                  f"{check['max_rel_diff']:.2e} (relative, tolerance {tolerance:g}); not timed")
    res["check"] = check
    log(f"{form.name} forward")
    with torch.no_grad():
        res["fwd"], peak = _timed(lambda: model(x), device, repeats, warmup, memory, first)
    if memory:
        res["peak_fwd_bytes"] = peak
    res["fwd_images_s"] = _images_per_s(res["fwd"], x.shape[0])
    if backward and form.train:
        log(f"{form.name} training step")
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

        def step():
            F.cross_entropy(model(x), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # each step starts without gradients (as the peak is measured)
        res["train"], peak = _timed(step, device, repeats, warmup, memory)
        if memory:
            res["peak_train_bytes"] = peak
        res["train_images_s"] = _images_per_s(res["train"], x.shape[0])
    return res


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int, memory: bool,
           first_ms: Optional[float] = None) -> Tuple[dict, Optional[int]]:
    """:func:`~shiftwise.bench.timing.time_calls` statistics of ``fn`` and, with ``memory``, its
    peak bytes measured on the first warm-up call (one call more when there is none): a
    whole-model training step takes seconds, and profiling is no reason to run one more."""
    if first_ms is None:
        first_ms = timed_first(fn, device)[1]
    peak = peak_step_bytes(fn, device) if memory else None
    return time_calls(fn, device, repeats, max(0, warmup - 1) if memory else warmup, first_ms=first_ms), peak


def _ratios(report: dict) -> None:
    """Each form's speedup over the original form (its time / the form's) and multiple of the
    floor (the form's time / the floor's), forward and training step. A shift-wise file has no
    original form of its own: it is compared with that of the official checkpoint it was made
    from when that checkpoint ran in the same report at the same size (``original_from``)."""
    for rec in report["models"]:
        by_name = {f["form"]: f for f in rec["forms"]}
        original = by_name.get("original")
        if original is None and rec.get("origin_sha256"):
            origin = next((r for r in report["models"] if r.get("sha256") == rec["origin_sha256"]
                           and r["image_size"] == rec["image_size"] and r["forms"]
                           and r["forms"][0]["form"] == "original"), None)
            if origin is not None:
                original, rec["original_from"] = origin["forms"][0], origin["model"]
        for f in rec["forms"]:
            for key, base, invert in (("speedup_vs_original", original, True),
                                      ("floor_multiple", by_name.get("floor"), False)):
                if base is None:
                    continue
                f[key] = {}
                for stage in ("fwd", "train"):
                    mine, theirs = (f.get(stage) or {}).get("median_ms"), (base.get(stage) or {}).get("median_ms")
                    if mine and theirs:
                        f[key][stage] = theirs / mine if invert else mine / theirs


def _compare(report: dict) -> None:
    """``report["comparison"]`` (two models or more): per model its converted forward throughput
    and the training step ``shiftwise train`` runs (:class:`ModelForms`), and per pair ``(a, b)``
    with ``b`` named after ``a`` at the same input size, ``a``'s throughput as a multiple of
    ``b``'s and ``a``'s training-step time as a multiple of ``b``'s."""
    models = report["models"]
    if len(models) < 2:
        return
    rows = []
    for rec in models:
        by_name = {f["form"]: f for f in rec["forms"]}
        fwd, train = by_name.get(rec.get("inference_form")), by_name.get(rec.get("train_form"))
        rows.append({"model": rec["model"], "name": rec["name"], "image_size": rec["image_size"],
                     "inference_form": rec.get("inference_form"),
                     "fwd_images_s": fwd.get("fwd_images_s") if fwd else None,
                     "train_form": rec.get("train_form"),
                     "train_ms": ((train.get("train") or {}).get("median_ms") if train else None),
                     "peak_train_bytes": train.get("peak_train_bytes") if train else None})
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["image_size"] != b["image_size"]:
                continue
            pairs.append({"model": a["model"], "against": b["model"],
                          "fwd_throughput": _ratio(a["fwd_images_s"], b["fwd_images_s"]),
                          "train_time": _ratio(a["train_ms"], b["train_ms"]),
                          "train_peak": _ratio(a["peak_train_bytes"], b["peak_train_bytes"])})
    report["comparison"] = {"models": rows, "pairs": pairs}


def _ratio(a, b) -> Optional[float]:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (a, b))
    return a / b if ok else None


def run_model_bench(specs: Sequence[str], densities: Sequence[float] = (), batch: int = 4,
                    image_size: Optional[int] = None, repeats: int = 5, warmup: int = 1, device="cpu",
                    backend: Optional[str] = None, tile_size: Optional[int] = None, backward: bool = True,
                    memory: bool = True, tolerance: float = TOLERANCE, seed: int = 0, onnx: bool = False,
                    progress: Callable[[str], None] = lambda s: None,
                    on_form: Callable[[dict], None] = lambda report: None) -> dict:
    """Check and time every form of every model in ``specs`` (:func:`load_bench_model`,
    :class:`ModelForms`) on one random batch of ``batch`` images at the model's input size.

    Forward: eval mode, no_grad. Training step: train mode, forward, cross-entropy on random
    labels, backward, AdamW step. Each is called once (timed as ``first_ms``), ``warmup``
    times untimed, ``repeats`` times timed. Peak memory: above what was allocated before the
    call (:func:`~shiftwise.bench.timing.peak_step_bytes`). ``on_form(report)`` is called after
    every form (``report["complete"]`` is true after the last); ``progress`` gets
    ``"model form stage"`` strings. ``onnx``: also the ONNX forms in onnxruntime (CPU only).

    Returns the report: machine, versions and settings, and per model its source and forms, each
    with its check, times, images/s, peak memory and ratios to ``original`` and ``floor``; with
    several models, ``comparison`` (the module docstring).

    Example::

        >>> report = run_model_bench(["slak_demo"], densities=[0.5], batch=2, repeats=1, warmup=0,
        ...                          backend="torch", backward=False, memory=False)
        >>> [f["form"] for f in report["models"][0]["forms"]]
        ['original', 'dense', 'shiftwise', 'sparse@0.5', 'floor']
    """
    device = resolve_device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warm-up calls >= 0, got {repeats} and {warmup}")
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    densities = [float(d) for d in densities]
    if any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must lie in (0, 1], got {' '.join(f'{d:g}' for d in densities)}")
    if not specs:
        raise ValueError("give at least one model")
    if onnx and ort.unavailable(device):
        raise ValueError(f"ONNX forms: {ort.unavailable(device)}")
    if device.type == "cuda":  # full float32, cuDNN's fastest algorithms (chosen during the warm-up)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    report = {"kind": "models", "device": device_tag(device), "device_name": device_name(device),
              "versions": versions(), "threads": torch.get_num_threads(), "dtype": "float32", "batch": batch,
              "repeats": repeats, "warmup": warmup, "backend": backend, "tolerance": tolerance, "seed": seed,
              "densities": densities, "onnx": onnx, "loadavg_before": os.getloadavg(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "SHIFTWISE_CPU_THREADS",
                                                     "SHIFTWISE_BACKEND")},
              "complete": False, "models": []}
    loaded = [load_bench_model(spec, image_size, seed) for spec in specs]  # every name checked before any timing
    for i, bm in enumerate(loaded):
        progress(f"{bm.spec} forms")
        forms = ModelForms(bm, densities, backend, tile_size, onnx)
        model = bm.model
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, stem.in_channels, bm.image_size, bm.image_size, generator=g)
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        x, target = x.to(device), torch.randint(classes, (batch,), generator=g).to(device)
        rec = {"model": bm.spec, "kind": bm.kind, "family": bm.family, "name": bm.name, "path": bm.path,
               "sha256": bm.sha256, "origin_sha256": bm.origin_sha256, "config": model_config(model),
               "image_size": bm.image_size, "num_classes": classes, "dense_tiles": forms.dense_tiles,
               "inference_form": forms.inference_form, "train_form": forms.train_form, "forms": []}
        report["models"].append(rec)
        references: Dict[str, Tensor] = {}
        for form in forms.forms:
            try:
                rec["forms"].append(run_form(form, x, target, references, device, repeats, warmup, backward, memory,
                                             tolerance, forms.dense_tiles,
                                             log=lambda s, spec=bm.spec: progress(f"{spec} {s}")))
            except (RuntimeError, MemoryError) as exc:  # out of memory: recorded as inf, the next form runs
                if not is_oom(exc):
                    raise
                rec["forms"].append({"form": form.name, "oom": True, "fwd": {"median_ms": math.inf},
                                     **({"train": {"median_ms": math.inf}} if backward and form.train else {})})
            except ModelCheckError as exc:
                rec["error"] = f"{bm.spec}: {exc}"
                failure = ModelCheckError(rec["error"])
                failure.report = report
                raise failure from None
            finally:
                if device.type == "cuda":  # the form's memory back before the next one is measured
                    torch.cuda.empty_cache()
            _ratios(report)
            _compare(report)
            report["loadavg_after"] = os.getloadavg()
            report["complete"] = i + 1 == len(loaded) and form is forms.forms[-1]
            on_form(report)
        del forms, references
    return report
