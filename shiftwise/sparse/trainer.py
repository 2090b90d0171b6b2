"""The sparse-training loop: a shift-wise model trained with tile masks, checkpoints and resume.

:func:`train` starts from a checkpoint file (``pretrained``: an official SLaK / RepLKNet /
UniRepLKNet file, a converted one, an earlier run's ``checkpoint.pt`` or ``compact.pt``, or
``"demo"``; its architecture, weights and preprocessing come from the file) or builds a
registered architecture from scratch (default ``slak_demo``), swaps its large kernels for
``ShiftWiseConv2d`` exactly and trains it with AdamW (linear warmup, cosine decay) while a
:class:`~shiftwise.sparse.TileMasker` keeps and updates one mask bit per tile. SW networks
(``sw_tiny``, an official SW file, ...) train in their training form instead, with one mask bit
per plane (shared by the paths, or one per path: ``mask_paths``); their ``compact.pt`` is the
conversion of the trained model, which drops the tiles that only pruned planes fed. Data: the
embedded UCI digits or an ImageFolder root with ``train/`` and ``val/`` (or ``test/``). Under
``torchrun`` it trains with DistributedDataParallel (gloo on CPU, NCCL on GPU); the global
batch is split over the ranks and masks are synchronised at topology updates only.

Files in the output folder: ``checkpoint.pt`` (model, EMA, optimizer, scaler, masks, schedule
position, RNG states of every rank; written atomically, readable with
``torch.load(weights_only=True)``), ``metrics.jsonl`` (one JSON object a line: ``train``,
``update``, ``eval``, ``done``) and ``compact.pt`` (the model with its pruned tiles removed).
Both checkpoint files carry the metadata of :func:`shiftwise.convert.io.describe`, so every
command and ``shiftwise.load_model`` reads them.

Example::

    >>> from shiftwise.sparse.trainer import TrainConfig, train
    >>> summary = train(TrainConfig(output="runs/sparse", density=0.3, steps=300))
    >>> summary["test_acc"], summary["density"], summary["outputs"]["compact"]
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _runtime, outputs, progress
from ..convert import convert_model, safe_load
from ..convert.io import (Checkpoint, build_model as build_from_checkpoint, checkpoint_from, describe,
                          preprocessing_for, read_checkpoint, tile_counts)
from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError, OutputExistsError, ShiftwiseError
from ..evaluate import resolve_device
from ..models import create_model, replace_head
from ..modules import ShiftWiseConv2d, has_plane_layers, set_backend
from .allocation import INITS
from .compact import compact, plane_tile_counts, plane_tiles
from .masking import GROWTHS, MASK_PATHS, POSITIONS, SparseConfig, TileMasker, find_layers, snip_scores
from .schedules import SCHEDULES, check_density
from .train_data import Batches, accuracy, load_data, mix_batch

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
COMPACT = "compact.pt"
FORMAT = "shiftwise-train/1"
COMPACT_FORMAT = "shiftwise-compact/1"
# Settings a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = frozenset({"output", "resume", "force", "stop_after", "workers"})
DEFAULT_MODEL = "slak_demo"
# metadata of the run's files that says where the model came from
LINEAGE = ("source_sha256", "source_name", "origin_sha256", "origin_name", "input_size", "preprocessing", "ema")
# Named sets of settings (``recipe_config``, ``shiftwise train --recipe``).
RECIPES = {
    # The released SW recipe (lidc54/shift-wiseConv: --sparse --sparsity 0.3 --sparse_init snip --prune_rate 0.3
    # --growth random --sparse_type rep_coarse -u 100 --sparse_gap 131 --only_L): 70 % of the planes, SNIP
    # layer densities with random positions, masks on the SW layers only, per-path masks aligned every 131 updates.
    "sw-official": {"density": 0.7, "schedule": "constant", "init": "snip", "positions": "random",
                    "update_every": 100, "prune_rate": 0.3, "prune_rate_floor": 0.005, "growth": "random",
                    "mask_paths": "each", "align_every": 131, "dense_layers": False, "redistribute": False},
}


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (plain values, saved in the checkpoint as a dict).

    Model and data:
        pretrained: checkpoint file to start from (any file ``load_model`` reads, or ``"demo"``);
            its architecture, weights, evaluation size and normalisation are used.
        pretrained_ema: take the EMA weights of ``pretrained``.
        model: registered architecture built from scratch (default ``"slak_demo"``; not with
            ``pretrained``).
        model_kwargs: config overrides passed to ``create_model`` (default none).
        num_classes: replace the classifier head by a new one with this many outputs (default:
            the data set's class count from scratch; the pretrained head, which must fit the data).
        tile_size: tile side ``N`` (default: the model's small kernel).
        backend: ``ShiftWiseConv2d`` backend, ``"auto"``, ``"taichi"`` or ``"torch"`` (default: auto).
        data: ``"digits"`` (embedded) or an ImageFolder root with ``train/`` and ``val/`` (or ``test/``).
        image_size: input side (default: the pretrained file's, else 32 for the digits, 224 for images).
        shift: random translation of the digits in pixels, 0 for none (default 2).
        augment: random resized crop and flip of ImageFolder training images (default True).
        mixup, cutmix: alphas of MixUp and CutMix (0: off; both on: one of them per batch).
        skip_bad_images: skip (and count) unreadable images instead of stopping.
        workers: DataLoader processes for an ImageFolder (default 0).

    Sparsity (see :class:`~shiftwise.sparse.SparseConfig`):
        density: fraction of tiles kept at the end, in ``(0, 1]`` (default 0.3; 1 trains dense).
        schedule: ``"constant"``, ``"gradual"`` or ``"linear"`` (default ``"gradual"``).
        schedule_start, schedule_end: steps of the move from dense to ``density``
            (default 0 and half of training).
        init, positions, update_every, update_until, prune_rate, prune_rate_floor, growth,
        redistribute, dense_layers, mask_paths, align_every: as in ``SparseConfig``
        (``update_every`` default 30). ``RECIPES`` holds named sets of them (:func:`recipe_config`).

    Optimisation:
        epochs (default 15) or steps (when given, instead of epochs); batch_size (global, split
        over the processes, default 64); lr (2e-3), min_lr (1e-5), warmup (steps; default a
        twentieth of training), weight_decay (0.05), label_smoothing (0), clip_grad (none),
        ema_decay (keep an EMA of the weights with this decay; default none), amp (autocast:
        bfloat16 on CPU, float16 with a GradScaler on CUDA), seed (0), device (default: CUDA when
        available).

    Run control:
        output: the run folder (default ``"runs/train"``).
        resume: continue from a checkpoint: ``True`` for the output folder's, or a path; the
            checkpoint's settings replace the others (all but the ones in ``RESUMABLE``).
        force: start over in an output folder that holds a run.
        stop_after: save a checkpoint and stop at this step.
        eval_every (default: an epoch), save_every (default: each evaluation), log_every (10):
            steps between test evaluations, checkpoints and metrics lines.
    """

    pretrained: Optional[str] = None
    pretrained_ema: bool = False
    model: Optional[str] = None
    model_kwargs: Optional[dict] = None
    num_classes: Optional[int] = None
    tile_size: Optional[int] = None
    backend: Optional[str] = None
    data: str = "digits"
    image_size: Optional[int] = None
    shift: int = 2
    augment: bool = True
    mixup: float = 0.0
    cutmix: float = 0.0
    skip_bad_images: bool = False
    workers: int = 0
    density: float = 0.3
    schedule: str = "gradual"
    schedule_start: Optional[int] = None
    schedule_end: Optional[int] = None
    init: str = "erk"
    positions: str = "auto"
    update_every: int = 30
    update_until: Optional[int] = None
    prune_rate: float = 0.3
    prune_rate_floor: float = 0.005
    growth: str = "gradient"
    redistribute: bool = False
    dense_layers: bool = False
    mask_paths: str = "shared"
    align_every: int = 1
    epochs: int = 15
    steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup: Optional[int] = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    clip_grad: Optional[float] = None
    ema_decay: Optional[float] = None
    amp: bool = False
    seed: int = 0
    device: Optional[str] = None
    output: str = "runs/train"
    resume: Union[bool, str, None] = None
    force: bool = False
    stop_after: Optional[int] = None
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    log_every: int = 10

    def __post_init__(self):
        check_density(self.density, "--density")
        for name, value, options in (("--schedule", self.schedule, SCHEDULES), ("--init", self.init, INITS),
                                     ("--positions", self.positions, POSITIONS), ("--growth", self.growth, GROWTHS),
                                     ("--mask-paths", self.mask_paths, MASK_PATHS)):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
        if self.steps is None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"--epochs must be a positive int, got {self.epochs!r}")
        if self.pretrained_ema and self.pretrained is None:
            raise ValueError("--pretrained-ema needs --pretrained CKPT (the checkpoint whose EMA weights to start from)")
        if self.pretrained is not None and (self.model is not None or self.model_kwargs is not None):
            raise ValueError("--pretrained takes the architecture from the file; leave out --model and --model-kwargs")
        for name in ("mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name} must be an alpha >= 0 (0: off), got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "image_size", "update_every", "log_every", "eval_every", "save_every",
                     "num_classes", "align_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r}")
        if self.redistribute and self.mask_paths == "each":
            raise ValueError("--redistribute ranks one mask per layer; use it with --mask-paths shared")


