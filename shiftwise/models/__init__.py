"""Reference architectures with the official parameter names, and a registry of their variants.

Every model keeps its architecture in ``model.config`` (a frozen dataclass), so it can be
rebuilt from JSON-serialisable metadata::

    >>> model = create_model("slak_tiny", num_classes=10)
    >>> meta = model_config(model)            # {"name": "slak_tiny", "kwargs": {...}}
    >>> rebuilt = create_model(meta["name"], **meta["kwargs"])

Names: ``list_models()``; the family names ``"slak"``, ``"replknet"`` and ``"unireplknet"``
take the family's config defaults.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

import torch
from torch import nn

from . import replknet, slak, unireplknet
from .replknet import RepLKNet, RepLKNetConfig
from .slak import SLaK, SLaKConfig
from .unireplknet import UniRepLKNet, UniRepLKNetConfig

FAMILIES = {"slak": SLaK, "replknet": RepLKNet, "unireplknet": UniRepLKNet}
_REGISTRY = {name: (cls, {}) for name, cls in FAMILIES.items()}
for _module, _cls in ((slak, SLaK), (replknet, RepLKNet), (unireplknet, UniRepLKNet)):
    _REGISTRY.update({name: (_cls, defaults) for name, defaults in _module.VARIANTS.items()})


def list_models(pattern: Optional[str] = None) -> list:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"unireplknet_*"``)."""
    names = sorted(_REGISTRY)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name``; ``kwargs`` override its config fields.

    Example::

        >>> create_model("replknet_31b", num_classes=21841).head.out_features
        21841
    """
    try:
        cls, defaults = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}") from None
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name!r}; its config fields are: {', '.join(fields)}")
    model = cls(**{**defaults, **kwargs})
    model.model_name = name
    return model


def model_family(model: nn.Module) -> str:
    """``"slak"``, ``"replknet"`` or ``"unireplknet"``."""
    for family, cls in FAMILIES.items():
        if isinstance(model, cls):
            return family
    raise ValueError(f"{type(model).__name__} is not a shiftwise.models architecture")


def model_config(model: nn.Module) -> dict:
    """``{"name": ..., "kwargs": {...}}`` such that ``create_model(name, **kwargs)`` rebuilds ``model``.

    Every config field is listed (tuples as lists), so the result is JSON-serialisable and
    independent of later changes of the defaults. A converted model reports the architecture
    it was converted from.
    """
    family = model_family(model)
    return {"name": getattr(model, "model_name", family), "kwargs": _jsonable(dataclasses.asdict(model.config))}


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, layer_scale: float = 1.0) -> nn.Module:
    """Random weights, random BatchNorm statistics and O(1) layer scale, in place; for tests.

    The released initialisation hides errors: ``gamma`` starts at 1e-6 and BatchNorm at
    identity statistics, so a wrong branch barely moves the logits. Here every floating
    parameter is ``N(0, 1/fan_in)``-scaled, every ``gamma`` is ``layer_scale * U(0.5, 1.5)``, BN
    running means are ``N(0, 0.1)`` and variances ``U(0.5, 1.5)``. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" and p.dim() == 1:  # layer scale (GRN's gamma is 4-D and stays O(0.1))
            p.copy_(layer_scale * (0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))
        elif p.dim() > 1 and leaf != "gamma" and leaf != "beta":
            fan_in = p[0].numel()
            p.copy_(rand(p.shape, p.dtype) / fan_in ** 0.5)
        else:
            p.copy_(0.1 * rand(p.shape, p.dtype) + (1.0 if leaf == "weight" else 0.0))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * rand(m.running_mean.shape, m.running_mean.dtype))
            m.running_var.copy_((0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
                                .to(m.running_var.dtype))
    return model


__all__ = [
    "FAMILIES", "RepLKNet", "RepLKNetConfig", "SLaK", "SLaKConfig", "UniRepLKNet", "UniRepLKNetConfig",
    "create_model", "list_models", "model_config", "model_family", "randomize_",
]
