"""Tile masks and dynamic sparse training: one mask bit per tile of every ``ShiftWiseConv2d``,
or per plane of every SW layer in its training form.

A layer is masked by the unit it can drop whole:

* ``ShiftWiseConv2d``: one bit per tile (its ``N x N`` small kernel);
* a module with ``path_weights()`` (the SW layer of :mod:`shiftwise.models.sw`, found by duck
  typing): one bit per plane (dim 0 of each path's ``(P, 1, k, k)`` kernel). With
  ``mask_paths="shared"`` (default) one bit covers the plane in every path: after the paths merge
  only their sum exists, so that is what conversion can drop. With ``mask_paths="each"`` every
  path has its own bits, pruned and regrown on its own weights, and every ``align_every``-th
  topology update chooses path 0's mask on the sum over paths and copies it to the others (the
  official ``rep_coarse`` recipe);
* with ``dense_layers``: one bit per weight of ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers.

The :class:`TileMasker` owns the masks of a model. Call :meth:`TileMasker.step` after every
optimizer step: it zeroes masked tiles and, every ``update_every`` steps, updates the topology
(prune the tiles of smallest L1 norm, regrow exactly as many, reset their optimizer state).
Gradients are left dense so that gradient-based growth can see the inactive tiles; masked
tiles are re-zeroed after each step, which keeps them exactly zero whatever the optimizer did
(a step skipped by ``GradScaler`` changes nothing to undo).

Under ``torch.distributed`` the masks are decided on rank 0 and broadcast at initialisation
and at each topology update only; between updates each rank applies the same masks to the
same (DDP-synchronised) weights.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..modules import ShiftWiseConv2d
from .allocation import INITS, allocate_counts, erk_densities, snip_densities, uniform_densities
from .schedules import SCHEDULES, DensitySchedule, check_density, cosine_prune_rate

logger = logging.getLogger(__name__)

GROWTHS = ("gradient", "random")
POSITIONS = ("auto", "score", "random")
MASK_PATHS = ("shared", "each")


@dataclasses.dataclass
class SparseConfig:
    """Settings of sparse training (all plain values, so they go into a checkpoint as a dict).

    Args:
        density: fraction of tiles kept at the end, in ``(0, 1]`` (default 0.3).
        init: per-layer allocation, ``"uniform"``, ``"erk"`` or ``"snip"`` (default ``"erk"``).
        positions: which tiles start active: ``"score"`` (SNIP score when a batch is given,
            else initial L1), ``"random"``, or ``"auto"`` (score for SNIP, random otherwise).
        schedule: ``"constant"``, ``"gradual"`` or ``"linear"`` (see :mod:`.schedules`).
        schedule_start, schedule_end: steps of the move from dense to ``density``.
        total_steps: length of training (the prune rate decays over it).
        update_every: steps between topology updates ``U`` (default 100).
        update_until: no prune/regrow exchange after this step (default: none at the last step).
        prune_rate: initial prune fraction ``p0`` of the active tiles (default 0.3).
        prune_rate_floor: final prune fraction (default 0.005, as SLaK).
        growth: ``"gradient"`` (largest gradient norm) or ``"random"``.
        redistribute: rank tiles across all layers at once, so per-layer density is learned.
        dense_layers: element masks on ``nn.Linear`` and 1x1 ``nn.Conv2d`` weights too.
        seed: seed of the masks' own random numbers (positions, random growth, tie-breaks).
        mask_paths: SW layers only: ``"shared"`` (one bit per plane for all paths) or ``"each"``
            (one bit per plane and path).
        align_every: with ``mask_paths="each"``, the topology updates at steps ``t`` with
            ``(t // update_every) % align_every == 0`` choose path 0's mask on the magnitudes
            summed over paths and copy it to every path (default 1: every update).
    """

    density: float = 0.3
    init: str = "erk"
    positions: str = "auto"
    schedule: str = "constant"
    schedule_start: int = 0
    schedule_end: int = 0
    total_steps: int = 0
    update_every: int = 100
    update_until: Optional[int] = None
    prune_rate: float = 0.3
    prune_rate_floor: float = 0.005
    growth: str = "gradient"
    redistribute: bool = False
    dense_layers: bool = False
    seed: int = 0
    mask_paths: str = "shared"
    align_every: int = 1

    def __post_init__(self):
        self.density = check_density(self.density)
        for name, value, options in (("init", self.init, INITS), ("positions", self.positions, POSITIONS),
                                     ("schedule", self.schedule, SCHEDULES), ("growth", self.growth, GROWTHS),
                                     ("mask_paths", self.mask_paths, MASK_PATHS)):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
        if not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every must be a positive number of steps, got {self.update_every!r}")
        if not isinstance(self.align_every, int) or isinstance(self.align_every, bool) or self.align_every < 1:
            raise ValueError(f"align_every must be a positive number of topology updates, got {self.align_every!r}")
        for name in ("prune_rate", "prune_rate_floor"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")
        DensitySchedule(self.schedule, self.schedule_start, self.schedule_end)  # validates the span


@dataclasses.dataclass
class _Layer:
    """One masked layer and how its mask maps onto its weights.

    ``kind``: ``"tiles"`` (a ``ShiftWiseConv2d``), ``"planes"`` (a module with ``path_weights()``)
    or ``"elements"``. A *row* is the unit the allocation counts (a tile, a plane, a weight); the
    mask is ``(copies * rows,)``, row-major by copy, with one copy unless every path of a plane
    layer is masked on its own (``per_path``: one copy per path).
    """

    name: str
    module: nn.Module
    kind: str
    per_path: bool = False

    @property
    def tiled(self) -> bool:
        return self.kind == "tiles"

    def params(self, module: Optional[nn.Module] = None) -> List[Tensor]:
        """The masked weights of ``module`` (default: this layer's module; or its EMA twin)."""
        m = self.module if module is None else module
        return list(m.path_weights()) if self.kind == "planes" else [m.weight]

    @property
    def param(self) -> nn.Parameter:
        return self.params()[0]

    @property
    def rows(self) -> int:
        w = self.param
        return w.numel() if self.kind == "elements" else w.shape[0]

    @property
    def copies(self) -> int:
        return len(self.params()) if self.per_path else 1

    @property
    def num_units(self) -> int:
        """Mask bits."""
        return self.rows * self.copies

    @property
    def unit_params(self) -> int:
        """Parameters one mask bit covers (a shared plane bit covers the plane in every path)."""
        if self.kind == "elements":
            return 1
        n = self.param[0].numel()
        return n * len(self.params()) if self.kind == "planes" and not self.per_path else n

    @property
    def row_params(self) -> int:
        """Parameters of one row over all copies."""
        return self.unit_params * self.copies

    def view_shape(self) -> tuple:
        """Shape under which a ``(rows,)`` mask broadcasts over one weight."""
        w = self.param
        return tuple(w.shape) if self.kind == "elements" else (w.shape[0],) + (1,) * (w.dim() - 1)

    def path_masks(self, mask: Tensor) -> List[Tensor]:
        """``mask`` as one ``(rows,)`` mask per weight of :meth:`params`."""
        n = len(self.params())
        return list(mask.view(n, self.rows)) if self.per_path else [mask] * n

    def per_copy(self, tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """``(copies, rows)`` float CPU: ``reduce`` of each row of each weight-shaped tensor (one per
        path), summed over the paths that share a mask bit."""
        s = torch.stack([reduce(t.detach().reshape(self.rows, -1).float()).cpu() for t in tensors])
        return s if self.per_path else s.sum(0, keepdim=True)

    def magnitude(self) -> Tensor:
        """``(copies, rows)``: L1 norm of each row."""
        return self.per_copy(self.params(), lambda t: t.abs().sum(1))

    def growth_score(self) -> Tensor:
        """``(copies, rows)``: gradient norm of each row (zero where there is no gradient)."""
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.params()]
        g = self.per_copy(grads, lambda t: t.norm(dim=1))
        return torch.nan_to_num(g, nan=0.0, posinf=torch.finfo(g.dtype).max)

    def erk_shape(self) -> tuple:
        m = self.module
        if self.kind == "tiles":
            return (m.in_channels, 1) + tuple(m.plan.info.extent)
        if self.kind == "planes":  # the depthwise K x K kernel that the shift-wise channels emulate
            k = self.param.shape[-1]
            big = int(getattr(m, "big_kernel", k))
            return (int(getattr(m, "rep_n", self.rows)), 1, big, big)
        return tuple(self.param.shape)

    def channel_offsets(self) -> Optional[Tensor]:
        """CSR ``(C + 1,)`` rows of each channel, for the channel histogram (None for element masks)."""
        if self.kind == "tiles":
            return self.module.tile_offsets.cpu()
        if self.kind == "planes":
            nk = int(getattr(self.module, "nk", 1))
            return torch.arange(0, self.rows + 1, nk)
        return None


def find_layers(model: nn.Module, dense_layers: bool = False, mask_paths: str = "shared") -> List[_Layer]:
    """The layers a :class:`TileMasker` masks, in ``named_modules`` order: every ``ShiftWiseConv2d``,
    every module with ``path_weights()`` (SW layers, masked by plane), and with ``dense_layers``
    every ``nn.Linear`` and 1x1 ``nn.Conv2d``."""
    if mask_paths not in MASK_PATHS:
        raise ValueError(f"unknown mask_paths {mask_paths!r}; choose one of {', '.join(MASK_PATHS)}")
    out = []
    for name, m in model.named_modules():
        if isinstance(m, ShiftWiseConv2d):
            out.append(_Layer(name, m, "tiles"))
        elif callable(getattr(m, "path_weights", None)):
            out.append(_Layer(name, m, "planes", per_path=mask_paths == "each"))
        elif dense_layers and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))):
            out.append(_Layer(name, m, "elements"))
    # the convs inside a plane layer are its paths, never masked on their own
    planes = [l.name + "." for l in out if l.kind == "planes"]
    return [l for l in out if not any(l.name.startswith(p) for p in planes)]


