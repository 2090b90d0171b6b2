"""The sparse-training loop: a shift-wise model trained with tile masks, checkpoints and resume.

:func:`train` builds a registered architecture (default ``slak_demo``), swaps its large kernels
for ``ShiftWiseConv2d`` and trains it with AdamW (linear warmup, cosine decay) while a
:class:`~shiftwise.sparse.TileMasker` keeps and updates one mask bit per tile. Data: the
embedded UCI digits or an ImageFolder root with ``train/`` and ``val/`` (or ``test/``). Under
``torchrun`` it trains with DistributedDataParallel (gloo on CPU, NCCL on GPU); the global
batch is split over the ranks and masks are synchronised at topology updates only.

Files in the output folder: ``checkpoint.pt`` (model, EMA, optimizer, scaler, masks, schedule
position, RNG states of every rank; written atomically, readable with
``torch.load(weights_only=True)``), ``metrics.jsonl`` (one JSON object a line: ``train``,
``update``, ``eval``, ``done``) and ``compact.pt`` (the model with its pruned tiles removed).

Example::

    >>> from shiftwise.sparse.trainer import TrainConfig, train
    >>> summary = train(TrainConfig(output="runs/sparse", density=0.3, steps=300))
    >>> summary["test_acc"], summary["density"], summary["outputs"]["compact"]
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data, outputs, progress
from ..convert import convert_model, safe_load
from ..errors import CheckpointError, OutputExistsError, ShiftwiseError
from ..evaluate import resolve_device
from ..models import create_model
from ..modules import ShiftWiseConv2d
from .allocation import INITS
from .compact import compact
from .masking import GROWTHS, POSITIONS, SparseConfig, TileMasker, snip_scores
from .schedules import SCHEDULES, check_density

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
COMPACT = "compact.pt"
FORMAT = "shiftwise-train/1"
COMPACT_FORMAT = "shiftwise-compact/1"
# Settings a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = frozenset({"output", "resume", "force", "stop_after", "workers"})


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (plain values, saved in the checkpoint as a dict).

    Model and data:
        model: registered architecture (default ``"slak_demo"``).
        model_kwargs: config overrides passed to ``create_model`` (default none).
        tile_size: tile side ``N`` (default: the model's small kernel).
        backend: ``ShiftWiseConv2d`` backend, ``"auto"``, ``"taichi"`` or ``"torch"`` (default: auto).
        data: ``"digits"`` (embedded) or an ImageFolder root with ``train/`` and ``val/`` (or ``test/``).
        image_size: input side (default 32).
        shift: random translation in pixels, 0 for none (default 2).
        workers: DataLoader processes for an ImageFolder (default 0).

    Sparsity (see :class:`~shiftwise.sparse.SparseConfig`):
        density: fraction of tiles kept at the end, in ``(0, 1]`` (default 0.3; 1 trains dense).
        schedule: ``"constant"``, ``"gradual"`` or ``"linear"`` (default ``"gradual"``).
        schedule_start, schedule_end: steps of the move from dense to ``density``
            (default 0 and half of training).
        init, positions, update_every, update_until, prune_rate, prune_rate_floor, growth,
        redistribute, dense_layers: as in ``SparseConfig`` (``update_every`` default 30).

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

    model: str = "slak_demo"
    model_kwargs: Optional[dict] = None
    tile_size: Optional[int] = None
    backend: Optional[str] = None
    data: str = "digits"
    image_size: int = 32
    shift: int = 2
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
                                     ("--positions", self.positions, POSITIONS), ("--growth", self.growth, GROWTHS)):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
        if self.steps is None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"--epochs must be a positive int, got {self.epochs!r}")
        for name in ("steps", "batch_size", "image_size", "update_every", "log_every", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.model_kwargs is not None and not isinstance(self.model_kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r}")


# data ------------------------------------------------------------------------------------------------
def load_data(source: str, image_size: int) -> tuple:
    """``(train, test, num_classes)``; digits come as in-memory ``(images, labels)`` tensors."""
    if source == "digits":
        return _digits("train", image_size), _digits("test", image_size), 10
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {source!r} is neither 'digits' nor a directory")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"ImageFolder root {root} needs train/ and val/ (or test/) subfolders")
    transform = data.EvalTransform(image_size)
    train_set, test_set = data.ImageFolder(root / "train", transform), data.ImageFolder(test_dir, transform)
    if train_set.classes != test_set.classes:
        raise ShiftwiseError(f"{root}/train and {test_dir} have different class folders")
    return train_set, test_set, len(train_set.classes)


@functools.lru_cache(maxsize=4)
def _digits(split: str, size: int) -> tuple:
    ds = data.Digits(split, data.EvalTransform(size))
    return torch.stack([ds.transform(img) for img in ds.images]), ds.targets.clone()


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
    (``workers`` processes) that starts at the step asked for.

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
        self._epoch, self._perm = -1, None
        self._loader, self._next = None, None

    def indices(self, step: int) -> Tensor:
        """This rank's dataset indices at ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(_size(self.dataset), generator=gen)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]

    def __call__(self, step: int) -> tuple:
        if isinstance(self.dataset, tuple):
            idx = self.indices(step)
            x, y = self.dataset[0][idx], self.dataset[1][idx]
        else:
            if self._next != step:  # start (or restart) this epoch's loader at `step`
                last = (step // self.per_epoch + 1) * self.per_epoch
                sampler = [self.indices(s).tolist() for s in range(step, last)]
                self._loader = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler,
                                                                num_workers=self.workers))
            x, y = next(self._loader)
            self._next = step + 1 if (step + 1) % self.per_epoch else None
        gen = torch.Generator().manual_seed(self.seed * 104729 + step * self.world + self.rank)
        return _shift(x, self.max_shift, gen), y


