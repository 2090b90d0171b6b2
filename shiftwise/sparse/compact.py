"""Compaction: physically remove the masked tiles, for inference at the cost of the kept ones."""
from __future__ import annotations

import copy
from typing import Dict, Union

import torch
from torch import Tensor, nn

from ..modules import ShiftWiseConv2d
from .masking import TileMasker


def compact(model: nn.Module, masks: Union[TileMasker, Dict[str, Tensor]], inplace: bool = False) -> nn.Module:
    """A model whose ``ShiftWiseConv2d`` layers hold only their unmasked tiles.

    Each masked layer becomes ``set_tiles(weight[keep], plan.select(keep))``: channels keep
    different tile counts, outputs are those of the masked model (the removed tiles were
    zero), and forward cost follows the kept tiles. Element masks of dense layers stay as
    zeros. ``masks`` is a :class:`TileMasker` or its ``masks`` dict (layer name -> ``(T,)``
    bool). The model is copied unless ``inplace``.

    Example::

        >>> small = compact(model, masker)
        >>> torch.allclose(small(x), model(x), atol=1e-5)
        True
    """
    if isinstance(masks, TileMasker):
        masks = masks.masks
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            layer = out.get_submodule(name)
            if not isinstance(layer, ShiftWiseConv2d):
                continue
            if mask.shape != (layer.weight.shape[0],):
                raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the layer has "
                                 f"{layer.weight.shape[0]} tiles (already compacted?)")
            keep = mask.to(layer.weight.device, torch.bool)
            layer.set_tiles(layer.weight.detach()[keep], layer.plan.select(keep))
    return out
