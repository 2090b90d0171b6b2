"""Swap the large-kernel modules of a model for equivalent :class:`ShiftWiseConv2d` (in memory).

Which modules, and how, is the model family's business: a module that defines
``to_shiftwise(tile_size, layout=..., backend=...)`` returns its replacement (or ``None`` when it
has nothing to convert), as timm's ``reparameterize_model`` finds ``reparameterize()``. In
:mod:`shiftwise.models`: SLaK's and RepLKNet's ``large_kernel`` (every branch BN-folded and
tiled on its own) and UniRepLKNet's blocks with a dilated reparam ``dwconv`` (the summed kernel
with the block's ``norm`` BN folded in). Every BatchNorm is folded with its running statistics,
so the model must be in eval mode.

The converted state dict holds each ``ShiftWiseConv2d``'s tiles, bias and tile plan (int32
buffers), so ``model.load_state_dict(converted.state_dict())`` restores it exactly. Rebuilding
from metadata: ``create_model(name, **kwargs).eval()``, :func:`convert_model` with the same
``tile_size``, then ``load_state_dict``.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from shiftwise.modules import ShiftWiseConv2d


def _convertible(model: nn.Module) -> list:
    """``(name, module)`` of every module with a ``to_shiftwise()``, outermost first."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "to_shiftwise", None))]


def default_tile_size(model: nn.Module) -> int:
    """The tile size a conversion uses by default: the ``default_tile_size`` of the model's first
    convertible module (the small kernel for SLaK and RepLKNet, 5 for UniRepLKNet and RepLKNet-XL).

    One size for the whole model, so a converted file records a single tile size.
    """
    for _, m in _convertible(model):
        size = getattr(m, "default_tile_size", None)
        if size is not None:
            return int(size)
    raise ValueError(_nothing_to_convert(model))


def convert_model(model: nn.Module, tile_size: Optional[int] = None, backend: Optional[str] = None,
                  layout: str = "auto", inplace: bool = False) -> nn.Module:
    """The model with every large-kernel module replaced by an equivalent ``ShiftWiseConv2d``.

    Args:
        model: any model whose large-kernel modules define ``to_shiftwise()`` (the SLaK, RepLKNet
            and UniRepLKNet of :mod:`shiftwise.models`), in eval mode: BatchNorm running
            statistics are folded in, and a BatchNorm in training mode is refused.
        tile_size: tile side ``N`` (default :func:`default_tile_size`; any size works, e.g. 3).
        backend: ``backend`` of the new modules (``None``: ``SHIFTWISE_BACKEND`` or auto).
        layout: tile layout, ``"auto"`` (fewest tiles), ``"centered"`` or ``"compact"``.
        inplace: modify ``model`` itself instead of a deep copy (default False).

    Returns:
        The converted model (``model`` itself when ``inplace``), computing the same function up
        to floating-point rounding. On an error nothing is changed.

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
    if not inplace:
        model = copy.deepcopy(model)
    replacements, done = [], []
    with torch.no_grad():
        for name, m in _convertible(model):
            if any(name.startswith(prefix) for prefix in done):
                continue  # inside a module already replaced
            try:
                new = m.to_shiftwise(tile, layout=layout, backend=backend)
            except ValueError as exc:
                raise ValueError(f"{name or type(model).__name__}: {exc}") from None
            if new is not None:
                replacements.append((name, new))
                done.append(name + "." if name else "")
    if not replacements:
        raise ValueError(_nothing_to_convert(model))
    for name, new in replacements:  # only once every module converted: an error leaves the model as it was
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _nothing_to_convert(model: nn.Module) -> str:
    return (f"{type(model).__name__} has no large-kernel module left to convert (already converted, or no module "
            "with a to_shiftwise method)")


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