def recipe_config(name: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` with the settings of recipe ``name`` (see ``RECIPES``), then ``overrides``.

    Example::

        >>> cfg = recipe_config("sw-official", model="sw_tiny", epochs=300)
        >>> cfg.density, cfg.mask_paths, cfg.align_every
        (0.7, 'each', 131)
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides})


# model -----------------------------------------------------------------------------------------------
def build_model(name: str, num_classes: int, tile_size: Optional[int] = None, backend: Optional[str] = None,
                kwargs: Optional[dict] = None) -> nn.Module:
    """A registered architecture with its large kernels as ``ShiftWiseConv2d`` (training mode); an
    SW network stays in its training form."""
    model = create_model(name, num_classes=num_classes, **(kwargs or {}))
    if has_plane_layers(model):
        return set_backend(model, backend).train()
    if not any(isinstance(m, ShiftWiseConv2d) for m in model.modules()):
        model = convert_model(model.eval(), tile_size, backend=backend, inplace=True)
    return model.train()


def pretrained_model(ckpt: Checkpoint, tile_size: Optional[int] = None, backend: Optional[str] = None,
                     num_classes: Optional[int] = None) -> nn.Module:
    """The model of a checkpoint in shift-wise form (training mode): an official file is converted
    exactly; a shift-wise file keeps its tile plans; an SW network (an official SW file, or a
    ``checkpoint.pt`` of one) stays in its training form. ``num_classes`` gives it a new head."""
    model = build_from_checkpoint(ckpt)
    if has_plane_layers(model):
        pass  # trained as it is; tile_size applies to its compact.pt
    elif not ckpt.converted:
        model = convert_model(model, tile_size, backend=backend, inplace=True)
    elif tile_size is not None and tile_size != ckpt.tile_size:
        raise ValueError(f"{ckpt.path} has shift-wise layers of tile {ckpt.tile_size}; leave out --tile-size "
                         f"{tile_size} or start from the original checkpoint")
    set_backend(model, backend)
    if num_classes is not None:
        replace_head(model, num_classes)
    return model.train()


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: no decay on 1-D parameters (biases, norms, layer scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of a model's floating state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(v, 1.0 - self.decay)
            else:
                e.copy_(v)


def sparse_config(config: TrainConfig, total: int, density: Optional[float] = None) -> SparseConfig:
    """The :class:`SparseConfig` of a run of ``total`` steps (``density``: of the tiles the model
    holds, default ``config.density``). From a pretrained model, ``"auto"`` positions keep the
    tiles of largest magnitude."""
    end = config.schedule_end
    if end is None:
        end = max(1, total // 2) if config.schedule != "constant" else 0
    positions = "score" if config.positions == "auto" and config.pretrained is not None else config.positions
    return SparseConfig(density=config.density if density is None else density, init=config.init, positions=positions,
                        schedule=config.schedule, schedule_start=config.schedule_start or 0, schedule_end=end,
                        total_steps=total, update_every=config.update_every, update_until=config.update_until,
                        prune_rate=config.prune_rate, prune_rate_floor=config.prune_rate_floor,
                        growth=config.growth, redistribute=config.redistribute, dense_layers=config.dense_layers,
                        seed=config.seed, mask_paths=config.mask_paths, align_every=config.align_every)


# checkpoints -----------------------------------------------------------------------------------------
def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path) -> None:
    """``torch.save`` to ``path`` atomically: a failed write leaves the previous file as it was."""
    with outputs.atomic(path) as tmp, open(tmp, "wb") as f:  # closed before atomic() syncs and renames
        torch.save(obj, f)


def _remove_temporaries(folder: Path) -> None:
    """Delete the temporary files of a run killed while saving."""
    for name in (CHECKPOINT, COMPACT, METRICS):
        for stale in outputs.stale_temporaries(folder / name):
            Path(stale).unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    """A training checkpoint, read without running pickled code (``shiftwise.convert.safe_load``).

    Keys: ``format``, ``step``, ``args`` (the :class:`TrainConfig` as a dict), ``model``, ``ema``,
    ``optimizer``, ``scaler``, ``sparse`` (the masker's state, masks under ``"masks"``), ``rng``
    (one entry per rank) and ``num_classes``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shiftwise train checkpoint (format {FORMAT!r})")
    return ckpt


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Drop the records an interrupted run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn by a kill in the middle of a write
            continue
        if row.get("step", 0) <= upto:
            keep.append(line)
    with outputs.atomic(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in keep))


def _digest(model: nn.Module, masker: TileMasker) -> str:
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [masker.masks[k] for k in sorted(masker.masks)]:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resumed(config: TrainConfig, saved: dict) -> TrainConfig:
    """The checkpoint's settings, except the ones in ``RESUMABLE``; warns about the others that were
    set to something else than both the saved value and the default."""
    default = TrainConfig()
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE and f.name in saved]
    changed = {k: (saved[k], getattr(config, k)) for k in names
               if getattr(config, k) not in (saved[k], getattr(default, k))}
    if changed:
        logger.warning("resuming with the checkpoint's settings; ignoring %s", changed)
    return dataclasses.replace(config, **{k: saved[k] for k in names})


# distributed -----------------------------------------------------------------------------------------
_bound: dict = {}  # LOCAL_RANK -> the CUDA_VISIBLE_DEVICES value bind_rank_gpu set for it in this process


def visible_gpu_count() -> Optional[int]:
    """GPUs this process sees, counted by NVML without starting CUDA (``CUDA_VISIBLE_DEVICES`` can
    still change afterwards): 0 for a PyTorch built without CUDA, ``None`` where NVML cannot tell."""
    if not torch.backends.cuda.is_built():
        return 0
    try:
        count = torch.cuda._device_count_nvml()  # the count torch.cuda.device_count() takes before CUDA starts
    except Exception:  # noqa: BLE001 - no NVML here: unknown
        return None
    return count if count >= 0 else None


def bind_rank_gpu(device: Optional[str] = None) -> Optional[str]:
    """Under ``torchrun`` (``LOCAL_RANK`` set, ``WORLD_SIZE`` above 1) on CUDA: leave this process
    its local rank's GPU as its only device, ``cuda:0`` (the one Taichi addresses), by setting
    ``CUDA_VISIBLE_DEVICES`` (:func:`shiftwise._runtime.rank_gpu`: a launcher's own list is
    respected) before CUDA starts. Returns the value set, or ``None`` where the run is not on
    CUDA under torchrun (``device`` cpu, no GPU, a single process).

    Raises ``ValueError`` in one line for more processes on the node than GPUs and for
    ``device="cuda:N"`` (each process takes its rank's GPU: pass ``cuda``), and
    :class:`~shiftwise.errors.ShiftwiseError` when CUDA started in this process before the call.
    """
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError:
            return None  # resolve_device reports the bad name
        if dev.type != "cuda":
            return None
        if dev.index is not None:
            raise ValueError(f"--device {device} under torchrun: each process takes the GPU of its local rank "
                             "(as its cuda:0); pass --device cuda")
    if _bound.get(local) is not None and os.environ.get("CUDA_VISIBLE_DEVICES") == _bound[local]:
        return _bound[local]  # bound by an earlier call in this process
    count = visible_gpu_count()
    if count == 0:
        return None  # no GPU: the CPU, or resolve_device's error for --device cuda
    ranks = os.environ.get("LOCAL_WORLD_SIZE")
    gpu = _runtime.rank_gpu(int(local), os.environ.get("CUDA_VISIBLE_DEVICES"), count, int(ranks) if ranks else None)
    if torch.cuda.is_initialized():
        raise ShiftwiseError(f"CUDA started in this process before local rank {local} could be given its own GPU; "
                             f"start the process with CUDA_VISIBLE_DEVICES={gpu}")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _bound[local] = gpu
    return gpu


def _check_bound(gpu: str) -> None:
    """After :func:`bind_rank_gpu`: CUDA sees that one GPU (an earlier CUDA call in the process,
    e.g. ``torch.cuda.is_available()``, fixes the devices before the variable is read)."""
    torch.cuda.init()
    # the runtime's own count: torch.cuda.device_count() may answer from NVML and the variable as
    # it reads now, not from what CUDA fixed when it started
    seen = getattr(torch._C, "_cuda_getDeviceCount", torch.cuda.device_count)()
    if seen != 1:
        raise ShiftwiseError(f"CUDA started in this process before CUDA_VISIBLE_DEVICES={gpu} was set (it sees {seen} "
                             f"GPUs); start the process with CUDA_VISIBLE_DEVICES={gpu}")


def setup_distributed(device: Optional[str] = None) -> tuple:
    """``(rank, world_size, device)``; starts the process group when launched by ``torchrun``.

    The backend is NCCL when CUDA is available and ``device`` is not ``"cpu"``, else gloo. On CUDA
    each rank first gets its local rank's GPU as its only device (:func:`bind_rank_gpu`) and runs
    on ``cuda:0``. Without ``device``: CUDA when available, else CPU; an unknown device, or CUDA
    where there is none, raises ``ValueError``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        gpu = bind_rank_gpu(device)  # before anything starts CUDA in this process
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda and gpu is not None:
            _check_bound(gpu)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device:
        dev = resolve_device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return rank, world, dev


_held: list = []  # tensors of the last collectives of a run (see _gather)


def _wait_released(tensors: list, timeout: float = 10.0) -> None:
    """Wait, without the GIL, until gloo's worker threads hold none of ``tensors`` (a tensor a C++
    object holds has one more reference to its Python object), so that the process group's
    destructor, which joins those threads while holding the GIL, never waits on a thread that
    needs the GIL to drop one."""
    deadline = time.monotonic() + timeout
    while any(sys.getrefcount(t) > 3 for t in tensors):  # the list, the loop variable, the call
        if time.monotonic() > deadline:
            logger.warning("gloo still holds tensors of the last collectives after %.0f s", timeout)
            return
        time.sleep(0.001)


def _gather(obj, world: int, hold: bool = False) -> list:
    """Every rank's ``obj`` (tensors, numbers, strings and containers of them), in rank order.

    With ``hold``, the tensors the collectives used are kept in :data:`_held` (until the next
    run), for :func:`_wait_released` before the process group ends: gloo's worker thread drops its
    references to them after the collectives return, which needs the GIL; if the main thread
    holds the GIL in the process group's destructor meanwhile (joining that thread), the run
    deadlocks at its end (seen in a few of a dozen two-process runs).
    """
    if world == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(n) for n in sizes)
    sent = torch.zeros(longest, dtype=torch.uint8)
    sent[:data.numel()] = data
    received = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(received, sent)
    if hold:
        _held.extend([size, *sizes, sent, *received])
    return [torch.load(io.BytesIO(r[:int(n)].numpy().tobytes()), weights_only=True) for r, n in zip(received, sizes)]


# the loop --------------------------------------------------------------------------------------------
def train(config: TrainConfig, interrupt=None, show_progress: bool = True) -> Optional[dict]:
    """Train as ``config`` says; returns the summary on rank 0 (``None`` on the other ranks).

    The summary is the ``done`` record of ``metrics.jsonl`` (step, test_acc, ema_test_acc,
    density, target_density, seconds, world_size, ranks_identical, per-layer masks) plus
    ``outputs``: the files this call wrote (``checkpoint``, ``compact``, ``metrics``), by name. A
    run stopped by ``stop_after`` returns ``{"stopped_at": step, "outputs": ...}`` without
    ``compact``.

    ``interrupt`` is any object with a ``requested`` attribute: once it is true, the run saves a
    checkpoint at the end of the step and raises ``KeyboardInterrupt``. A progress bar goes to
    stderr on a terminal (rank 0, when ``show_progress``).
    """
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ShiftwiseError(f"output {out} is a file; give a folder for the run")
    resume_path = ckpt = None
    if config.resume:
        resume_path = out / CHECKPOINT if config.resume is True else Path(config.resume)
        ckpt = load_checkpoint(resume_path)
        config = _resumed(config, ckpt["args"])
    elif (out / CHECKPOINT).exists() and not config.force:
        raise OutputExistsError(f"{out / CHECKPOINT} exists: pass --resume to continue that run or --force to "
                                "start over")
    started_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world, device = setup_distributed(config.device)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    source = resumed = None
    if resume_path is not None:  # the run's own file describes the model (architecture, head, tile plans)
        resumed = checkpoint_from(ckpt, str(resume_path))
        preprocessing = resumed.preprocessing
    elif config.pretrained is not None:
        source = read_checkpoint(config.pretrained, ema=config.pretrained_ema)
        preprocessing = source.preprocessing or preprocessing_for(source.config)
    else:
        preprocessing = preprocessing_for({"name": config.model or DEFAULT_MODEL, "kwargs": config.model_kwargs})
    if config.image_size is None:
        size = (source.input_size if source is not None else None) or (32 if config.data == "digits" else 224)
        config = dataclasses.replace(config, image_size=size)
    preprocessing = preprocessing or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    train_set, test_set, num_classes = load_data(config.data, config.image_size, preprocessing["mean"],
                                                 preprocessing["std"], config.augment, config.skip_bad_images)
    if config.num_classes is not None and config.num_classes != num_classes:
        raise ShiftwiseError(f"--num-classes {config.num_classes} but {config.data} has {num_classes} classes; "
                             f"give --num-classes {num_classes} or leave it out")
    if resumed is not None:
        model = pretrained_model(resumed, backend=config.backend)
    elif source is not None:
        model = pretrained_model(source, config.tile_size, config.backend, config.num_classes)
        if model.config.num_classes != num_classes:
            raise ShiftwiseError(f"{config.pretrained} predicts {model.config.num_classes} classes and {config.data} "
                                 f"has {num_classes}; pass --num-classes {num_classes} to train a new head")
    else:
        model = build_model(config.model or DEFAULT_MODEL, num_classes, config.tile_size, config.backend,
                            config.model_kwargs)
    model = model.to(device)
    # what the run's files record of where the model came from (kept from the first start on resume)
    lineage = {k: v for k, v in describe(model, "train", source, config.image_size, preprocessing,
                                         ema=config.pretrained_ema).items()
               if k in LINEAGE} if resumed is None else {k: resumed.meta.get(k) for k in LINEAGE}
    planes = has_plane_layers(model)
    if planes:  # the training form holds every plane: --density counts planes, the files converted tiles
        sw = [l for l in find_layers(model) if l.kind == "planes"]
        small = sorted({l.param.shape[-1] for l in sw})
        if config.tile_size is not None and [config.tile_size] != small:
            raise ShiftwiseError(f"--tile-size {config.tile_size}: an SW network converts to tiles of its small kernel "
                                 f"({', '.join(map(str, small))}); leave out --tile-size")
        layer_tiles = {l.name: plane_tiles(l.module) for l in sw}
        dense_tiles, held = sum(layer_tiles.values()), 1.0
    else:  # --density counts against the full conversion of the origin, also when the file holds fewer tiles
        layers = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, ShiftWiseConv2d)}
        known = (resumed or source).tiles if (resumed or source) is not None else None
        dense_tiles = known["dense"] if known else sum(layers.values())
        layer_tiles = known.get("layers") if known and isinstance(known.get("layers"), dict) else None
        if layer_tiles is None or sorted(layer_tiles) != sorted(layers):
            layer_tiles = layers
        held = sum(layers.values()) / dense_tiles if dense_tiles else 1.0
    if config.density > held + 1e-9:
        raise ShiftwiseError(f"{config.pretrained} keeps {round(held * dense_tiles)} of the {dense_tiles} tiles of its full "
                             f"conversion ({held:.4f}); --density {config.density} must be at most that")
    torch.manual_seed(config.seed + rank)  # per-rank randomness (drop path) from here on
    shift = config.shift if config.augment and config.data == "digits" else 0
    batches = Batches(train_set, config.batch_size, config.seed, rank, world, shift, config.workers)
    total = config.steps or config.epochs * batches.per_epoch
    warmup = config.warmup if config.warmup is not None else max(1, total // 20)
    masker = TileMasker(model, sparse_config(config, total, min(1.0, config.density / held)))

    def density() -> float:  # of the full conversion (of the planes, for SW layers)
        return masker.density() * held

    def kept_tiles() -> int:  # alive tiles of the (full) conversion
        if planes:
            return sum(kept for kept, _ in plane_tile_counts(masker).values())
        return masker.kept_tiles()
    amp = (torch.bfloat16 if device.type == "cpu" else torch.float16) if config.amp else None
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if resume_path is not None:  # the model already holds the checkpoint's weights
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        masker.load_state_dict(ckpt["sparse"])
        step = int(ckpt["step"])
        rngs = ckpt["rng"]
        _set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        scores = None
        if config.init == "snip":
            x, y = batches(0)
            scores = snip_scores(model, lambda: F.cross_entropy(model(x.to(device)), y.to(device)),
                                 config.dense_layers)
        masker.init_masks(scores)
    ema = None
    if config.ema_decay:
        ema = EMA(model, config.ema_decay)
        if resume_path is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    files = {"metrics": str(out / METRICS)}  # what this run wrote, for the caller to report
    log = None
    created = not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume_path is None:  # --force: the old run's files go, so that nothing stale is resumed later
            for name in (CHECKPOINT, COMPACT):
                (out / name).unlink(missing_ok=True)
        _remove_temporaries(out)
        if resume_path is not None:
            _rewrite_metrics(out / METRICS, step)
        elif (out / METRICS).exists():
            (out / METRICS).unlink()
        log = open(out / METRICS, "a")

    def record(**row):
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def checkpoint():  # every rank: each contributes its RNG state
        rngs = _gather(_rng_state(), world)
        if rank == 0:
            meta = describe(model, "train", dense_tiles=dense_tiles, kept_tiles=kept_tiles(),
                            layer_tiles=layer_tiles, weights="model",
                            ema_weights="ema" if ema else None, **lineage)
            _save({"shiftwise": meta, "format": FORMAT, "step": step, "args": dataclasses.asdict(config),
                   "model": model.state_dict(),
                   "ema": ema.module.state_dict() if ema else None, "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                   "sparse": masker.state_dict(), "rng": rngs, "num_classes": num_classes}, out / CHECKPOINT)
            files["checkpoint"] = str(out / CHECKPOINT)

    eval_batch = max(config.batch_size, 256)

    def run_eval():
        if rank != 0:
            return None
        res = accuracy(model, test_set, device, eval_batch, config.workers, amp)
        row = {"event": "eval", "step": step, "test_acc": res["acc"], "test_loss": res["loss"],
               "density": density()}
        if res.get("skipped"):
            row["test_skipped"] = res["skipped"]
        if ema is not None:
            row["ema_test_acc"] = accuracy(ema.module, test_set, device, eval_batch, config.workers, amp)["acc"]
        record(**row)
        return row

    bar = progress.bar(total=total, desc="train", unit="step", enabled=rank == 0 and show_progress, initial=step)
    eval_every = config.eval_every or batches.per_epoch
    save_every = config.save_every or eval_every
    started, last_eval = time.monotonic(), None
    net.train()
    try:
        while step < total:
            if interrupt is not None and interrupt.requested:
                checkpoint()
                raise KeyboardInterrupt(f"at step {step}/{total}; saved {out / CHECKPOINT}, continue with --resume")
            if config.stop_after is not None and step >= config.stop_after:
                checkpoint()
                if log is not None:
                    log.close()
                _leave(world, started_group)
                return {"stopped_at": step, "outputs": files} if rank == 0 else None
            lr = lr_at(step, config.lr, warmup, total, config.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = batches(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y
            if config.mixup or config.cutmix:
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * world + rank)
                x, target = mix_batch(x, y, num_classes, config.mixup, config.cutmix, config.label_smoothing, gen)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(x)
                loss = F.cross_entropy(logits, target, label_smoothing=0.0 if target is not y
                                       else config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            update = masker.step(optimizer)
            step += 1
            if ema is not None:
                ema.update(model)
                masker.apply(ema.module)
            last_loss = float(loss.detach())
            if update is not None:
                record(event="update", **update)
            if step % config.log_every == 0 or step == total:
                record(event="train", step=step, epoch=step / batches.per_epoch, loss=last_loss, lr=lr,
                       density=density(), seconds=time.monotonic() - started)
            if step % eval_every == 0 or step == total:
                last_eval = run_eval() or last_eval
            if step % save_every == 0 or step == total:
                checkpoint()
            acc = f" test {last_eval['test_acc']:.2f}" if last_eval else ""
            bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} density {density():.4f}{acc}",
                                refresh=False)
            bar.update(1)
    except BaseException:
        if log is not None:
            log.close()
            if "checkpoint" not in files and resume_path is None:  # nothing worth keeping: leave no run behind
                _discard_run(out, created)
        raise
    finally:
        bar.close()

    if world > 1:  # BatchNorm statistics of the last forward are each rank's own; DDP would send rank 0's next
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=0)
    _held.clear()  # the previous run's process group is gone
    digests = _gather(_digest(model, masker), world, hold=True)
    skipped = sorted(set().union(*_gather(list(batches.skipped), world, hold=True)))
    summary = None
    if rank == 0:
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval()
        small = compact(model, masker, tile_size=config.tile_size, backend=config.backend).cpu()
        files["compact"] = str(out / COMPACT)
        kept = tile_counts(small.state_dict())[0] if planes else masker.kept_tiles()
        meta = describe(small, "compact", dense_tiles=dense_tiles, kept_tiles=kept, layer_tiles=layer_tiles,
                        ema_weights="ema" if ema else None, **lineage)
        _save({"shiftwise": meta, "format": COMPACT_FORMAT, "state_dict": small.state_dict(),
               "ema": compact(ema.module, masker, tile_size=config.tile_size,
                              backend=config.backend).cpu().state_dict() if ema else None,
               "args": dataclasses.asdict(config), "num_classes": num_classes,
               "dense_tiles": layer_tiles}, files["compact"])
        summary = {"event": "done", "step": step, "test_acc": last_eval["test_acc"],
                   "ema_test_acc": last_eval.get("ema_test_acc"), "density": density(),
                   "target_density": config.density, "seconds": time.monotonic() - started, "world_size": world,
                   "ranks_identical": len(set(digests)) == 1, "tiles": {"kept": kept_tiles(), "dense": dense_tiles},
                   "skipped_images": len(skipped), "first_skipped": skipped[0] if skipped else None,
                   "test_skipped": last_eval.get("test_skipped", 0),
                   "layers": [{k: r[k] for k in ("name", "unit", "kept", "units", "density", "histogram") if k in r}
                              for r in masker.layer_stats()]}
        record(**summary)
        log.close()
        summary = {**summary, "outputs": files}
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights or masks: {digests}")
    _leave(world, started_group)
    return summary


def _discard_run(out: Path, created: bool) -> None:
    """Remove what a run that failed before its first checkpoint wrote (its metrics, and the folder
    when the run created it and nothing else is in it)."""
    (out / METRICS).unlink(missing_ok=True)
    _remove_temporaries(out)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass  # something else was put there meanwhile: keep it


def _leave(world: int, started_group: bool) -> None:
    """Wait for every rank (rank 0 may still be evaluating and saving; gloo aborts a rank whose
    peers have gone), then end the process group if :func:`train` started it."""
    if world > 1:
        dist.barrier()
        _wait_released(_held)
        if started_group:
            dist.destroy_process_group()
