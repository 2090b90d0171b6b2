"""Reading and writing checkpoints: official and converted files in, models and converted files out.

* :func:`read_checkpoint` reads a file safely (:mod:`.safe`), takes the state dict out of its
  container, renames keys to the official names and infers the family and architecture
  (:mod:`.keys`, with each family's renames and inference from :mod:`shiftwise.models`);
* :func:`build_model` / :func:`load_model` rebuild the model (official or converted) in eval mode;
* :func:`convert_checkpoint` converts a file and writes the result atomically with the
  metadata needed to rebuild it (family, model config, tile size, shiftwise version, sha256 of
  the source), as a torch file or safetensors.

Every problem with an input file raises :class:`shiftwise.CheckpointError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from shiftwise._version import __version__
from shiftwise.errors import CheckpointError, OutputExistsError
from shiftwise.models import FAMILIES, create_model, model_config
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.outputs import atomic, claim

from .keys import infer_config, is_state_dict, normalize_keys, unwrap
from .safe import safe_load, sha256_file
from .swap import convert_model

__all__ = [
    "Checkpoint", "CheckpointError", "ConvertReport", "FAMILY_NAMES", "build_model", "convert_checkpoint",
    "converted_metadata", "infer_config", "load_model", "normalize_keys", "read_checkpoint", "safe_load",
    "save_converted", "sha256_file", "tile_size_of",
]

logger = logging.getLogger(__name__)

FORMAT = "shiftwise-converted"
FORMAT_VERSION = 1
MAX_INPUT_SIZE = 8192  # larger evaluation sizes in a file's hints are ignored


class _Titles(Mapping):
    """Family name -> title (``"slak"`` -> ``"SLaK"``), following the registry."""

    def __getitem__(self, name: str) -> str:
        return FAMILIES[name].title

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


FAMILY_NAMES = _Titles()


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint file, read and understood.

    ``state_dict`` has the official key names; ``create_model(config["name"], **config["kwargs"])``
    builds the architecture it fits (for a converted file, before conversion with ``tile_size``).
    """

    path: str
    sha256: str
    state_dict: Dict[str, Tensor]
    family: str
    config: dict
    converted: bool = False
    tile_size: Optional[int] = None
    input_size: Optional[int] = None  # evaluation resolution, when the file says (SLaK's args, our metadata)
    notes: List[str] = dataclasses.field(default_factory=list)  # key renames applied

    @property
    def description(self) -> str:
        return f"{FAMILIES[self.family].title} {self.config['name']}"


def read_checkpoint(path, ema: bool = False, family: Optional[str] = None) -> Checkpoint:
    """Read an official or converted checkpoint file (never runs pickled code).

    Args:
        path: ``.pth``/``.pt`` (``torch.save``) or ``.safetensors``.
        ema: take SLaK's ``model_ema`` instead of ``model``.
        family: expected family (``"slak"``, ``"replknet"``, ``"unireplknet"``); inferred if None.

    Example::

        >>> ckpt = read_checkpoint("SLaK_tiny_checkpoint.pth")
        >>> ckpt.family, ckpt.config["name"], len(ckpt.state_dict)
        ('slak', 'slak_tiny', 470)
    """
    path = os.fspath(path)
    obj = safe_load(path)
    digest = sha256_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("shiftwise"), dict):
        return _read_converted(obj, path, digest, family)
    state_dict, hints = unwrap(obj, path, ema)
    state_dict, notes = normalize_keys(state_dict, family)
    found, config = infer_config(state_dict, family, path)
    input_size = hints.get("input_size")
    if not (isinstance(input_size, int) and 1 <= input_size <= MAX_INPUT_SIZE):
        if input_size is not None:
            logger.warning("%s: ignoring args.input_size=%.40r (not an image size in 1..%d)", path, input_size,
                           MAX_INPUT_SIZE)
        input_size = None
    if hints.get("model"):
        logger.debug("%s: args.model=%r, inferred %s", path, hints["model"], config)
    return Checkpoint(path, digest, state_dict, found, config, input_size=input_size, notes=notes)


