"""What a model family tells the generic checkpoint code, and helpers for reading shapes off a state dict.

A family file (``slak.py``, ...) ends with ``FAMILY = Family(...)``; ``shiftwise.models``
registers it. The generic reader (``shiftwise.convert``) strips prefixes and unwraps EMA
weights, then asks each family whether it recognises the keys (``detect``), renames them to
the official names (``rename_keys``) and reads the architecture off the shapes and the file's
training ``args`` (``infer_config``). Conversion to shift-wise form needs nothing here: it is
the ``to_shiftwise()`` method of the family's large-kernel modules.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Tuple

from torch import Tensor, nn

from ..errors import CheckpointError

StateDict = Dict[str, Tensor]


def keep_keys(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """The identity rename: the family's files already use the official names."""
    return state_dict, []


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered model family.

    Args:
        name: registry key, ``--family`` value and the family stored in converted files (``"slak"``).
        title: the name in messages (``"SLaK"``).
        model_class: the architecture; ``model_class(**config_fields)`` builds it and
            ``model_class.config_class`` is its frozen config dataclass.
        variants: registered model names -> config defaults (``{"slak_tiny": {...}}``).
        detect: ``detect(state_dict) -> bool``, on keys stripped of ``module.``/``backbone.``
            but not yet renamed (so it must know the family's old names too).
        infer_config: ``infer_config(state_dict, hints) -> {"name", "kwargs"}`` from renamed keys;
            ``hints`` is the file's training ``args`` as a dict (empty when it has none), for what
            the shapes do not tell (SW's large kernels); raises :class:`CheckpointError` when a
            needed key is missing or the hints contradict the shapes.
        rename_keys: ``rename_keys(state_dict) -> (state_dict, notes)``: old or re-hosted key
            names to the official ones, one note per kind of rename (default: none).
    """

    name: str
    title: str
    model_class: type
    variants: Dict[str, dict]
    detect: Callable[[StateDict], bool]
    infer_config: Callable[[StateDict, dict], dict]
    rename_keys: Callable[[StateDict], Tuple[StateDict, List[str]]] = keep_keys

    def is_instance(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)


# reading an architecture off a state dict ------------------------------------------------------------
def shape_of(sd: StateDict, key: str, title: str) -> Tuple[int, ...]:
    """``sd[key].shape``, or a :class:`CheckpointError` naming the missing key."""
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise CheckpointError(f"{title} weights without {key!r}: incomplete or of an unknown variant of the "
                              "architecture") from None


def block_counts(sd: StateDict, pattern: str) -> Dict[int, int]:
    """``{stage: number of blocks}`` from the keys matching ``pattern`` (groups: stage, block).

    Block numbers must run 0..n-1: a key such as ``stages.0.99999999.gamma`` would otherwise
    build 10^8 blocks.
    """
    blocks: Dict[int, set] = {}
    for key in sd:
        m = re.match(pattern, key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for stage, found in blocks.items():
        if len(found) != max(found) + 1:
            raise CheckpointError(f"stage {stage} numbers its blocks with gaps (highest {max(found)}, "
                                  f"{len(found)} present): incomplete or corrupt weights")
    return {s: len(b) for s, b in blocks.items()}


def variant_name(variants: Dict[str, dict], identity: dict, default: str) -> str:
    """The registered variant whose fields in ``identity`` match, else ``default`` (the family name)."""
    for name, variant in variants.items():
        if all(list(variant.get(k, ())) == v for k, v in identity.items()):
            return name
    return default