def _ranked(score: Tensor, gen: torch.Generator, descending: bool) -> Tensor:
    """Indices of ``score`` sorted, ties broken by a random permutation from ``gen``."""
    perm = torch.randperm(score.numel(), generator=gen)
    order = torch.sort(score[perm], descending=descending, stable=True).indices
    return perm[order]


def _pick(score: Tensor, candidates: Tensor, k: int, gen: torch.Generator, largest: bool) -> Tensor:
    """Boolean ``(n,)``: the ``k`` candidates with the largest (or smallest) score."""
    chosen = torch.zeros_like(candidates)
    if k <= 0:
        return chosen
    idx = candidates.nonzero().squeeze(1)
    order = _ranked(score[idx], gen, descending=largest)
    chosen[idx[order[:k]]] = True
    return chosen


def update_block(mask: Tensor, magnitude: Tensor, growth_score: Tensor, target: int, prune_frac: float,
                 gen: torch.Generator) -> Tensor:
    """One topology update of a flat mask; returns the new mask (all tensors CPU, ``(n,)``).

    First move the active count to ``target`` (prune smallest ``magnitude`` or grow largest
    ``growth_score``), then exchange: prune ``ceil(prune_frac * active)`` smallest and regrow
    exactly as many, chosen among the tiles that were inactive before this update (so a tile
    pruned now is not revived at once, and every regrown tile is a new one).
    """
    before = mask
    mask = mask.clone()
    active = int(mask.sum())
    if active > target:
        mask &= ~_pick(magnitude, mask, active - target, gen, largest=False)
    elif active < target:
        mask |= _pick(growth_score, ~mask, target - active, gen, largest=True)
    candidates = ~before & ~mask
    n = min(math.ceil(prune_frac * int(mask.sum())), int(candidates.sum())) if prune_frac > 0 else 0
    if n > 0:
        grow = _pick(growth_score, candidates, n, gen, largest=True)
        mask &= ~_pick(magnitude, mask, n, gen, largest=False)
        mask |= grow
    return mask


