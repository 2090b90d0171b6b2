"""``shiftwise train``: sparse training of a shift-wise model, with tile masks.

Builds a registered architecture (default ``slak_demo``), swaps its large kernels for
``ShiftWiseConv2d`` (``shiftwise.convert.swap.convert_model``) and trains it with AdamW (linear warmup,
cosine decay) while a :class:`~shiftwise.sparse.TileMasker` keeps and updates one mask bit per
tile. Data: the embedded UCI digits (default) or an ImageFolder root with ``train/`` and
``val/`` (or ``test/``). Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU,
NCCL on GPU); the global batch is split over the ranks and masks are synchronised at topology
updates only.

Outputs in ``--out``: ``checkpoint.pt`` (model, EMA, optimizer, scaler, masks, schedule
position, RNG states; written atomically, read back with ``torch.load(weights_only=True)``),
``metrics.jsonl`` (one JSON object a line: ``train``, ``update``, ``eval``, ``done``) and
``compact.pt`` (the model with its pruned tiles removed).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError, OutputExistsError, ShiftwiseError
from .modules import ShiftWiseConv2d
from .sparse import GROWTHS, INITS, SCHEDULES, SparseConfig, TileMasker, check_density, compact, snip_scores

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
COMPACT = "compact.pt"
FORMAT = "shiftwise-train/1"
# Arguments a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = ("out", "resume", "force", "stop_after", "quiet", "verbose", "workers")


# data ------------------------------------------------------------------------------------------------
def load_data(args) -> tuple:
    """``(train, test, num_classes)``; digits come as in-memory ``(images, labels)`` tensors."""
    from . import data  # noqa: PLC0415 (PIL and friends only when training)

    if args.data == "digits":
        return _digits("train", args.image_size), _digits("test", args.image_size), 10
    root = Path(args.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {args.data!r} is neither 'digits' nor a directory")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"ImageFolder root {root} needs train/ and val/ (or test/) subfolders")
    transform = data.EvalTransform(args.image_size)
    train, test = data.ImageFolder(root / "train", transform), data.ImageFolder(test_dir, transform)
    if train.classes != test.classes:
        raise ShiftwiseError(f"{root}/train and {test_dir} have different class folders")
    return train, test, len(train.classes)


@functools.lru_cache(maxsize=4)
def _digits(split: str, size: int) -> tuple:
    from . import data  # noqa: PLC0415

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
def evaluate(model: nn.Module, dataset, device, batch_size: int, workers: int, amp: Optional[torch.dtype]) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy on ``dataset``."""
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
def build_model(name: str, num_classes: int, tile_size: Optional[int], backend: Optional[str],
                kwargs: dict) -> nn.Module:
    """A registered architecture with its large kernels as ``ShiftWiseConv2d`` (training mode)."""
    from shiftwise.convert.swap import convert_model  # noqa: PLC0415

    from .models import create_model  # noqa: PLC0415

    model = create_model(name, num_classes=num_classes, **kwargs)
    if not any(isinstance(m, ShiftWiseConv2d) for m in model.modules()):
        model = convert_model(model.eval(), tile_size, backend=backend, inplace=True)
    return model.train()


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``base`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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
        import copy  # noqa: PLC0415

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


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A failed write (disk full, a second Ctrl-C) removes the temporary file and leaves ``path`` as it was.
    """
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ShiftwiseError(f"cannot write {path}: {exc.strerror or exc}; the previous {path.name} is "
                                 "unchanged") from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not every file system can)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path) -> dict:
    """A ``shiftwise train`` checkpoint, read without running pickled code (``shiftwise.convert.io.safe_load``)."""
    from shiftwise.convert.io import safe_load  # noqa: PLC0415 (refuses pickled code, bombs and corrupt files)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shiftwise train checkpoint (format {FORMAT!r})")
    return ckpt


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _digest(model: nn.Module, masker: TileMasker) -> str:
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [masker.masks[k] for k in sorted(masker.masks)]:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# the loop --------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self._last = 0.0

    def show(self, step: int, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < (0.2 if self.tty else 10.0)):
            return
        self._last = now
        width = 24
        filled = width * step // self.total
        bar = "=" * filled + ">" * (filled < width) + " " * (width - filled - 1)
        start, end = ("\r", "") if self.tty else ("", "\n")
        sys.stderr.write(f"{start}train [{bar}] {step}/{self.total} {text}{end}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _setup_distributed(device_arg: Optional[str]) -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, device


def _restore_args(args, saved: dict) -> None:
    """A resumed run takes the checkpoint's settings, except the ones in ``RESUMABLE``."""
    defaults = getattr(args, "cli_defaults", {})
    changed = {k: (saved[k], v) for k, v in _plain_args(args).items()
               if k not in RESUMABLE and k in saved and v not in (saved[k], defaults.get(k))}
    if changed:
        logger.warning("resuming with the checkpoint's settings; ignoring %s", changed)
    for k, v in saved.items():
        if k not in RESUMABLE:
            setattr(args, k, v)


def sparse_config(args, total: int) -> SparseConfig:
    """The :class:`SparseConfig` of the command-line flags for a run of ``total`` steps."""
    end = args.schedule_end
    if end is None:
        end = total // 2 if args.schedule != "constant" else 0
    return SparseConfig(density=args.density, init=args.init, positions=args.positions, schedule=args.schedule,
                        schedule_start=args.schedule_start or 0, schedule_end=end, total_steps=total,
                        update_every=args.update_every, update_until=args.update_until, prune_rate=args.prune_rate,
                        prune_rate_floor=args.prune_rate_floor, growth=args.growth, redistribute=args.redistribute,
                        dense_layers=args.dense_layers, seed=args.seed)


def train(args, interrupt: Optional[CtrlC] = None) -> dict:
    """Run ``shiftwise train`` with parsed ``args``; returns the final summary (rank 0).

    With ``interrupt`` (a :class:`CtrlC`), a Ctrl-C saves a checkpoint at the next step boundary
    and raises ``KeyboardInterrupt``.
    """
    out = Path(args.out)
    resume_path = ckpt = None
    if args.resume:
        resume_path = out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        ckpt = load_checkpoint(resume_path)
        _restore_args(args, ckpt["args"])
    elif (out / CHECKPOINT).exists() and not args.force:
        raise OutputExistsError(f"{out / CHECKPOINT} exists: pass --resume to continue that run or --force to "
                                "start over")
    _check_args(args)
    rank, world, device = _setup_distributed(args.device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_set, test_set, num_classes = load_data(args)
    model = build_model(args.model, num_classes, args.tile_size, args.backend,
                        json.loads(args.model_kwargs) if args.model_kwargs else {}).to(device)
    torch.manual_seed(args.seed + rank)  # per-rank randomness (drop path) from here on
    batches = Batches(train_set, args.batch_size, args.seed, rank, world, args.shift, args.workers)
    total = args.steps or args.epochs * batches.per_epoch
    warmup = args.warmup if args.warmup is not None else max(1, total // 20)
    masker = TileMasker(model, sparse_config(args, total))
    amp = (torch.bfloat16 if device.type == "cpu" else torch.float16) if args.amp else None
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
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
        if args.init == "snip":
            x, y = batches(0)
            scores = snip_scores(model, lambda: F.cross_entropy(model(x.to(device)), y.to(device)),
                                 args.dense_layers)
        masker.init_masks(scores)
    ema = None
    if args.ema:
        ema = EMA(model, args.ema)
        if resume_path is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(CHECKPOINT + ".tmp*"), *out.glob(COMPACT + ".tmp*")]:
            stale.unlink()  # left by a run killed while saving
        if resume_path is not None:
            _rewrite_metrics(out / METRICS, step)
        elif (out / METRICS).exists():
            (out / METRICS).unlink()
        log = open(out / METRICS, "a")

    def record(**row):
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def checkpoint():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if rank == 0:
            save_atomic({"format": FORMAT, "step": step, "args": _plain_args(args), "model": model.state_dict(),
                         "ema": ema.module.state_dict() if ema else None, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                         "sparse": masker.state_dict(), "rng": rngs, "num_classes": num_classes},
                        out / CHECKPOINT)

    eval_batch = max(args.batch_size, 256)

    def run_eval():
        if rank != 0:
            return None
        res = evaluate(model, test_set, device, eval_batch, args.workers, amp)
        row = {"event": "eval", "step": step, "test_acc": res["acc"], "test_loss": res["loss"],
               "density": masker.density()}
        if ema is not None:
            row["ema_test_acc"] = evaluate(ema.module, test_set, device, eval_batch, args.workers, amp)["acc"]
        record(**row)
        return row

    progress = _Progress(total, rank == 0 and not args.quiet)
    eval_every = args.eval_every or batches.per_epoch
    save_every = args.save_every or eval_every
    started, last_loss, last_eval = time.monotonic(), float("nan"), None
    net.train()
    while step < total:
        if interrupt is not None and interrupt.requested:
            checkpoint()
            progress.close()
            raise KeyboardInterrupt(f"at step {step}/{total}; saved {out / CHECKPOINT}, continue with --resume")
        if args.stop_after is not None and step >= args.stop_after:
            checkpoint()
            progress.close()
            return {"stopped_at": step}
        lr = lr_at(step, args.lr, warmup, total, args.min_lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = batches(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(net(x), y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
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
        if step % args.log_every == 0 or step == total:
            record(event="train", step=step, epoch=step / batches.per_epoch, loss=last_loss, lr=lr,
                   density=masker.density(), seconds=time.monotonic() - started)
        if step % eval_every == 0 or step == total:
            last_eval = run_eval() or last_eval
        if step % save_every == 0 or step == total:
            checkpoint()
        acc = f" test {last_eval['test_acc']:.2f}%" if last_eval else ""
        progress.show(step, f"loss {last_loss:.4f} lr {lr:.2e} density {masker.density():.4f}{acc}",
                      force=step == total)
    progress.close()

    digest = _digest(model, masker)
    digests = [None] * world
    if world > 1:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    summary = None
    if rank == 0:
        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval()
        small = compact(model, masker).cpu()
        save_atomic({"format": "shiftwise-compact/1", "model": small.state_dict(), "args": _plain_args(args),
                     "num_classes": num_classes, "dense_tiles": {l.name: l.num_units for l in masker.layers}},
                    out / COMPACT)
        summary = {"event": "done", "step": step, "test_acc": last_eval["test_acc"],
                   "ema_test_acc": last_eval.get("ema_test_acc"), "density": masker.density(),
                   "target_density": args.density, "seconds": time.monotonic() - started, "world_size": world,
                   "ranks_identical": len(set(digests)) == 1,
                   "layers": [{k: r[k] for k in ("name", "kept", "units", "density", "histogram") if k in r}
                              for r in masker.layer_stats()]}
        record(**summary)
        log.close()
    if world > 1 and len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different weights or masks: {digests}")
    return summary


def _check_args(args) -> None:
    check_density(args.density, "--density")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown --schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if args.steps is None and (args.epochs is None or args.epochs < 1):
        raise ValueError(f"--epochs must be a positive int, got {args.epochs!r}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive int, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.ema and not 0 < args.ema < 1:
        raise ValueError(f"--ema must be a decay in (0, 1), got {args.ema}")
    if args.model_kwargs:
        try:
            if not isinstance(json.loads(args.model_kwargs), dict):
                raise ValueError
        except ValueError:
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}") from None


class CtrlC:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``; a second one interrupts at once.

    Installed for single-process runs only: under torchrun the ranks would stop at different steps.
    """

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nshiftwise train: Ctrl-C: saving at the end of this step (press again to stop at once)\n")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _run(args) -> int:
    with CtrlC() as interrupt:
        summary = train(args, interrupt)
    if summary and "test_acc" in summary:
        hist = "; ".join(f"{r['name']}: {r['histogram']}" for r in summary["layers"] if "histogram" in r)
        sys.stdout.write(f"step {summary['step']}: test accuracy {summary['test_acc']:.2f}%, density "
                         f"{summary['density']:.4f} (target {summary['target_density']}), "
                         f"{summary['seconds']:.0f} s; channels by kept tiles: {hist}\n")
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be evaluating and saving: leave together (gloo aborts otherwise)
        dist.destroy_process_group()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="sparse-train a shift-wise model (tile masks)",
                              description=__doc__.split("\n\n")[0] + " Prints progress to stderr.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="slak_demo", help="registered architecture (default slak_demo)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON", help='config overrides, e.g. \'{"dims": [8, 16, 32, 64]}\'')
    g.add_argument("--tile-size", type=int, default=None, help="tile side N (default: the model's small kernel)")
    g.add_argument("--backend", choices=("auto", "taichi", "torch"), default=None, help="ShiftWiseConv2d backend")
    g.add_argument("--data", default="digits", help="'digits' (embedded, default) or an ImageFolder root with "
                                                    "train/ and val/")
    g.add_argument("--image-size", type=int, default=32, help="input side (default 32)")
    g.add_argument("--shift", type=int, default=2, help="random translation in pixels (default 2; 0 = none)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers for ImageFolder (default 0)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--density", type=float, default=0.3, help="fraction of tiles kept, in (0, 1] (default 0.3; "
                                                             "1 = dense)")
    g.add_argument("--schedule", default="gradual", help=f"density schedule: {', '.join(SCHEDULES)} "
                                                         "(default gradual)")
    g.add_argument("--schedule-start", type=int, default=None, help="step where gradual/linear pruning starts (0)")
    g.add_argument("--schedule-end", type=int, default=None, help="step where it reaches --density (half of training)")
    g.add_argument("--init", choices=INITS, default="erk", help="per-layer allocation (default erk)")
    g.add_argument("--positions", choices=("auto", "score", "random"), default="auto",
                   help="initial tiles: by score or random (default auto: score for snip, else random)")
    g.add_argument("--update-every", type=int, default=30, help="steps between topology updates (default 30)")
    g.add_argument("--update-until", type=int, default=None, help="no prune/regrow after this step (default: end)")
    g.add_argument("--prune-rate", type=float, default=0.3, help="initial prune fraction p0 (default 0.3)")
    g.add_argument("--prune-rate-floor", type=float, default=0.005, help="final prune fraction (default 0.005)")
    g.add_argument("--growth", choices=GROWTHS, default="gradient", help="regrowth criterion (default gradient)")
    g.add_argument("--redistribute", action="store_true", help="rank tiles across layers (learned layer density)")
    g.add_argument("--dense-layers", action="store_true", help="element masks on Linear and 1x1 convs too")
    g = p.add_argument_group("optimisation")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=int, default=15, help="epochs (default 15)")
    n.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes (default 64)")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default 2e-3)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate (default 1e-5)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of training)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="(default 0)")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip (default none)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights")
    g.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 + GradScaler on CUDA")
    g.add_argument("--seed", type=int, default=0, help="(default 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default OUT/checkpoint.pt) with its settings")
    g.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and exit at STEP (continue later with --resume)")
    g.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (default: an epoch)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: each eval)")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default 10)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, cli_defaults=vars(p.parse_args([])))
