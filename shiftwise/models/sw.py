"""SW: the shift-wise network of ShiftwiseConv (Li et al., CVPR 2025), training and inference form.

"ShiftwiseConv: Small Convolutional Kernel with Large Kernel Effect", Li et al., CVPR 2025
(https://arxiv.org/abs/2401.12736). The ``state_dict`` has the key names and shapes of the
official ``ShiftWise_v2_*`` (lidc54/shift-wiseConv, ``backbones/SW_v2_unirep.py``), plus the
tables of each SW layer as buffers (``rep_ids``, ``ghost_ids``, ``pad_hv``, ``idx_identity``).

The SW layer (:class:`SWLayer`) splits ``C`` channels into ``repN`` shift-wise channels and
``C - repN`` ghost channels passed through. Each shift-wise channel ``r`` owns ``nk = ceil(K / k)``
planes, the outputs of ``k x k`` depthwise convs (``N_path`` parallel convs, summed). Three sums
read those planes at shifted places: horizontal and vertical (every plane at ``N_rep`` shuffled
offsets per direction) and identity (``N_rep`` picked planes, unshifted); a BatchNorm follows
each sum, the input of the channel is added, and the output lists the shift-wise channels first,
then the ghost channels. Every sum is linear in the plane kernels: it equals one depthwise conv
whose ``k x k`` tiles sit at the offsets and hold the sum of the plane kernels placed there, so
the whole layer, in eval mode, is one :class:`~shiftwise.modules.ShiftWiseConv2d` with one tile
list per channel (the conversion, :meth:`SWBlock.to_shiftwise`).

Tables (ghost ids, shuffled offsets, identity picks) are drawn as the official constructor draws
them (NumPy seed 123 for the ghost ids, torch seed 123 for the rest, in its order), but from
private generators: building a layer leaves the global random state alone.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import functional
from ..modules import ShiftWiseConv2d
from ..tiling import ShiftAddPlan, TilePlan, fold_bn, merge_tiles, split_kernel
from ._family import Family
from ._layers import DropPath, FourStageNet, Permute, check_foldable, drop_path_rates, with_children
from .sw_keys import RELEASED, VARIANTS, detect, infer_config
from .unireplknet import GRN, SEBlock, _init_weights, stem_and_downsampling

TABLE_SEED = 123  # the official constructor's seed for every table
TABLE_BUFFERS = ("rep_ids", "ghost_ids", "pad_hv", "idx_identity")
PATHS = ("auto", "weights", "planes")


class SWTables(NamedTuple):
    """The fixed tables of one SW layer (see :func:`sw_tables`)."""

    rep_ids: Tensor  # int64 (repN,): the shift-wise channels, ascending
    ghost_ids: Tensor  # int64 (C - repN,): the ghost channels, ascending
    pad_hv: Tensor  # int32 (P, 2 * N_rep): per plane, its offset in each horizontal then vertical copy
    idx_identity: Tensor  # int32 (repN, N_rep): per channel, the plane each identity copy reads


def shift_geometry(big_kernel: int, small_kernel: int) -> Tuple[int, List[int], int]:
    """``(nk, real_pad, extra_pad)``: planes per channel, the offset of each plane position, and
    the margin of the planes (``k - 1`` padding less ``k // 2``)."""
    nk = math.ceil(big_kernel / small_kernel)
    padding = small_kernel - 1
    real_pad = [big_kernel // 2 - j * small_kernel - padding for j in range(nk)]
    return nk, real_pad, padding - small_kernel // 2


def shift_channels(channels: int, ghost_ratio: float) -> int:
    """``repN``: how many of ``channels`` are shift-wise (even, as the official layer rounds it)."""
    return int(channels * (1 - ghost_ratio)) // 2 * 2


def sw_tables(channels: int, big_kernel: int, small_kernel: int = 3, ghost_ratio: float = 0.23,
              n_rep: int = 4) -> SWTables:
    """The tables the official ``ShifthWiseConv2dImplicit`` draws, from private generators.

    Example::

        >>> t = sw_tables(80, 51, 3, 0.23, 4)
        >>> t.rep_ids.numel(), t.ghost_ids.numel(), tuple(t.pad_hv.shape), tuple(t.idx_identity.shape)
        (60, 20, (1020, 8), (60, 4))
    """
    rep_n = shift_channels(channels, ghost_ratio)
    nk, real_pad, _ = shift_geometry(big_kernel, small_kernel)
    ghost = sorted(np.random.RandomState(TABLE_SEED).choice(channels, channels - rep_n, replace=False).tolist())
    rep = sorted(set(range(channels)) - set(ghost))
    cpu = torch.device("cpu")  # also under a ``torch.device("meta")`` context: the tables are data
    g = torch.Generator().manual_seed(TABLE_SEED)
    base = torch.arange(rep_n, device=cpu).repeat_interleave(nk) * nk

    def shuffles():
        return [torch.cat([torch.randperm(nk, generator=g, device=cpu) for _ in range(rep_n)]) + base
                for _ in range(n_rep)]

    horizontal, vertical = shuffles(), shuffles()
    identity = [torch.randint(0, nk, [rep_n], generator=g, device=cpu) + torch.arange(rep_n, device=cpu) * nk
                for _ in range(n_rep)]
    offset = torch.tensor(real_pad * rep_n, dtype=torch.int32, device=cpu)  # offset[q] = real_pad[q % nk]
    # copy i gives plane p the offset of the position where its permutation holds p
    pads = [offset[torch.argsort(perm)] for perm in horizontal + vertical]
    return SWTables(torch.tensor(rep, dtype=torch.int64, device=cpu),
                    torch.tensor(ghost, dtype=torch.int64, device=cpu),
                    torch.stack(pads, 1).contiguous(), torch.stack(identity, 1).to(torch.int32).contiguous())


class SWLayer(nn.Module):
    """The official SW layer, training form (``ShifthWiseConv2dImplicit``, its key names).

    Args:
        channels: ``C`` (input and output).
        big_kernel: ``K``, the large kernel the shifts emulate.
        small_kernel: ``k``, odd (default 3).
        ghost_ratio: share of channels passed through unchanged (default 0.23).
        n_path: parallel ``k x k`` convs ``LoRAs.{i}``, summed (default 2).
        n_rep: shuffled copies of every plane per direction (default 4).
        bn: a BatchNorm after each of the three sums (default True).
        merged: the paths merged into one conv ``LoRA`` (the official ``merge_branches``).
        path: how the three sums are computed in training mode: ``"weights"`` (three shift-wise
            convs of the merged tiles), ``"planes"`` (the planes, then the general shift-add of
            :func:`shiftwise.functional.plane_shift_add`) or ``"auto"`` (default; see
            :meth:`chosen_path`). Both give the same result.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``, channels in the official order: the ``repN``
    shift-wise channels (``rep_ids``), then the ghost channels (``ghost_ids``).
    """

    replayed_buffers = TABLE_BUFFERS  # a file without them is complete: loading replays them
    takes_shiftwise_backend = True  # shiftwise.modules.set_backend reaches its shift-wise calls

    def __init__(self, channels: int, big_kernel: int, small_kernel: int = 3, ghost_ratio: float = 0.23,
                 n_path: int = 2, n_rep: int = 4, bn: bool = True, merged: bool = False, path: str = "auto"):
        super().__init__()
        for name, v in (("channels", channels), ("big_kernel", big_kernel), ("small_kernel", small_kernel),
                        ("n_rep", n_rep)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SW layer {name} must be a positive int, got {v!r}")
        if small_kernel % 2 == 0:
            raise ValueError(f"SW layer small_kernel must be odd (the official plane indexing assumes it), "
                             f"got {small_kernel}")
        if not merged and (not isinstance(n_path, int) or n_path < 1):
            raise ValueError(f"SW layer n_path must be a positive int, got {n_path!r}")
        if not 0.0 <= float(ghost_ratio) < 1.0:
            raise ValueError(f"ghost_ratio must be in [0, 1), got {ghost_ratio!r}")
        self.channels, self.big_kernel, self.small_kernel = channels, big_kernel, small_kernel
        self.ghost_ratio, self.n_rep, self.merged = float(ghost_ratio), n_rep, bool(merged)
        self.n_path = 1 if merged else n_path
        self.nk, self.real_pad, self.extra_pad = shift_geometry(big_kernel, small_kernel)
        self.rep_n = shift_channels(channels, ghost_ratio)
        if self.rep_n < 2:
            raise ValueError(f"ghost_ratio {ghost_ratio} leaves {self.rep_n} shift-wise channels of {channels}; "
                             "lower it or use more channels")
        if path not in PATHS:
            raise ValueError(f"SW layer path must be one of {PATHS}, got {path!r}")
        self.path = path
        self.backend: Optional[str] = None
        planes = self.rep_n * self.nk

        def conv():
            return nn.Conv2d(self.rep_n, planes, small_kernel, padding=small_kernel - 1, groups=self.rep_n,
                             bias=False)

        if merged:
            self.LoRA = conv()
        else:
            self.LoRAs = nn.ModuleList(conv() for _ in range(n_path))
        self.use_bn = bool(bn)
        for name in ("bn_lora1", "bn_lora2", "bn_small"):
            setattr(self, name, nn.BatchNorm2d(self.rep_n) if bn else None)
        for name, t in zip(TABLE_BUFFERS, sw_tables(channels, big_kernel, small_kernel, ghost_ratio, n_rep)):
            self.register_buffer(name, t)
        self._plans: Dict[str, object] = {}

    # geometry -------------------------------------------------------------------------------
    @property
    def num_planes(self) -> int:
        return self.rep_n * self.nk

    def path_weights(self) -> List[nn.Parameter]:
        """The plane kernels of every path, each ``(P, 1, k, k)``; plane ``p`` belongs to channel ``p // nk``."""
        return [self.LoRA.weight] if self.merged else [c.weight for c in self.LoRAs]

    def plane_kernels(self) -> Tensor:
        """``(P, k, k)``: the plane kernels summed over the paths (what the layer computes with)."""
        weights = self.path_weights()
        w = weights[0]
        for other in weights[1:]:
            w = w + other
        return w[:, 0]

    def entries(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(out, plane, dy, dx)`` of every read of the three sums, int64 on the CPU: output
        ``o`` (horizontal ``r``, vertical ``repN + r``, identity ``2 repN + r``) adds plane
        ``plane`` at ``(h + dy, w + dx)`` (plane coordinates, ``k - 1`` zero margin included)."""
        n, e, nr = self.rep_n, self.extra_pad, self.n_rep
        pad = self.pad_hv.detach().cpu().long()
        cpu = torch.device("cpu")
        p = torch.arange(self.num_planes, device=cpu).repeat_interleave(nr)
        owner = p // self.nk
        ph, pv = pad[:, :nr].reshape(-1), pad[:, nr:].reshape(-1)
        ident = self.idx_identity.detach().cpu().long().reshape(-1)
        r = torch.arange(n, device=cpu).repeat_interleave(nr)
        out = torch.cat([owner, n + owner, 2 * n + r])
        plane = torch.cat([p, p, ident])
        dy = torch.cat([torch.full_like(p, e), -pv, torch.full_like(r, e)])
        dx = torch.cat([-ph, torch.full_like(p, e), torch.full_like(r, e)])
        return out, plane, dy, dx

    def _tile_maps(self) -> Dict[str, Tuple[Tensor, Tensor, TilePlan]]:
        """Per sum (``"h"``, ``"v"``, ``"i"``): ``(tile index, plane, plan)``: tile ``t`` of the sum's
        shift-wise conv holds the sum of the plane kernels ``plane[j]`` with ``index[j] == t``."""
        key = str(self.pad_hv.device)
        if key in self._plans:
            return self._plans[key]
        n, e = self.rep_n, self.extra_pad
        out, plane, dy, dx = self.entries()
        maps = {}
        for name, lo in (("h", 0), ("v", n), ("i", 2 * n)):
            sel = (out >= lo) & (out < lo + n)
            ch, pl = out[sel] - lo, plane[sel]
            cy, cx = dy[sel] - e, dx[sel] - e  # tile centre offset from the output pixel
            positions = sorted(set(zip(cy.tolist(), cx.tolist())))
            where = {pos: i for i, pos in enumerate(positions)}
            slot = torch.tensor([where[pos] for pos in zip(cy.tolist(), cx.tolist())], dtype=torch.int64,
                                device=torch.device("cpu"))
            plan = TilePlan.uniform(n, positions, self.small_kernel)
            maps[name] = (ch * len(positions) + slot, pl, plan)
        dev = self.pad_hv.device
        maps = {k: (i.to(dev), p.to(dev), plan.to(dev)) for k, (i, p, plan) in maps.items()}
        self._plans[key] = maps
        return maps

    def sum_tiles(self, kernels: Optional[Tensor] = None) -> Dict[str, Tuple[Tensor, TilePlan]]:
        """Per sum, ``(tiles, plan)`` of the shift-wise conv of ``x_rep`` that computes it
        (``kernels``: the ``(P, k, k)`` plane kernels, default :meth:`plane_kernels`)."""
        w = self.plane_kernels() if kernels is None else kernels
        out = {}
        for name, (index, plane, plan) in self._tile_maps().items():
            tiles = w.new_zeros((plan.num_tiles,) + tuple(w.shape[1:]))
            out[name] = (tiles.index_add(0, index, w.index_select(0, plane)), plan)
        return out

    def shift_add_plan(self) -> ShiftAddPlan:
        """The general shift-add of the three sums (``3 repN`` outputs from ``P`` planes)."""
        key = "entries:" + str(self.pad_hv.device)
        if key not in self._plans:
            out, plane, dy, dx = self.entries()
            self._plans[key] = ShiftAddPlan.from_entries(out, plane, dy, dx, 3 * self.rep_n,
                                                         self.num_planes).to(self.pad_hv.device)
        return self._plans[key]

    def _apply(self, fn, *args, **kwargs):
        self._plans = {}
        return super()._apply(fn, *args, **kwargs)

    def chosen_path(self) -> str:
        """The path a training-mode forward takes: ``path`` unless ``"auto"``, which takes
        ``"weights"`` (one shift-wise conv of the merged tiles: it never holds the ``nk`` planes
        per channel; measured in ``docs/sw.md``)."""
        if self.path not in PATHS:
            raise ValueError(f"SW layer path must be one of {PATHS}, got {self.path!r}")
        return "weights" if self.path == "auto" else self.path

    # forward --------------------------------------------------------------------------------
    def three_sums(self, x_rep: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The horizontal, vertical and identity sums of the shift-wise channels' input, before
        their BNs. Path "weights": three shift-wise convs of ``x_rep`` (the same saved input for
        all three, no copy of it), tiles merged from the plane kernels."""
        k = self.small_kernel
        w = self.plane_kernels()
        # an ONNX export writes the weights path (same sums): the planes path's shift-add plan is
        # built from the tables' values, which the dynamo exporter traces without
        if self.chosen_path() == "planes" and not torch.onnx.is_in_onnx_export():
            u = F.conv2d(x_rep, w[:, None], padding=k - 1, groups=self.rep_n)
            y = functional.plane_shift_add(u, self.shift_add_plan(), x_rep.shape[-2:], backend=self.backend)
            return y.chunk(3, dim=1)
        return tuple(functional.shiftwise_conv2d(x_rep, tiles, plan, backend=self.backend)
                     for tiles, plan in self.sum_tiles(w).values())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SW layer expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        x_rep = x.index_select(1, self.rep_ids)
        h, v, i = self.three_sums(x_rep)
        if self.use_bn:
            h, v, i = self.bn_lora1(h), self.bn_lora2(v), self.bn_small(i)
        y = h + v + i + x_rep
        if self.ghost_ids.numel() == 0:
            return y
        return torch.cat([y, x.index_select(1, self.ghost_ids)], dim=1)

    # inference form -------------------------------------------------------------------------
    @torch.no_grad()
    def channel_tiles(self) -> Tuple[List[Dict[Tuple[int, int], Tensor]], Tensor]:
        """Eval-mode form per channel in NATURAL channel order: ``(tiles, bias)`` where
        ``tiles[c]`` maps tile centre ``(dy, dx)`` to its ``(k, k)`` weight (coincident tiles
        summed; the three BNs and the residual folded in; a ghost channel holds one identity
        tile) and ``bias`` is ``(C,)``."""
        check_foldable([self.bn_lora1, self.bn_lora2, self.bn_small])
        k = self.small_kernel
        w = self.plane_kernels().detach()
        sums = self.sum_tiles(w)
        bias = w.new_zeros(self.channels)
        per_channel: List[Dict[Tuple[int, int], Tensor]] = [dict() for _ in range(self.channels)]
        rep = self.rep_ids.tolist()
        for name, bn in (("h", self.bn_lora1), ("v", self.bn_lora2), ("i", self.bn_small)):
            tiles, plan = sums[name]
            per = plan.info.uniform
            if bn is not None:
                scaled, shift = fold_bn(tiles.view(self.rep_n, per, k, k), None, bn)
                tiles = scaled.reshape(-1, k, k)
                bias[self.rep_ids] += shift
            positions = list(zip(plan.dy.tolist(), plan.dx.tolist()))
            for t, pos in enumerate(positions):
                tiles_c = per_channel[rep[t // per]]
                tiles_c[pos] = tiles[t] if pos not in tiles_c else tiles_c[pos] + tiles[t]
        one = w.new_zeros(k, k)
        one[k // 2, k // 2] = 1.0
        for c in range(self.channels):  # the residual of a shift-wise channel, a ghost channel's identity
            tiles_c = per_channel[c]
            tiles_c[(0, 0)] = one.clone() if (0, 0) not in tiles_c else tiles_c[(0, 0)] + one
        return per_channel, bias

    @property
    def permutation(self) -> Tensor:
        """``perm`` (int64 ``(C,)``): output channel ``j`` of the layer is input channel ``perm[j]``."""
        return torch.cat([self.rep_ids, self.ghost_ids])

    def reach(self) -> int:
        """The largest distance from the output pixel that any tile of the layer reads."""
        return max(abs(-p - self.extra_pad) for p in self.real_pad) + self.small_kernel // 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        replayed = sw_tables(self.channels, self.big_kernel, self.small_kernel, self.ghost_ratio, self.n_rep)
        for name in TABLE_BUFFERS:  # official files hold no tables: replay them; check any that are present
            key = prefix + name
            own = getattr(replayed, name).to(getattr(self, name).device)
            if key not in state_dict:
                state_dict[key] = own
            elif tuple(state_dict[key].shape) != tuple(own.shape) or not torch.equal(
                    state_dict[key].detach().cpu().to(own.dtype), own.detach().cpu()):
                error_msgs.append(f"{prefix}{name}: the file's SW table differs from the one this layer "
                                  f"replays for C={self.channels}, K={self.big_kernel}, k={self.small_kernel}, "
                                  f"ghost_ratio={self.ghost_ratio}, N_rep={self.n_rep}")
                state_dict[key] = own
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, big_kernel={self.big_kernel}, small_kernel={self.small_kernel}, "
                f"ghost_ratio={self.ghost_ratio}, shift_channels={self.rep_n}, n_path={self.n_path}, "
                f"n_rep={self.n_rep}, merged={self.merged}, path={self.path!r}")


class SWBlock(nn.Module):
    """SW layer, BN ``norm``, SE, MLP with GRN, layer scale, residual (the official ``Block``).

    Args:
        dim: channels.
        big_kernel, small_kernel, ghost_ratio, n_path, n_rep, bn, merged: of the :class:`SWLayer`.
        drop_path: stochastic depth probability (default 0).
        layer_scale_init_value: initial ``gamma`` (default 1e-6; 0 or None: no layer scale).
    """

    def __init__(self, dim: int, big_kernel: int, small_kernel: int = 3, ghost_ratio: float = 0.23,
                 n_path: int = 2, n_rep: int = 4, bn: bool = True, merged: bool = False, drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6):
        super().__init__()
        self.large_kernel = SWLayer(dim, big_kernel, small_kernel, ghost_ratio, n_path, n_rep, bn, merged)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        self.pwconv1 = nn.Sequential(Permute(0, 2, 3, 1), nn.Linear(dim, 4 * dim))  # (N, C, H, W) -> (N, H, W, C)
        self.act = nn.Sequential(nn.GELU(), GRN(4 * dim, use_bias=True))
        self.pwconv2 = nn.Sequential(nn.Linear(4 * dim, dim, bias=False), Permute(0, 3, 1, 2), nn.BatchNorm2d(dim))
        use_gamma = layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def default_tile_size(self) -> Optional[int]:
        return self.large_kernel.small_kernel if isinstance(self.large_kernel, SWLayer) else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.se(self.norm(self.large_kernel(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def to_shiftwise(self, tile_size: Optional[int] = None, layout: str = "auto",
                     backend: Optional[str] = None) -> Optional["SWBlock"]:
        """This block with the SW layer and ``norm`` as one :class:`ShiftWiseConv2d` (natural
        channel order) and ``nn.Identity``; the layer's channel order is folded into ``se`` and
        ``pwconv1``. Returns a new block sharing every other layer (``self`` is left as it is),
        or ``None`` when already converted. Tiles that are exactly zero (planes removed by
        sparse training, in every sum that reads them) are dropped."""
        layer = self.large_kernel
        if not isinstance(layer, SWLayer):
            return None
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            norm = self.norm
        elif isinstance(self.norm, nn.Identity):
            norm = None
        else:
            raise ValueError(f"cannot fold a {type(self.norm).__name__} after the SW layer; expected a BatchNorm")
        check_foldable([norm])
        per_channel, bias = layer.channel_tiles()
        k, c = layer.small_kernel, layer.channels
        perm = layer.permutation
        inverse = torch.argsort(perm)  # natural channel -> its output position in the official order
        if norm is not None:  # the block's BN, indexed by official position, folded per natural channel
            scale, shift = fold_bn(torch.ones_like(bias), None, norm)
            scale, shift = scale[inverse].to(bias.dtype), shift[inverse].to(bias.dtype)
            per_channel = [{pos: t * scale[ch] for pos, t in tiles.items()} for ch, tiles in enumerate(per_channel)]
            bias = bias * scale + shift
        nonzero = [torch.stack(list(tiles.values())).flatten(1).ne(0).any(1).tolist() for tiles in per_channel]
        positions = [sorted(pos for pos, alive in zip(tiles, keep) if alive)
                     for tiles, keep in zip(per_channel, nonzero)]
        flat = [per_channel[ch][pos] for ch in range(c) for pos in positions[ch]]
        tiles = torch.stack(flat) if flat else bias.new_zeros(0, k, k)
        plan = TilePlan.from_lists(positions, k)
        side = 2 * layer.reach() + 1
        tile = k if tile_size is None else int(tile_size)
        if tile != k:  # another tile size: tile the merged kernel anew
            dense = merge_tiles(tiles, plan, (side, side))
            tiles, plan = split_kernel(dense, tile, layout)
            keep = tiles.flatten(1).ne(0).any(1)
            tiles, plan = tiles[keep], plan.select(keep)
        sw = ShiftWiseConv2d.from_tiles(tiles, plan, bias, kernel_size=(side, side), backend=backend)
        se = copy.deepcopy(self.se)
        se.down.weight.copy_(self.se.down.weight[:, inverse])
        se.up.weight.copy_(self.se.up.weight[inverse])
        se.up.bias.copy_(self.se.up.bias[inverse])
        pwconv1 = copy.deepcopy(self.pwconv1)
        pwconv1[1].weight.copy_(self.pwconv1[1].weight[:, inverse])
        return with_children(self, large_kernel=sw.train(layer.training), norm=nn.Identity(), se=se,
                             pwconv1=pwconv1)


@dataclasses.dataclass(frozen=True)
class ShiftWiseNetConfig:
    """Architecture of a :class:`ShiftWiseNet` (JSON-serialisable; lists are normalised to tuples).

    Args:
        depths: blocks per stage (default SW-T ``(3, 3, 18, 3)``).
        dims: stage widths (default SW-T ``(80, 160, 320, 640)``).
        kernel_sizes: the large kernel ``K`` of each stage (default ``(51, 49, 47, 13)``).
        small_kernel: ``k``, odd (default 3).
        ghost_ratio: share of channels passed through by each SW layer (default 0.23).
        n_path: parallel small convs per SW layer (default 2).
        n_rep: shuffled copies per plane and direction (default 4).
        merged: the paths merged into one ``LoRA`` conv (default False).
        bn: BatchNorms after the three sums (default True).
        num_classes: head outputs (default 1000).
        in_chans: input channels (default 3).
        layer_scale_init_value: initial ``gamma`` (default 1e-6).
        drop_path_rate: stochastic depth at the last block (default 0).
    """

    depths: Tuple[int, ...] = VARIANTS["sw_tiny"]["depths"]
    dims: Tuple[int, ...] = VARIANTS["sw_tiny"]["dims"]
    kernel_sizes: Tuple[int, ...] = RELEASED["kernel_sizes"]
    small_kernel: int = RELEASED["small_kernel"]
    ghost_ratio: float = RELEASED["ghost_ratio"]
    n_path: int = RELEASED["n_path"]
    n_rep: int = RELEASED["n_rep"]
    merged: bool = False
    bn: bool = True
    num_classes: int = 1000
    in_chans: int = 3
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name in ("depths", "dims", "kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.depths) != 4 or len(self.dims) != 4 or len(self.kernel_sizes) != 4:
            raise ValueError(f"SW needs 4 depths, 4 dims and 4 kernel sizes, got {self.depths}, {self.dims} and "
                             f"{self.kernel_sizes}")
        if self.small_kernel % 2 == 0 or self.small_kernel < 1:
            raise ValueError(f"SW small_kernel must be a positive odd int, got {self.small_kernel}")
        if any(k < 1 for k in self.kernel_sizes):
            raise ValueError(f"SW kernel_sizes must be positive, got {self.kernel_sizes}")


class ShiftWiseNet(FourStageNet):
    """The SW classifier (official ``ShiftWise_v2``). Keyword arguments: :class:`ShiftWiseNetConfig`.

    Shape: ``(B, in_chans, H, W) -> (B, num_classes)``; the two-conv stem divides by 4, each
    downsampling by 2 (224 -> 56, 28, 14, 7).

    Example::

        >>> model = ShiftWiseNet(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 7)).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    config_class = ShiftWiseNetConfig

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = ShiftWiseNetConfig(**kwargs)
        dims = cfg.dims
        self.downsample_layers = stem_and_downsampling(cfg.in_chans, dims)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        self.stages = nn.ModuleList(
            nn.Sequential(*(SWBlock(dims[i], cfg.kernel_sizes[i], cfg.small_kernel, cfg.ghost_ratio, cfg.n_path,
                                    cfg.n_rep, cfg.bn, cfg.merged, rates[i][j], cfg.layer_scale_init_value)
                            for j in range(cfg.depths[i])))
            for i in range(4))
        self._add_head(dims[-1], cfg.num_classes)
        self.apply(_init_weights)


def sw_layers(model: nn.Module) -> "collections.OrderedDict[str, SWLayer]":
    """``{name: SWLayer}`` of a model, in module order."""
    return collections.OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, SWLayer))


FAMILY = Family("sw", "SW", ShiftWiseNet, VARIANTS, detect, infer_config)