class TileMasker:
    """Masks of every ``ShiftWiseConv2d`` tile (and SW layer plane) of ``model``, and their dynamic updates.

    Args:
        model: the (unwrapped, not DDP) model; its ``ShiftWiseConv2d`` layers and SW layers
            (modules with ``path_weights()``) are masked.
        config: a :class:`SparseConfig`.

    Example::

        >>> masker = TileMasker(model, SparseConfig(density=0.3, total_steps=1000))
        >>> masker.init_masks()
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step(); optimizer.zero_grad()
        ...     masker.step(optimizer)      # re-zero masked tiles; every U steps prune/regrow
        ...     masker.apply(ema_model)     # an EMA copy keeps the same zeros
    """

    def __init__(self, model: nn.Module, config: SparseConfig):
        self.model = model
        self.config = config
        self.layers = find_layers(model, config.dense_layers, config.mask_paths)
        if not any(l.kind != "elements" for l in self.layers):
            raise ValueError("the model has no ShiftWiseConv2d or SW layer to mask; convert its large kernels first "
                             "(shiftwise.convert.swap.convert_model) or pass a shift-wise model")
        if config.redistribute and any(l.per_path for l in self.layers):
            raise ValueError("redistribute ranks one mask per layer; use it with mask_paths='shared'")
        self.schedule = DensitySchedule(config.schedule, config.schedule_start, config.schedule_end)
        self.masks: Dict[str, Tensor] = {l.name: torch.ones(l.num_units, dtype=torch.bool, device=l.param.device)
                                         for l in self.layers}
        self.final_counts: List[int] = [l.rows for l in self.layers]  # rows kept per copy at the end
        self.step_count = 0

    # allocation -------------------------------------------------------------------------------
    def init_masks(self, scores: Optional[Dict[str, Tensor]] = None) -> None:
        """Decide each layer's final tile count and the initial masks, then apply them.

        ``scores`` (name -> ``(U,)``, e.g. from :func:`snip_scores`) is required by
        ``init="snip"`` and used for ``positions="score"``; without it scores are the L1
        norms of the initial tiles. Under ``torch.distributed`` rank 0 decides. With per-path
        masks every path starts with the same mask, chosen on the sum over paths.
        """
        cfg = self.config
        if cfg.init == "snip" and scores is None:
            raise ValueError("init='snip' needs scores from one batch: pass snip_scores(model, loss_fn)")
        if self._deciding():
            units = [l.rows for l in self.layers]
            params = [l.rows * l.row_params for l in self.layers]
            if cfg.init == "uniform":
                dens = uniform_densities(len(units), cfg.density)
            elif cfg.init == "erk":
                dens = erk_densities([l.erk_shape() for l in self.layers], params, cfg.density)
            else:
                dens = snip_densities([self._score(l, scores, l.per_path).flatten() for l in self.layers],
                                      [l.unit_params for l in self.layers], cfg.density)
            self.final_counts = allocate_counts(dens, units)
            use_score = cfg.positions == "score" or (cfg.positions == "auto" and cfg.init == "snip")
            gen = self._generator(-1)
            counts = self._scheduled_counts(0)
            for l, k in zip(self.layers, counts):
                if not use_score:
                    s = torch.zeros(l.rows)
                elif scores is not None:
                    s = self._score(l, scores, False)[0]
                else:
                    s = l.magnitude().sum(0)
                rows = _pick(s, torch.ones(l.rows, dtype=torch.bool), k, gen, largest=True)
                self.masks[l.name] = rows.repeat(l.copies).to(l.param.device)
        self._broadcast(with_counts=True)
        self.apply()

    @staticmethod
    def _score(layer: _Layer, scores: Dict[str, Tensor], per_path: bool) -> Tensor:
        """A layer's scores as ``(paths, rows)`` (``per_path``) or ``(1, rows)`` summed over paths;
        scores come per path (:func:`snip_scores`) or already summed."""
        s = scores[layer.name].detach().float().cpu().reshape(-1, layer.rows)
        return s if per_path else s.sum(0, keepdim=True)

    # per step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: Optional[nn.Module] = None) -> None:
        """Zero the masked tiles of ``model`` (default: the masked model; or an EMA copy)."""
        for l in self.layers:
            params = l.params(model.get_submodule(l.name) if model is not None else None)
            for w, m in zip(params, l.path_masks(self.masks[l.name])):
                w.masked_fill_(~m.to(w.device).view(l.view_shape()), 0)

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Optional[dict]:
        """Call after each optimizer step: count it, update the topology when due, apply masks.

        Returns the update's statistics on update steps, else ``None``.
        """
        self.step_count += 1
        self.apply()
        if self.is_update_step(self.step_count):
            return self.update(optimizer)
        return None

    def is_aligned(self, step: int) -> bool:
        """Whether the topology update at ``step`` copies path 0's mask to the other paths (per-path
        masks): when ``(step // update_every) % align_every == 0``, as the official ``sparse_gap``."""
        cfg = self.config
        return (step // cfg.update_every) % cfg.align_every == 0

    def is_update_step(self, step: int) -> bool:
        cfg = self.config
        if step % cfg.update_every == 0:
            return True
        return cfg.schedule != "constant" and step == cfg.schedule_end

    def prune_rate(self, step: Optional[int] = None) -> float:
        """The exchange fraction at ``step`` (0 after ``update_until``)."""
        cfg = self.config
        step = self.step_count if step is None else step
        until = cfg.update_until if cfg.update_until is not None else cfg.total_steps
        if step > until or 0 < cfg.total_steps <= step:  # tiles regrown at the last step would stay zero
            return 0.0
        return cosine_prune_rate(step, cfg.total_steps, cfg.prune_rate, cfg.prune_rate_floor)

    # topology ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Prune and regrow now (normally called by :meth:`step`); returns counts for logging."""
        old = {k: v.clone() for k, v in self.masks.items()}
        p = self.prune_rate()
        if self._deciding():
            gen = self._generator(self.step_count)
            counts = self._scheduled_counts(self.step_count)
            aligned = self.is_aligned(self.step_count)
            mags, grows, flat = [], [], []
            for l in self.layers:
                mags.append(l.magnitude())
                grows.append(l.growth_score() if self.config.growth == "gradient" else torch.zeros(l.copies, l.rows))
                flat.append(self.masks[l.name].cpu().view(l.copies, l.rows))
            if self.config.redistribute:
                sizes = [l.rows for l in self.layers]
                new = update_block(torch.cat([m[0] for m in flat]), torch.cat([w[0] for w in mags]),
                                   torch.cat([g[0] for g in grows]), sum(counts), p, gen)
                flat = list(new.split(sizes))
            else:
                flat = [self._update_layer(m, w, g, k, p, gen, aligned)
                        for m, w, g, k in zip(flat, mags, grows, counts)]
            for l, m in zip(self.layers, flat):
                self.masks[l.name] = m.reshape(-1).to(l.param.device)
        self._broadcast()
        pruned = regrown = 0
        for l in self.layers:
            new, was = self.masks[l.name], old[l.name].to(self.masks[l.name].device)
            grown = new & ~was
            pruned += int((was & ~new).sum())
            regrown += int(grown.sum())
            if grown.any():
                self._reset(l, grown, optimizer)
        self.apply()
        logger.debug("step %d: prune rate %.4f, pruned %d, regrown %d, density %.4f",
                     self.step_count, p, pruned, regrown, self.density())
        return {"step": self.step_count, "prune_rate": p, "pruned": pruned, "regrown": regrown,
                "density": self.density()}

    @staticmethod
    def _update_layer(mask: Tensor, magnitude: Tensor, growth: Tensor, target: int, prune_frac: float,
                      gen: torch.Generator, aligned: bool) -> Tensor:
        """A layer's new ``(copies, rows)`` mask: one :func:`update_block` per copy; on an aligned
        update of per-path masks, path 0's mask updated on the sums over paths, copied to every path."""
        if mask.shape[0] > 1 and aligned:
            row = update_block(mask[0], magnitude.sum(0), growth.sum(0), target, prune_frac, gen)
            return row.expand_as(mask).clone()
        return torch.stack([update_block(m, w, g, target, prune_frac, gen) for m, w, g in zip(mask, magnitude, growth)])

    def _reset(self, layer: _Layer, grown: Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Regrown tiles start at zero, with zero optimizer state (momentum, Adam moments), in every
        path they were regrown in."""
        for w, m in zip(layer.params(), layer.path_masks(grown)):
            if not m.any():
                continue
            sel = m.view(layer.view_shape())
            w.data.masked_fill_(sel, 0)
            if optimizer is None:
                continue
            for v in optimizer.state.get(w, {}).values():
                if torch.is_tensor(v) and v.shape == w.shape:
                    v.masked_fill_(sel.to(v.device), 0)

    def _scheduled_counts(self, step: int) -> List[int]:
        dens = [self.schedule.density(k / l.rows if l.rows else 1.0, step)
                for k, l in zip(self.final_counts, self.layers)]
        return allocate_counts(dens, [l.rows for l in self.layers])

    def _generator(self, step: int) -> torch.Generator:
        # A fresh generator per update, from (seed, step): resuming needs no RNG state.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 1)

    # distributed ------------------------------------------------------------------------------
    @staticmethod
    def _world() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _deciding(self) -> bool:
        return self._world() == 1 or dist.get_rank() == 0

    def _broadcast(self, with_counts: bool = False) -> None:
        if self._world() == 1:
            return
        dev = self.layers[0].param.device
        flat = torch.cat([self.masks[l.name].to(dev, torch.uint8) for l in self.layers])
        if with_counts:
            flat = torch.cat([flat.long(), torch.tensor(self.final_counts, dtype=torch.long, device=dev)])
        dist.broadcast(flat, src=0)
        sizes = [l.num_units for l in self.layers]
        parts = flat[:sum(sizes)].split(sizes)
        for l, m in zip(self.layers, parts):
            self.masks[l.name] = m.to(l.param.device, torch.bool)
        if with_counts:
            self.final_counts = flat[sum(sizes):].tolist()

    # reporting --------------------------------------------------------------------------------
    def density(self) -> float:
        """Kept fraction of the masked parameters."""
        kept = sum(int(self.masks[l.name].sum()) * l.unit_params for l in self.layers)
        total = sum(l.num_units * l.unit_params for l in self.layers)
        return kept / total

    def kept_tiles(self) -> int:
        """Tiles kept by the masks of the ``ShiftWiseConv2d`` layers."""
        return sum(int(self.masks[l.name].sum()) for l in self.layers if l.tiled)

    def target_density(self) -> float:
        """Final density the counts aim at (exact up to rounding)."""
        kept = sum(k * l.row_params for k, l in zip(self.final_counts, self.layers))
        return kept / sum(l.rows * l.row_params for l in self.layers)

    def layer_stats(self) -> List[dict]:
        """Per layer: name, unit (``"tile"``, ``"plane"`` or ``"element"``), units (mask bits), kept,
        density, and for tiled layers the tile-count histogram (for SW layers: channels by planes
        kept, a plane kept when any path keeps it)."""
        out = []
        for l in self.layers:
            m = self.masks[l.name].cpu()
            row = {"name": l.name, "unit": l.kind[:-1], "units": l.num_units, "kept": int(m.sum()),
                   "density": float(m.double().mean())}
            offsets = l.channel_offsets()
            if offsets is not None:
                row["histogram"] = channel_histogram(self.alive_rows(l.name).cpu(), offsets)
            out.append(row)
        return out

    def alive_rows(self, name: str) -> Tensor:
        """``(rows,)`` bool: the rows of layer ``name`` that some copy keeps (for an SW layer: the
        planes whose kernel summed over the paths can be non-zero)."""
        l = next(l for l in self.layers if l.name == name)
        return self.masks[name].view(l.copies, l.rows).any(0)

    # checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, ints and dicts only (loads with ``torch.load(weights_only=True)``)."""
        return {"step": self.step_count, "final_counts": list(self.final_counts),
                "masks": {k: v.cpu().clone() for k, v in self.masks.items()},
                "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        masks = state["masks"]
        names = [l.name for l in self.layers]
        if sorted(masks) != sorted(names):
            raise ValueError(f"checkpoint masks cover layers {sorted(masks)[:4]}..., the model has {names[:4]}...")
        for l in self.layers:
            m = masks[l.name]
            if m.shape != (l.num_units,):
                raise ValueError(f"mask of {l.name} has shape {tuple(m.shape)}, the layer has {l.num_units} units")
            self.masks[l.name] = m.to(l.param.device, torch.bool)
        self.final_counts = [int(k) for k in state["final_counts"]]
        self.step_count = int(state["step"])
        self.apply()


def channel_histogram(mask: Tensor, offsets: Tensor) -> List[int]:
    """How many channels keep 0, 1, 2, ... tiles (the paper's Table 2 row of one layer).

    ``mask`` is ``(T,)`` bool over the tiles of a plan with CSR ``offsets`` ``(C + 1,)``; the
    list has one entry per possible count, up to the largest tile count of a channel.
    """
    counts = (offsets[1:] - offsets[:-1]).long()
    channel = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    kept = torch.zeros(counts.numel(), dtype=torch.long).index_add_(0, channel, mask.long())
    top = int(counts.max()) if counts.numel() else 0
    return torch.bincount(kept, minlength=top + 1).tolist()


def snip_scores(model: nn.Module, loss_fn: Callable[[], Tensor], dense_layers: bool = False) -> Dict[str, Tensor]:
    """SNIP connection sensitivity ``|w * dL/dw|`` summed per tile (per element for dense layers;
    per plane and path for SW layers, ``(paths * P,)`` path-major).

    ``loss_fn()`` computes the loss of one batch with ``model``. Gradients are cleared after.
    """
    layers = find_layers(model, dense_layers, "each")
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    scores = {}
    for l in layers:
        prods = [(w.detach() * (w.grad if w.grad is not None else torch.zeros_like(w))).abs() for w in l.params()]
        scores[l.name] = l.per_copy(prods, lambda t: t.sum(1)).flatten()
    model.zero_grad(set_to_none=True)
    return scores