def _eval_batches(dataset, batch_size: int, workers: int):
    if isinstance(dataset, tuple):
        return zip(dataset[0].split(batch_size), dataset[1].split(batch_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device, batch_size: int, workers: int = 0,
             amp: Optional[torch.dtype] = None) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for x, y in _eval_batches(dataset, batch_size, workers):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was)
    n = _size(dataset)
    return {"acc": 100.0 * correct / n, "loss": loss / n}


# model -----------------------------------------------------------------------------------------------
def build_model(name: str, num_classes: int, tile_size: Optional[int] = None, backend: Optional[str] = None,
                kwargs: Optional[dict] = None) -> nn.Module:
    """A registered architecture with its large kernels as ``ShiftWiseConv2d`` (training mode)."""
    model = create_model(name, num_classes=num_classes, **(kwargs or {}))
    if not any(isinstance(m, ShiftWiseConv2d) for m in model.modules()):
        model = convert_model(model.eval(), tile_size, backend=backend, inplace=True)
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


def sparse_config(config: TrainConfig, total: int) -> SparseConfig:
    """The :class:`SparseConfig` of a run of ``total`` steps."""
    end = config.schedule_end
    if end is None:
        end = total // 2 if config.schedule != "constant" else 0
    return SparseConfig(density=config.density, init=config.init, positions=config.positions,
                        schedule=config.schedule, schedule_start=config.schedule_start or 0, schedule_end=end,
                        total_steps=total, update_every=config.update_every, update_until=config.update_until,
                        prune_rate=config.prune_rate, prune_rate_floor=config.prune_rate_floor,
                        growth=config.growth, redistribute=config.redistribute, dense_layers=config.dense_layers,
                        seed=config.seed)


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
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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
def setup_distributed(device: Optional[str] = None) -> tuple:
    """``(rank, world_size, device)``; starts the process group when launched by ``torchrun``.

    The backend is NCCL when CUDA is available and ``device`` is not ``"cpu"``, else gloo; each
    rank takes the GPU of its ``LOCAL_RANK``. Without ``device``: CUDA when available, else CPU;
    an unknown device, or CUDA where there is none, raises ``ValueError``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device:
        dev = resolve_device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


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
    train_set, test_set, num_classes = load_data(config.data, config.image_size)
    model = build_model(config.model, num_classes, config.tile_size, config.backend, config.model_kwargs).to(device)
    torch.manual_seed(config.seed + rank)  # per-rank randomness (drop path) from here on
    batches = Batches(train_set, config.batch_size, config.seed, rank, world, config.shift, config.workers)
    total = config.steps or config.epochs * batches.per_epoch
    warmup = config.warmup if config.warmup is not None else max(1, total // 20)
    masker = TileMasker(model, sparse_config(config, total))
    amp = (torch.bfloat16 if device.type == "cpu" else torch.float16) if config.amp else None
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step = 0
    if resume_path is not None:
        model.load_state_dict(ckpt["model"])
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
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
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
            _save({"format": FORMAT, "step": step, "args": dataclasses.asdict(config), "model": model.state_dict(),
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
               "density": masker.density()}
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
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(net(x), y, label_smoothing=config.label_smoothing)
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
                       density=masker.density(), seconds=time.monotonic() - started)
            if step % eval_every == 0 or step == total:
                last_eval = run_eval() or last_eval
            if step % save_every == 0 or step == total:
                checkpoint()
            acc = f" test {last_eval['test_acc']:.2f}" if last_eval else ""
            bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} density {masker.density():.4f}{acc}",
                                refresh=False)
            bar.update(1)
    except BaseException:
        if log is not None:
            log.close()
        raise
    finally:
        bar.close()

    digests = _gather(_digest(model, masker), world)
    summary = None
    if rank == 0:
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval()
        small = compact(model, masker).cpu()
        files["compact"] = str(out / COMPACT)
        _save({"format": COMPACT_FORMAT, "model": small.state_dict(), "args": dataclasses.asdict(config),
               "num_classes": num_classes, "dense_tiles": {l.name: l.num_units for l in masker.layers}},
              files["compact"])
        summary = {"event": "done", "step": step, "test_acc": last_eval["test_acc"],
                   "ema_test_acc": last_eval.get("ema_test_acc"), "density": masker.density(),
                   "target_density": config.density, "seconds": time.monotonic() - started, "world_size": world,
                   "ranks_identical": len(set(digests)) == 1,
                   "layers": [{k: r[k] for k in ("name", "kept", "units", "density", "histogram") if k in r}
                              for r in masker.layer_stats()]}
        record(**summary)
        log.close()
        summary = {**summary, "outputs": files}
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights or masks: {digests}")
    _leave(world, started_group)
    return summary


def _leave(world: int, started_group: bool) -> None:
    """Wait for every rank (rank 0 may still be evaluating and saving; gloo aborts a rank whose
    peers have gone), then end the process group if :func:`train` started it."""
    if world > 1:
        dist.barrier()
        if started_group:
            dist.destroy_process_group()