def _read_converted(obj: dict, path: str, digest: str, family: Optional[str]) -> Checkpoint:
    meta = obj["shiftwise"]
    if meta.get("format") != FORMAT or not is_state_dict(obj.get("state_dict")):
        raise CheckpointError(f"{path} has shiftwise metadata of an unknown format {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer shiftwise ({meta.get('shiftwise_version')}, format "
                              f"{meta.get('format_version')}); upgrade shiftwise to read it")
    found = meta.get("family")
    if found not in FAMILIES:
        raise CheckpointError(f"{path} names an unknown family {found!r}")
    if family is not None and family != found:
        expected = FAMILIES[family].title if family in FAMILIES else family
        raise CheckpointError(f"{path} is a converted {FAMILIES[found].title} checkpoint, not {expected} "
                              f"(--family {family})")
    config, sd = meta.get("model"), obj["state_dict"]
    if not (isinstance(config, dict) and isinstance(config.get("name"), str)
            and isinstance(config.get("kwargs"), dict)):
        raise CheckpointError(f"{path}: its shiftwise metadata has no model config ({{'name', 'kwargs'}})")
    tiles = {tuple(sd[k[: -len("tile_offsets")] + "weight"].shape[-2:]) for k in sd if k.endswith(".tile_offsets")
             and k[: -len("tile_offsets")] + "weight" in sd}
    tile_size = meta.get("tile_size")
    if tiles != {(tile_size, tile_size)}:
        raise CheckpointError(f"{path}: its metadata says tile size {tile_size!r} but its shift-wise weights have "
                              f"tiles of {sorted(tiles) or 'no shape'}")
    input_size = meta.get("input_size")
    if not (isinstance(input_size, int) and 1 <= input_size <= MAX_INPUT_SIZE):
        input_size = None
    return Checkpoint(path, digest, sd, found, config, converted=True, tile_size=tile_size, input_size=input_size)


def _load_strict(model: nn.Module, state_dict: Dict[str, Tensor], what: str) -> None:
    own = model.state_dict()
    state_dict = dict(state_dict)
    for key, value in own.items():  # files from before BatchNorm counted its batches
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and not _shape_compatible(model, k, state_dict[k], own[k])]
    if missing or unexpected or shapes:
        raise CheckpointError(_mismatch_message(what, missing, unexpected, shapes, state_dict, own))
    model.load_state_dict(state_dict, strict=True)


def _shape_compatible(model: nn.Module, key: str, value: Tensor, own: Tensor) -> bool:
    if value.shape == own.shape:
        return True
    # a ShiftWiseConv2d resizes itself to the tile count of the file (sparse or compacted plans)
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return isinstance(owner, ShiftWiseConv2d) and value.dim() == own.dim() and value.shape[1:] == own.shape[1:]


