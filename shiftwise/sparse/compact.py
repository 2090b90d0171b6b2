"""Compaction: physically remove the masked tiles, for inference at the cost of the kept ones."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..convert.swap import convert_model
from ..modules import ShiftWiseConv2d
from .masking import TileMasker, find_layers


def compact(model: nn.Module, masks: Union[TileMasker, Dict[str, Tensor]], inplace: bool = False,
            tile_size: Optional[int] = None, backend: Optional[str] = None) -> nn.Module:
    """A model whose ``ShiftWiseConv2d`` layers hold only their unmasked tiles.

    Each masked layer becomes ``set_tiles(weight[keep], plan.select(keep))``: channels keep
    different tile counts, outputs are those of the masked model (the removed tiles were
    zero), and forward cost follows the kept tiles. Element masks of dense layers stay as
    zeros. ``masks`` is a :class:`TileMasker` or its ``masks`` dict (layer name -> ``(T,)``
    bool). The model is copied unless ``inplace``.

    A model with SW layers in training form (masked by plane) is converted instead: its masked
    planes are zeroed and :func:`~shiftwise.convert.swap.convert_model` (eval mode, ``tile_size``,
    ``backend``) merges the paths, folds the BatchNorms and drops the tiles that only pruned
    planes fed, so the result computes the eval-mode masked model at the cost of the kept tiles.

    Example::

        >>> small = compact(model, masker)
        >>> torch.allclose(small(x), model(x), atol=1e-5)
        True
    """
    if isinstance(masks, TileMasker):
        masks = masks.masks
    out = model if inplace else copy.deepcopy(model)
    planes = {l.name: l for l in find_layers(out) if l.kind == "planes"}
    with torch.no_grad():
        for name, mask in masks.items():
            if name in planes:
                _zero_planes(planes[name].module, mask, name)
                continue
            layer = out.get_submodule(name)
            if not isinstance(layer, ShiftWiseConv2d):
                continue
            if mask.shape != (layer.weight.shape[0],):
                raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the layer has "
                                 f"{layer.weight.shape[0]} tiles (already compacted?)")
            keep = mask.to(layer.weight.device, torch.bool)
            layer.set_tiles(layer.weight.detach()[keep], layer.plan.select(keep))
    if planes:
        out = convert_model(out.eval(), tile_size, backend=backend, inplace=True)
    return out


def _zero_planes(layer: nn.Module, mask: Tensor, name: str) -> None:
    """Zero the planes an SW layer's mask removes: ``(P,)`` shared by the paths or ``(paths * P,)``."""
    weights = list(layer.path_weights())
    rows = weights[0].shape[0]
    if mask.numel() not in (rows, rows * len(weights)):
        raise ValueError(f"mask of {name} has {mask.numel()} entries, the layer has {rows} planes in each of "
                         f"{len(weights)} paths")
    per_path = mask.to(weights[0].device, torch.bool).reshape(-1, rows).expand(len(weights), rows)
    for w, m in zip(weights, per_path):
        w.masked_fill_(~m.view(-1, *([1] * (w.dim() - 1))), 0)


def plane_tiles(layer: nn.Module, alive: Optional[Tensor] = None) -> int:
    """Tiles of an SW layer's conversion (``SWBlock.to_shiftwise`` at its own tile size) when only
    the planes ``alive`` (``(P,)`` bool, default all) are non-zero.

    A tile of shift-wise channel ``r`` sits at each offset that one of the three sums reads an
    alive plane of ``r`` at, plus the centre (the residual); each ghost channel has one identity
    tile. Exact unless alive planes cancel to an all-zero tile.
    """
    out, plane, dy, dx = (t.long() for t in layer.entries())
    if alive is not None:
        keep = alive.to(torch.bool).cpu()[plane]
        out, dy, dx = out[keep], dy[keep], dx[keep]
    n, e = layer.rep_n, layer.extra_pad
    centre = torch.arange(n, device=torch.device("cpu"))
    where = torch.stack([torch.cat([out % n, centre]), torch.cat([dy - e, torch.zeros_like(centre)]),
                         torch.cat([dx - e, torch.zeros_like(centre)])])
    return int(torch.unique(where, dim=1).shape[1]) + (layer.channels - n)


def plane_tile_counts(masker: TileMasker) -> Dict[str, Tuple[int, int]]:
    """``{layer: (kept, dense)}``: converted tiles of each SW layer of ``masker``, with its masks and
    with every plane kept (see :func:`plane_tiles`)."""
    return {l.name: (plane_tiles(l.module, masker.alive_rows(l.name)), plane_tiles(l.module))
            for l in masker.layers if l.kind == "planes"}
