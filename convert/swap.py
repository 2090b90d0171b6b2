"""Swap the large-kernel modules of a reference model for equivalent :class:`ShiftWiseConv2d` (in memory).

What is replaced (every BatchNorm folded with its running statistics, so the model must be in
eval mode):

* SLaK and RepLKNet: each ``large_kernel`` (``LoRA1`` + ``LoRA2`` or ``lkb_origin``, plus
  ``small_conv``; or the merged ``lkb_reparam``). Branches are tiled separately, so SLaK's
  ``51 x 5`` + ``5 x 51`` + ``5 x 5`` become 11 + 11 + 1 - 2 = 21 tiles per channel, not 121.
* UniRepLKNet: each dilated reparam block ``dwconv`` (``lk_origin`` and the dilated branches,
  dilated kernels written densely) together with the block's post-conv ``norm`` BN, which becomes
  ``nn.Identity``. The summed kernel is ``K x K`` (13 in every released variant) and is tiled
  as one. Plain 3x3 blocks stay as they are.

The default tile size is the model's small kernel: SLaK's ``kernel_size[-1]`` and RepLKNet's
``small_kernel`` (5 in every released variant; 5 for RepLKNet-XL, which has none). For
UniRepLKNet it is 5, the largest undilated branch: a 13x13 kernel is then 3 x 3 = 9 tiles per
channel (tile 3 needs 25 tiles, the same number of taps, in more, smaller convs).

The converted state dict holds each ``ShiftWiseConv2d``'s tiles, bias and tile plan (int32
buffers), so ``model.load_state_dict(converted.state_dict())`` restores it exactly. Rebuilding
from metadata: ``create_model(name, **kwargs).eval()``, :func:`convert_model` with the same
``tile_size``, then ``load_state_dict``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from shiftwise.models import model_family
from shiftwise.models._layers import ReparamLargeKernelConv
from shiftwise.models.unireplknet import DilatedReparamBlock, UniRepLKNetBlock
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.tiling import dilate_kernel, fold_bn, split_kernel

UNIREPLKNET_TILE_SIZE = 5


def default_tile_size(model: nn.Module) -> int:
    """The model's small kernel (SLaK, RepLKNet), or 5 (UniRepLKNet, RepLKNet-XL)."""
    family = model_family(model)
    if family == "slak":
        return model.config.kernel_size[-1]
    if family == "replknet":
        return model.config.small_kernel or 5
    return UNIREPLKNET_TILE_SIZE


def convert_model(model: nn.Module, tile_size: Optional[int] = None, backend: Optional[str] = None,
                  layout: str = "auto", inplace: bool = False) -> nn.Module:
    """The model with every large-kernel module replaced by an equivalent ``ShiftWiseConv2d``.

    Args:
        model: a SLaK, RepLKNet or UniRepLKNet from :mod:`shiftwise.models`, in eval mode (its
            BatchNorm running statistics are folded in; a BatchNorm in training mode is refused).
        tile_size: tile side ``N`` (default :func:`default_tile_size`; any size works, e.g. 3).
        backend: ``backend`` of the new modules (``None``: ``SHIFTWISE_BACKEND`` or auto).
        layout: tile layout, ``"auto"`` (fewest tiles), ``"centered"`` or ``"compact"``.
        inplace: modify ``model`` itself instead of a deep copy (default False).

    Returns:
        The converted model (``model`` itself when ``inplace``), computing the same function up
        to floating-point rounding.

    Example::

        >>> from shiftwise.models import create_model
        >>> model = create_model("slak_demo").eval()
        >>> sw = convert_model(model)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> torch.allclose(sw(x), model(x), atol=1e-4)
        True
    """
    tile = default_tile_size(model) if tile_size is None else tile_size
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile!r}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, ReparamLargeKernelConv)
               or (isinstance(m, UniRepLKNetBlock) and isinstance(m.dwconv, DilatedReparamBlock))]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no large-kernel module left to convert (already converted?)")
    for name, m in targets:
        bns = _batchnorms(m)
        if any(bn.training for bn in bns):
            raise ValueError(f"{name} is in training mode: its BatchNorm would use batch statistics, so "
                             f"folding the running statistics changes the output; call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        for name, _ in targets:
            m = model.get_submodule(name)
            if isinstance(m, ReparamLargeKernelConv):
                new = ShiftWiseConv2d.from_branches(m.branches(), tile, layout=layout, backend=backend)
                _replace(model, name, new.train(m.training))
            else:
                m.dwconv = _convert_dilated(m.dwconv, m.norm, tile, layout, backend).train(m.training)
                m.norm = nn.Identity()
    return model


def _batchnorms(m: nn.Module) -> list:
    if isinstance(m, ReparamLargeKernelConv):
        return [bn for _, bn in m.branches() if bn is not None]
    bns = [bn for _, bn, _ in m.dwconv.branches() if bn is not None]
    return bns + ([m.norm] if isinstance(m.norm, nn.BatchNorm2d) else [])


def _convert_dilated(dw: DilatedReparamBlock, norm: nn.Module, tile: int, layout: str,
                     backend: Optional[str]) -> ShiftWiseConv2d:
    """Sum the BN-folded branches into one dense ``K x K`` kernel, fold ``norm``, and tile it."""
    k = dw.kernel_size
    weight = bias = None
    for conv, bn, rate in dw.branches():
        w = dilate_kernel(conv.weight, rate) if rate > 1 else conv.weight[:, 0]
        b = conv.bias
        if bn is not None:
            w, b = fold_bn(w, b, bn)
        pad = (k - w.shape[-1]) // 2
        w = F.pad(w, [pad] * 4)
        weight = w if weight is None else weight + w
        if b is not None:
            bias = b if bias is None else bias + b
    if isinstance(norm, nn.BatchNorm2d):
        weight, bias = fold_bn(weight, bias, norm)
    tiles, plan = split_kernel(weight, tile, layout)
    return ShiftWiseConv2d.from_tiles(tiles, plan, bias, kernel_size=(k, k), backend=backend)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def tile_counts(model: nn.Module) -> dict:
    """Per ``ShiftWiseConv2d`` of a converted model: its geometry and tile count.

    Returns ``{module name: {"channels", "kernel_size", "tile_size", "tiles", "tiles_per_channel"}}``
    in module order; ``tiles_per_channel`` is an int when every channel has the same count, else
    the mean.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ShiftWiseConv2d):
            info = m.plan.info
            per = info.uniform if info.uniform is not None else info.num_tiles / info.channels
            out[name] = {"channels": m.in_channels, "kernel_size": tuple(m.kernel_size), "tile_size": m.small_kernel,
                         "tiles": info.num_tiles, "tiles_per_channel": per}
    return out