def _mismatch_message(what, missing, unexpected, shapes, sd, own) -> str:
    def few(keys, fmt=str):
        shown = ", ".join(fmt(k) for k in keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        shown = few(shapes, lambda k: f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        parts.append(f"{len(shapes)} wrongly shaped ({shown})")
    if missing and all(k.startswith(("head.", "norm.")) for k in missing):
        cause = "a backbone-only file (detection/segmentation) without the classification head"
    elif any("lkb_reparam" in k for k in unexpected) or any("lkb_reparam" in k for k in missing):
        cause = "a mix of the training (lkb_origin) and merged (lkb_reparam) forms"
    elif any(re.match(r"norm\d\.", k) for k in unexpected):
        cause = "a downstream backbone with per-stage norms (norm0..norm3), not a classifier"
    elif any("mask" in k for k in unexpected):
        cause = "sparse-training masks saved beside the weights"
    else:
        cause = "a variant or code version of the architecture that shiftwise does not know"
    return f"weights do not fit {what}: {'; '.join(parts)}. Likely cause: {cause}"


def _check_fits(ckpt: Checkpoint) -> None:
    """Refuse, before allocating it, an architecture that the file's tensors cannot fill.

    A converted file's config comes from its metadata, which may lie (depths of 10^8, widths of
    10^6): build on the meta device first and compare with the tensors the file holds.
    """
    sd, kwargs = ckpt.state_dict, ckpt.config["kwargs"]
    source = "its metadata" if ckpt.converted else "the inferred shapes"
    try:
        blocks = sum(kwargs.get("depths") or kwargs.get("layers") or ())
        if blocks > len(sd):
            raise ValueError(f"{blocks} blocks, more than the {len(sd)} tensors in the file")
        with torch.device("meta"):
            model = create_model(ckpt.config["name"], **kwargs)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.path}: cannot build {ckpt.config['name']} from {source}: {exc}") from None
    needed = sum(math.prod(v.shape) for v in model.state_dict().values())
    held = sum(v.numel() for v in sd.values())
    if needed > 4 * held + (1 << 20):  # a sparse converted file holds a few times fewer tile weights
        verb = "describes" if ckpt.converted else "describe"
        raise CheckpointError(f"{ckpt.path}: {source} {verb} a {ckpt.config['name']} of {needed:,} values but the "
                              f"file holds only {held:,}: corrupt or forged")


def build_model(ckpt: Checkpoint) -> nn.Module:
    """The eval-mode model of a :class:`Checkpoint` (converted files come back converted)."""
    name, kwargs = ckpt.config["name"], ckpt.config["kwargs"]
    _check_fits(ckpt)
    try:
        model = create_model(name, **kwargs)
    except (ValueError, TypeError) as exc:
        source = "its metadata" if ckpt.converted else "the inferred shapes"
        raise CheckpointError(f"{ckpt.path}: cannot build {name} from {source}: {exc}") from None
    model.eval()
    what = f"{FAMILIES[ckpt.family].title} {name}"
    if ckpt.converted:
        model = convert_model(model, tile_size=ckpt.tile_size, inplace=True)
        what += f" converted with tile {ckpt.tile_size}"
    _load_strict(model, ckpt.state_dict, what)
    return model.eval()


def load_model(path, ema: bool = False, family: Optional[str] = None) -> nn.Module:
    """An eval-mode ``nn.Module`` from an official SLaK/RepLKNet/UniRepLKNet file or a converted one.

    Official files are read safely (``weights_only``), their keys renamed to the official
    names and the architecture inferred from the tensor shapes; converted files (from
    ``shiftwise convert``) are rebuilt from their metadata into ``ShiftWiseConv2d`` models.

    Example::

        >>> model = shiftwise.load_model("SLaK_tiny_checkpoint.pth")          # original
        >>> fast = shiftwise.load_model("slak_tiny_sw.pth")                    # converted
        >>> logits = fast(torch.randn(1, 3, 224, 224))                        # (1, 1000)
    """
    return build_model(read_checkpoint(path, ema=ema, family=family))


# writing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvertReport:
    """What :func:`convert_checkpoint` did."""

    source: str
    output: str
    family: str
    config: dict
    tile_size: int
    layers: int  # ShiftWiseConv2d modules
    tiles: int
    tensors: int
    bytes: int
    notes: List[str]

    def summary(self) -> str:
        return (f"{self.source} ({FAMILIES[self.family].title} {self.config['name']}) -> {self.output}: "
                f"{self.layers} large-kernel layers as ShiftWiseConv2d, tile {self.tile_size}, {self.tiles} tiles, "
                f"{self.tensors} tensors, {self.bytes / 1e6:.1f} MB")


def converted_metadata(model: nn.Module, family: str, config: dict, source_sha256: str, source_name: str,
                       input_size: Optional[int] = None, ema: bool = False) -> dict:
    """The metadata stored with a converted state dict (JSON-serialisable)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": family, "model": config,
            "tile_size": tile_size_of(model), "shiftwise_version": __version__, "source_sha256": source_sha256,
            "source_name": source_name, "input_size": input_size, "ema": ema}


def tile_size_of(model: nn.Module) -> int:
    """The tile size of a converted model's ``ShiftWiseConv2d`` layers."""
    sizes = {m.small_kernel for m in model.modules() if isinstance(m, ShiftWiseConv2d)}
    if len(sizes) != 1:
        raise ValueError(f"expected ShiftWiseConv2d layers of one tile size, found sizes {sorted(sizes)}")
    return sizes.pop()


def save_converted(model: nn.Module, path, metadata: dict, force: bool = False, safetensors: bool = False) -> int:
    """Write ``model``'s state dict with ``metadata`` to ``path`` atomically; returns the bytes written.

    A torch file holds ``{"shiftwise": metadata, "state_dict": ...}``; a safetensors file holds the
    tensors with the metadata as JSON under the header key ``"shiftwise"``. An existing ``path``
    raises :class:`OutputExistsError` unless ``force``.
    """
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if safetensors:
        try:
            from safetensors.torch import save as st_save  # noqa: PLC0415 (optional dependency)
        except ImportError:
            raise CheckpointError("safetensors output needs the safetensors package: pip install safetensors") from None
        data = st_save(_unshared(state_dict), metadata={"shiftwise": json.dumps(metadata)})
    claim(path, force)
    with atomic(path) as tmp, open(tmp, "wb") as f:
        if safetensors:
            f.write(data)
        else:
            torch.save({"shiftwise": metadata, "state_dict": state_dict}, f)
    return os.path.getsize(path)


def _unshared(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    seen, out = set(), {}
    for k, v in state_dict.items():
        v = v.contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.nbytes:
            v = v.clone()  # safetensors refuses tensors that share or partly use a storage
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def convert_checkpoint(src, dst, tile_size: Optional[int] = None, family: Optional[str] = None, ema: bool = False,
                       force: bool = False, safetensors: Optional[bool] = None) -> ConvertReport:
    """Convert an official checkpoint file into a shift-wise one, written atomically to ``dst``.

    Args:
        src: official SLaK/RepLKNet/UniRepLKNet file (never modified).
        dst: output path; refused if it exists unless ``force``, and always if it is ``src``.
        tile_size: tile side ``N`` (default: the model's small kernel, 5 for SLaK and RepLKNet).
        family: expected family; inferred when None.
        ema: convert SLaK's ``model_ema`` weights.
        safetensors: write safetensors (default: when ``dst`` ends in ``.safetensors``).

    Example::

        >>> convert_checkpoint("SLaK_tiny_checkpoint.pth", "slak_tiny_sw.pth").tiles
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise OutputExistsError(f"output {dst} is the source checkpoint; write the conversion to another file")
    claim(dst, force)  # fail before the (slow) read and conversion
    ckpt = read_checkpoint(src, ema=ema, family=family)
    if ckpt.converted:
        raise CheckpointError(f"{src} is already converted (tile {ckpt.tile_size}); convert the original checkpoint")
    model = build_model(ckpt)
    config = model_config(model)
    converted = convert_model(model, tile_size=tile_size, inplace=True)
    layers = [m for m in converted.modules() if isinstance(m, ShiftWiseConv2d)]
    if not layers:
        raise CheckpointError(f"{src}: the model has no large-kernel layer to convert")
    meta = converted_metadata(converted, ckpt.family, config, ckpt.sha256, os.path.basename(src), ckpt.input_size, ema)
    if safetensors is None:
        safetensors = dst.endswith(".safetensors")
    size = save_converted(converted, dst, meta, force=force, safetensors=safetensors)
    return ConvertReport(src, dst, ckpt.family, config, meta["tile_size"], len(layers),
                         sum(m.weight.shape[0] for m in layers), len(converted.state_dict()), size, ckpt.notes)
