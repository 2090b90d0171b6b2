"""Reference architectures with the official parameter names, and the registry of model families.

Every model keeps its architecture in ``model.config`` (a frozen dataclass), so it can be
rebuilt from JSON-serialisable metadata::

    >>> model = create_model("slak_tiny", num_classes=10)
    >>> meta = model_config(model)            # {"name": "slak_tiny", "kwargs": {...}}
    >>> rebuilt = create_model(meta["name"], **meta["kwargs"])

Names: ``list_models()``; the family names ``"slak"``, ``"replknet"``, ``"unireplknet"`` and
``"sw"`` take the family's config defaults.

A family is one file here ending in ``FAMILY = Family(...)`` (its architecture, key renames,
config inference; its large-kernel modules define ``to_shiftwise()``) plus one
``register_family`` line below.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, Optional

import torch
from torch import nn

from . import replknet, slak, sw, unireplknet
from ._family import Family
from .replknet import RepLKNet, RepLKNetConfig
from .slak import SLaK, SLaKConfig
from .sw import ShiftWiseNet, ShiftWiseNetConfig, SWLayer
from .unireplknet import UniRepLKNet, UniRepLKNetConfig

FAMILIES: Dict[str, Family] = {}  # family name -> Family, in registration order


def _models() -> Dict[str, tuple]:
    """Model name -> (family, config defaults)."""
    out = {}
    for family in FAMILIES.values():
        out[family.name] = (family, {})
        out.update({name: (family, defaults) for name, defaults in family.variants.items()})
    return out


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry: its name and variant names become ``create_model`` names, its
    ``detect`` / ``rename_keys`` / ``infer_config`` take part in reading checkpoints. Returns it."""
    taken = set(_models())
    clash = sorted(({family.name} | set(family.variants)) & taken)
    if clash:
        raise ValueError(f"family {family.name!r}: model name(s) {clash} already registered")
    if not dataclasses.is_dataclass(getattr(family.model_class, "config_class", None)):
        raise ValueError(f"family {family.name!r}: {family.model_class.__name__}.config_class must be a dataclass")
    FAMILIES[family.name] = family
    return family


register_family(slak.FAMILY)
register_family(replknet.FAMILY)
register_family(unireplknet.FAMILY)
register_family(sw.FAMILY)


def list_models(pattern: Optional[str] = None) -> list:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"unireplknet_*"``)."""
    names = sorted(_models())
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name``; ``kwargs`` override its config fields.

    Example::

        >>> create_model("replknet_31b", num_classes=21841).head.out_features
        21841
    """
    try:
        family, defaults = _models()[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}") from None
    cls = family.model_class
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name!r}; its config fields are: {', '.join(fields)}")
    model = cls(**{**defaults, **kwargs})
    model.model_name = name
    return model


def model_family(model: nn.Module) -> str:
    """The registered family name of ``model`` (``"slak"``, ``"replknet"``, ``"unireplknet"``, ...)."""
    for family in FAMILIES.values():
        if family.is_instance(model):
            return family.name
    raise ValueError(f"{type(model).__name__} is not a shiftwise.models architecture")


def model_config(model: nn.Module) -> dict:
    """``{"name": ..., "kwargs": {...}}`` such that ``create_model(name, **kwargs)`` rebuilds ``model``.

    Every config field is listed (tuples as lists), so the result is JSON-serialisable and
    independent of later changes of the defaults. A converted model reports the architecture
    it was converted from.
    """
    family = model_family(model)
    return {"name": getattr(model, "model_name", family), "kwargs": _jsonable(dataclasses.asdict(model.config))}


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a new classifier head with ``num_classes`` outputs (for fine-tuning to another
    data set), in place; ``model.config`` follows. The new head starts as a fresh one does
    (truncated normal weights of std 0.02, zero bias). Returns ``model``.

    Example::

        >>> replace_head(create_model("slak_demo"), 5).head.out_features
        5
    """
    model_family(model)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    old = model.head
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{type(model).__name__}.head is a {type(old).__name__}, not a linear classifier")
    head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    model.head = head.train(old.training)
    model.config = dataclasses.replace(model.config, num_classes=num_classes)
    return model


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, layer_scale: float = 1.0, calibrate: Optional[int] = 224) -> nn.Module:
    """Random weights, non-trivial BatchNorm statistics and O(1) layer scale, in place; for tests.

    The released initialisation hides errors: ``gamma`` starts at 1e-6 and BatchNorm at
    identity statistics, so a wrong branch barely moves the logits. Here every weight is
    ``N(0, 1/fan_in)``, other parameters ``N(0, 0.01)`` around their neutral value (1 for norm
    weights) and every layer scale ``gamma`` is ``layer_scale * U(0.5, 1.5)``.

    BatchNorm statistics, with ``calibrate=S`` (default 224): one eval-mode forward of a random
    ``(2, C, S, S)`` batch (``C`` from the first conv) sets each BN's statistics from its own
    input just before it runs, perturbed (mean shifted by ``0.1 std * N(0, 1)``, variance scaled
    by ``U(0.5, 1.5)``). This keeps deep BN-normalised stacks such as RepLKNet at O(1) features;
    made-up statistics make them grow geometrically (logits of 1e8 for RepLKNet-31B). Calibrate
    at the resolution you evaluate: how much of a large kernel falls on the map, hence each BN's
    input scale, depends on it. ``calibrate=None``: means ``N(0, 0.01)``, variances
    ``U(0.5, 1.5)``. The model keeps its train/eval mode. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    def rand(t):
        return torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" and p.dim() == 1:  # layer scale (GRN's gamma is 4-D and stays small)
            p.copy_(layer_scale * (0.5 + rand(p)))
        elif p.dim() > 1 and leaf not in ("gamma", "beta"):
            p.copy_(randn(p) / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * randn(p) + (1.0 if leaf == "weight" else 0.0))
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not calibrate:
        for bn in bns:
            bn.running_mean.copy_(0.1 * randn(bn.running_mean))
            bn.running_var.copy_(0.5 + rand(bn.running_var))
        return model

    def measure(bn, inputs):  # runs before the BN, in forward order: later BNs see these statistics
        x = inputs[0].detach()
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
        var = var.clamp_min(1e-2 * float(var.mean()) + 1e-12)  # no dead channel amplifying rounding
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * randn(mean))
        bn.running_var.copy_(var * (0.5 + rand(var)))

    hooks = [bn.register_forward_pre_hook(measure) for bn in bns]
    training = model.training
    try:
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        x = torch.randn((2, stem.in_channels, calibrate, calibrate), generator=g, dtype=torch.float64)
        model.eval()(x.to(stem.weight))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return model


__all__ = [
    "FAMILIES", "Family", "RepLKNet", "RepLKNetConfig", "SLaK", "SLaKConfig", "SWLayer", "ShiftWiseNet",
    "ShiftWiseNetConfig", "UniRepLKNet", "UniRepLKNetConfig",
    "create_model", "list_models", "model_config", "model_family", "randomize_", "register_family", "replace_head",
]
