"""From a loaded checkpoint object to a state dict with the official key names and its architecture.

Generic steps here: take the state dict out of its container (``model``, ``model_ema`` with
``ema``, ``state_dict``, or a flat dict) and strip the ``module.`` (DataParallel) and
``backbone.`` (OpenMMLab) prefixes. The family-specific steps are the registered family's:
which family the keys belong to (``detect``), its old or re-hosted names (``rename_keys``) and
its architecture read off the shapes (``infer_config``); see :mod:`shiftwise.models`.
"""
from __future__ import annotations

import argparse
import re
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from shiftwise.errors import CheckpointError
from shiftwise.models import FAMILIES
from shiftwise.models._family import Family

PREFIXES = ("module.", "backbone.")
_PREFIX_RE = re.compile(r"(?:module\.|backbone\.)*")


def is_state_dict(obj) -> bool:
    """A non-empty dict of string keys to tensors."""
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, Tensor) for v in obj.values()))


def unwrap(obj, path: str, ema: bool = False) -> Tuple[Dict[str, Tensor], dict]:
    """``(state dict, hints)`` inside a loaded checkpoint; hints are the training ``args`` (an
    ``argparse.Namespace`` or a dict, as SLaK and SW save them) as a dict, else empty.

    Takes ``model_ema`` when ``ema``, else ``model``, ``state_dict`` or the object itself.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        hints = dict(vars(args))
    elif isinstance(args, dict) and not is_state_dict(args):
        hints = {k: v for k, v in args.items() if isinstance(k, str)}
    else:
        hints = {}
    if ema:
        if not is_state_dict(obj.get("model_ema")):
            raise CheckpointError(f"{path} has no EMA weights ('model_ema'); drop --ema "
                                  f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        return obj["model_ema"], hints
    for key in ("model", "state_dict"):
        if is_state_dict(obj.get(key)):
            return obj[key], hints
    if is_state_dict(obj):
        return obj, hints
    raise CheckpointError(f"{path} holds no state dict: expected 'model', 'state_dict' or a flat dict of tensors "
                          f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")


def strip_prefixes(state_dict: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Keys without leading ``module.`` / ``backbone.`` (any number, any order); notes on what was stripped."""
    out, stripped = {}, set()
    for key, value in state_dict.items():
        prefixes = _PREFIX_RE.match(key).group(0)
        stripped.update(p for p in PREFIXES if p in prefixes)
        out[key[len(prefixes):]] = value
    return out, [f"stripped {p!r}" for p in PREFIXES if p in stripped]


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}") from None


def detect_family(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """The registered family whose ``detect`` recognises the keys (prefixes stripped), or ``None``."""
    found = [f.name for f in FAMILIES.values() if f.detect(state_dict)]
    if len(found) > 1:
        raise CheckpointError(f"the weights match several families ({', '.join(found)}); pass --family")
    return found[0] if found else None


def normalize_keys(state_dict: Dict[str, Tensor], family: Optional[str] = None
                   ) -> Tuple[Dict[str, Tensor], List[str]]:
    """Rename keys to the official ones; returns the new dict and notes on what was renamed.

    Strips ``module.`` / ``backbone.`` prefixes, then applies the renames of ``family`` (default:
    the detected one): SLaK's old ``Decom1``/``Decom2`` -> ``LoRA1``/``LoRA2``, mmpretrain's
    RepLKNet ``head.fc.*`` -> ``head.*`` and ``stages.<last>.norm.*`` -> ``norm.*``.

    Example::

        >>> sd, notes = normalize_keys({"module.downsample_layers.0.0.weight": w,
        ...                             "module.stages.0.0.large_kernel.Decom1.conv.weight": w})
        >>> list(sd), notes
        (['downsample_layers.0.0.weight', 'stages.0.0.large_kernel.LoRA1.conv.weight'],
         ["stripped 'module.'", 'renamed Decom1/Decom2 to LoRA1/LoRA2'])
    """
    out, notes = strip_prefixes(state_dict)
    name = family if family is not None else detect_family(out)
    if name is None:
        return out, notes
    out, renamed = _family(name).rename_keys(out)
    return out, notes + renamed


def _lookalike(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """What a state dict of no registered family resembles, when that explains the refusal."""
    if "downsample_layers.0.0.weight" in state_dict and any(".dwconv." in k for k in state_dict):
        return ("ConvNeXt-style weights without large kernels (no SLaK large_kernel, no UniRepLKNet SE blocks): "
                "nothing to convert")
    return None


def infer_config(state_dict: Dict[str, Tensor], family: Optional[str] = None, source: str = "the checkpoint",
                 hints: Optional[dict] = None) -> Tuple[str, dict]:
    """``(family, {"name", "kwargs"})`` of the architecture whose weights ``state_dict`` holds.

    ``state_dict`` has the official key names (see :func:`normalize_keys`). The family comes
    from the key names and the architecture (depths, widths, kernels, small kernel, form,
    classes) from the tensor shapes; ``hints`` (the file's training ``args``, see :func:`unwrap`)
    give what the shapes do not (SW's large kernels). ``family`` (if given) must agree.
    """
    expected = _family(family) if family is not None else None
    found = detect_family(state_dict)
    if found is None:
        hint = _lookalike(state_dict)
        if hint:
            raise CheckpointError(f"{source} holds {hint}")
        first = ", ".join(list(state_dict)[:3])
        titles = [f.title for f in FAMILIES.values()]
        known = ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else "".join(titles)
        raise CheckpointError(f"{source} is not a {known} state dict (first keys: {first})")
    if expected is not None and expected.name != found:
        raise CheckpointError(f"{source} is a {FAMILIES[found].title} checkpoint, not {expected.title} "
                              f"(--family {family}); pass --family {found} or leave it out")
    try:
        return found, FAMILIES[found].infer_config(state_dict, dict(hints or {}))
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
