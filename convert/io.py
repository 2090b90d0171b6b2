"""Reading and writing checkpoints: official and converted files in, models and converted files out.

* :func:`read_checkpoint` reads a file safely (:mod:`.safe`), takes the state dict out of its
  container, renames keys to the official names and infers the family and architecture
  (:mod:`.keys`, with each family's renames and inference from :mod:`shiftwise.models`);
* :func:`build_model` / :func:`load_model` rebuild the model (official or converted) in eval mode;
* :func:`convert_checkpoint` converts a file and writes the result atomically with the
  metadata needed to rebuild it, as a torch file or safetensors.

Every file shiftwise writes (``convert``'s output, ``train``'s ``checkpoint.pt`` and
``compact.pt``) carries the same metadata under the key ``"shiftwise"`` (:func:`describe`):
what kind of file it is, the family and architecture config, the tile size and tile counts,
the evaluation size and preprocessing, the sha256 and name of the file it was made from and of
the official checkpoint at the root of that chain. So each of them reads back with
:func:`read_checkpoint`, and the literal name ``demo`` reads the embedded demo checkpoint.

Every problem with an input file raises :class:`shiftwise.CheckpointError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
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
from shiftwise.data import CROP_PCT, EvalTransform, package_file, transform_for
from shiftwise.errors import CheckpointError, OutputExistsError
from shiftwise.models import FAMILIES, create_model, model_config, model_family
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.outputs import atomic, claim

from .keys import infer_config, is_state_dict, normalize_keys, unwrap
from .safe import safe_load, sha256_file
from .swap import convert_model

__all__ = [
    "DEMO", "KINDS", "Checkpoint", "CheckpointError", "ConvertReport", "FAMILY_NAMES", "build_model",
    "checkpoint_from", "checkpoint_path", "convert_checkpoint", "converted_metadata", "demo_path", "describe", "infer_config",
    "load_model", "normalize_keys", "preprocessing_for", "read_checkpoint", "safe_load", "save_converted",
    "sha256_file", "tile_counts", "tile_size_of",
]

logger = logging.getLogger(__name__)

FORMAT = "shiftwise-converted"
FORMAT_VERSION = 2  # 1: converted files only, without kind, preprocessing, origin and tile counts
KINDS = ("official", "converted", "train", "compact")
MAX_INPUT_SIZE = 8192  # larger evaluation sizes in a file's hints are ignored
DEMO = "demo"  # the checkpoint name of the embedded demo
DEMO_FILE = "slak_demo.pth"


def demo_path() -> str:
    """The path of the embedded demo checkpoint (a small SLaK trained on the embedded digits)."""
    with importlib.resources.as_file(package_file(DEMO_FILE)) as path:
        return str(path)


def checkpoint_path(name) -> str:
    """``name`` as a path: the literal ``"demo"`` is the embedded demo checkpoint."""
    name = os.fspath(name)
    return demo_path() if name == DEMO else name


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
    sha256: Optional[str]  # None when the reader did not need it (:func:`checkpoint_from`)
    state_dict: Dict[str, Tensor]
    family: str
    config: dict
    converted: bool = False  # shift-wise layers: every kind but "official" and a train file of the training form
    tile_size: Optional[int] = None
    input_size: Optional[int] = None  # evaluation resolution, when the file says (SLaK's args, our metadata)
    notes: List[str] = dataclasses.field(default_factory=list)  # key renames applied
    kind: str = "official"  # one of KINDS
    preprocessing: Optional[dict] = None  # {"mean", "std", "crop_pct"} when the file records it
    source_sha256: Optional[str] = None  # the file this one was made from
    source_name: Optional[str] = None
    origin_sha256: Optional[str] = None  # the official checkpoint at the root of the chain (None: from scratch)
    origin_name: Optional[str] = None
    tiles: Optional[dict] = None  # {"kept", "dense"}: alive tiles, and tiles of the full conversion
    meta: dict = dataclasses.field(default_factory=dict)  # the file's shiftwise metadata, as stored

    @property
    def description(self) -> str:
        return f"{FAMILIES[self.family].title} {self.config['name']}"

    @property
    def density(self) -> Optional[float]:
        """Alive tiles over the tiles of the full conversion (None for an official file)."""
        if not self.tiles or not self.tiles.get("dense"):
            return None
        return self.tiles["kept"] / self.tiles["dense"]

    def transform(self, size: Optional[int] = None):
        """The evaluation transform of this checkpoint at ``size`` (default: its own, else 224)."""
        size = size if size is not None else (self.input_size or 224)
        pre = self.preprocessing or preprocessing_for(self.config)
        return EvalTransform(size, pre["mean"], pre["std"], pre.get("crop_pct", CROP_PCT))


def read_checkpoint(path, ema: bool = False, family: Optional[str] = None) -> Checkpoint:
    """Read an official or converted checkpoint file (never runs pickled code).

    Args:
        path: ``.pth``/``.pt`` (``torch.save``) or ``.safetensors``.
        ema: take the EMA weights (SLaK's and SW's ``model_ema``, a training checkpoint's ``ema``).
        family: expected family (``"slak"``, ``"replknet"``, ``"unireplknet"``, ``"sw"``); inferred if None.

    Example::

        >>> ckpt = read_checkpoint("SLaK_tiny_checkpoint.pth")
        >>> ckpt.family, ckpt.config["name"], len(ckpt.state_dict)
        ('slak', 'slak_tiny', 470)
    """
    path = checkpoint_path(path)
    return checkpoint_from(safe_load(path), path, sha256_file(path), ema, family)


def checkpoint_from(obj, path: str, digest: Optional[str] = None, ema: bool = False,
                    family: Optional[str] = None) -> Checkpoint:
    """The :class:`Checkpoint` of an object already read from ``path`` with :func:`safe_load`
    (``digest``: its sha256, when the caller needs it); see :func:`read_checkpoint`."""
    if isinstance(obj, dict) and isinstance(obj.get("shiftwise"), dict):
        return _read_described(obj, path, digest, family, ema)
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith(("shiftwise-train/", "shiftwise-compact/")):
        raise CheckpointError(f"{path} was written by an earlier shiftwise train, without the metadata that rebuilds "
                              "its model; train it again with this version")
    state_dict, hints = unwrap(obj, path, ema)
    state_dict, notes = normalize_keys(state_dict, family)
    found, config = infer_config(state_dict, family, path, hints)
    input_size = hints.get("input_size")
    if not (isinstance(input_size, int) and 1 <= input_size <= MAX_INPUT_SIZE):
        if input_size is not None:
            logger.warning("%s: ignoring args.input_size=%.40r (not an image size in 1..%d)", path, input_size,
                           MAX_INPUT_SIZE)
        input_size = None
    if hints.get("model"):
        logger.debug("%s: args.model=%r, inferred %s", path, hints["model"], config)
    return Checkpoint(path, digest, state_dict, found, config, input_size=input_size, notes=notes)


def _read_described(obj: dict, path: str, digest: Optional[str], family: Optional[str], ema: bool) -> Checkpoint:
    meta = obj["shiftwise"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has shiftwise metadata of an unknown format {meta.get('format')!r}")
    kind = meta.get("kind", "converted")
    if kind not in KINDS[1:]:
        raise CheckpointError(f"{path}: its shiftwise metadata names an unknown kind of file {kind!r}")
    key = meta.get("weights", "state_dict")
    if ema:
        key = meta.get("ema_weights")
        if not key:
            raise CheckpointError(f"{path} holds no EMA weights ({kind} file); use its weights instead")
    if not isinstance(key, str) or not is_state_dict(obj.get(key)):
        raise CheckpointError(f"{path}: its shiftwise metadata points at weights {key!r} that it does not hold")
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
    config, sd = meta.get("model"), obj[key]
    if not (isinstance(config, dict) and isinstance(config.get("name"), str)
            and isinstance(config.get("kwargs"), dict)):
        raise CheckpointError(f"{path}: its shiftwise metadata has no model config ({{'name', 'kwargs'}})")
    tiles = {tuple(sd[k[: -len("tile_offsets")] + "weight"].shape[-2:]) for k in sd if k.endswith(".tile_offsets")
             and k[: -len("tile_offsets")] + "weight" in sd}
    tile_size = meta.get("tile_size")
    # an SW network trains in its own form: a train file of it holds no tile plans
    training_form = kind == "train" and not tiles and tile_size is None and meta.get("family") == "sw"
    if not training_form and tiles != {(tile_size, tile_size)}:
        raise CheckpointError(f"{path}: its metadata says tile size {tile_size!r} but its shift-wise weights have "
                              f"tiles of {sorted(tiles) or 'no shape'}")
    input_size = meta.get("input_size")
    if not (isinstance(input_size, int) and 1 <= input_size <= MAX_INPUT_SIZE):
        input_size = None
    source = _sha(meta.get("source_sha256"))
    origin = _sha(meta.get("origin_sha256")) if "origin_sha256" in meta else source  # format 1: source is official
    origin_name = meta.get("origin_name") if "origin_sha256" in meta else meta.get("source_name")
    tiles = _valid_tiles(meta.get("tiles"))
    if tiles is None:
        kept, total = tile_counts(sd)
        tiles = {"kept": kept, "dense": total}
    return Checkpoint(path, digest, sd, found, config, converted=not training_form, tile_size=tile_size,
                      input_size=input_size,
                      kind=kind, preprocessing=_valid_preprocessing(meta.get("preprocessing")),
                      source_sha256=source, source_name=_text(meta.get("source_name")), origin_sha256=origin,
                      origin_name=_text(origin_name), tiles=tiles, meta=meta)


def _sha(value) -> Optional[str]:
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


def _text(value) -> Optional[str]:
    return value[:200] if isinstance(value, str) else None


def _valid_tiles(tiles) -> Optional[dict]:
    """The file's tile counts when they are consistent, else None (then counted from the weights)."""
    if not (isinstance(tiles, dict) and all(isinstance(tiles.get(k), int) and tiles[k] >= 0 for k in ("kept", "dense"))
            and tiles["kept"] <= tiles["dense"]):
        return None
    out = {"kept": tiles["kept"], "dense": tiles["dense"]}
    layers = tiles.get("layers")
    if isinstance(layers, dict) and all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in layers.items()):
        out["layers"] = dict(layers)
    return out


def _valid_preprocessing(pre) -> Optional[dict]:
    """The file's mean/std/crop_pct when they are three positive-std channels and a fraction, else None."""
    if not isinstance(pre, dict):
        return None
    mean, std, crop = pre.get("mean"), pre.get("std"), pre.get("crop_pct", CROP_PCT)
    numbers = (int, float)
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3
            and all(isinstance(v, numbers) for v in mean + std) and all(v > 0 for v in std)
            and isinstance(crop, numbers) and 0 < crop <= 1):
        return None
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "crop_pct": float(crop)}


def preprocessing_for(config: Optional[dict]) -> dict:
    """``{"mean", "std", "crop_pct"}`` of the sources' evaluation transform for a model config."""
    t = transform_for(config)
    return {"mean": [round(v, 6) for v in t.mean.flatten().tolist()], "std": [round(v, 6) for v in t.std.flatten().tolist()],
            "crop_pct": t.crop_pct}


def tile_counts(state_dict: Dict[str, Tensor]) -> tuple:
    """``(alive, total)`` tiles of the shift-wise layers of a state dict (a tile is alive when not all zero)."""
    alive = total = 0
    for key, value in state_dict.items():
        if key.endswith(".tile_offsets"):
            weight = state_dict.get(key[: -len("tile_offsets")] + "weight")
            if weight is not None and weight.dim() == 3:
                total += weight.shape[0]
                alive += int(weight.detach().flatten(1).ne(0).any(1).sum())
    return alive, total


def _load_strict(model: nn.Module, state_dict: Dict[str, Tensor], what: str) -> None:
    """Load every key of ``model`` from ``state_dict`` (no key left over, none missing), or raise
    :class:`CheckpointError`. Keys a module fills in itself when a file lacks them (the tables of
    an SW layer, replayed from its configuration) do not count as missing; a module that finds a
    present one wrong reports it, as one line."""
    own = model.state_dict()
    state_dict = dict(state_dict)
    for key, value in own.items():  # files from before BatchNorm counted its batches
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and not _shape_compatible(model, k, state_dict[k], own[k])]
    if unexpected or shapes:
        missing = [k for k in own if k not in state_dict and not _replayed(model, k)]
        raise CheckpointError(_mismatch_message(what, missing, unexpected, shapes, state_dict, own))
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # a module's own check (e.g. an SW table that is not the replayed one)
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"weights do not fit {what}: {lines[0] if lines else str(exc)[:200]}"
                              + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")) from None
    if result.missing_keys:
        raise CheckpointError(_mismatch_message(what, result.missing_keys, [], [], state_dict, own))


def _replayed(model: nn.Module, key: str) -> bool:
    """Whether the module owning ``key`` says it rebuilds that buffer itself when a file lacks it
    (its ``replayed_buffers``); only for the message: loading finds what is really missing."""
    prefix, _, name = key.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    return name in getattr(owner, "replayed_buffers", ())


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
    """The eval-mode model of a :class:`Checkpoint`: converted files come back converted, a train file
    of an SW network's training form (no tile plans) in that form."""
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
    """An eval-mode ``nn.Module`` from an official SLaK/RepLKNet/UniRepLKNet/SW file or a converted one.

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


def describe(model: nn.Module, kind: str, source: Optional[Checkpoint] = None, input_size: Optional[int] = None,
             preprocessing: Optional[dict] = None, dense_tiles: Optional[int] = None, kept_tiles: Optional[int] = None,
             layer_tiles: Optional[Dict[str, int]] = None, ema: bool = False, **extra) -> dict:
    """The metadata that makes a file of shift-wise ``model`` self-describing (JSON-serialisable).

    Args:
        model: the shift-wise model whose state dict the file holds (masked tiles are zero); for
            kind ``"train"`` also an SW network in its training form (``tile_size`` None).
        kind: ``"converted"``, ``"train"`` or ``"compact"``.
        source: the checkpoint the model was made from (None: trained from scratch); its
            sha256 and name are recorded, and the official checkpoint at the root of its chain.
        input_size, preprocessing: evaluation size and ``{"mean", "std", "crop_pct"}`` (default:
            the source's, else the family's evaluation transform).
        dense_tiles: tiles of the full conversion (default: the source's, else the model's).
        kept_tiles: tiles alive (default: the tiles that are not all zero).
        layer_tiles: each shift-wise layer's tiles in the full conversion (recorded when given).
        ema: the weights are an exponential moving average.
        extra: more entries (``weights``/``ema_weights``: the keys of the state dicts in the file).
    """
    if kind not in KINDS[1:]:
        raise ValueError(f"kind must be one of {KINDS[1:]}, got {kind!r}")
    family, config = model_family(model), model_config(model)
    shiftwise_layers = any(isinstance(m, ShiftWiseConv2d) for m in model.modules())
    if not shiftwise_layers and kind != "train":
        raise ValueError(f"a {kind} file holds a model with ShiftWiseConv2d layers; this {type(model).__name__} "
                         "has none (convert it first)")
    alive, held = tile_counts(model.state_dict())
    kept = kept_tiles if kept_tiles is not None else alive
    if dense_tiles is None:
        dense_tiles = source.tiles["dense"] if source is not None and source.tiles and source.tiles["dense"] else held
    origin = origin_name = None
    if source is not None:
        official = source.kind == "official"
        origin = source.sha256 if official else source.origin_sha256
        origin_name = os.path.basename(source.path) if official else source.origin_name
    if preprocessing is None:
        preprocessing = (source.preprocessing if source is not None else None) or preprocessing_for(config)
    if input_size is None and source is not None:
        input_size = source.input_size
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "family": family, "model": config,
            "tile_size": tile_size_of(model) if shiftwise_layers else None, "shiftwise_version": __version__,
            "source_sha256": source.sha256 if source is not None else None,
            "source_name": os.path.basename(source.path) if source is not None else None,
            "origin_sha256": origin, "origin_name": origin_name, "input_size": input_size,
            "preprocessing": preprocessing, "tiles": {"kept": kept, "dense": max(int(dense_tiles), kept),
                                                      **({"layers": dict(layer_tiles)} if layer_tiles else {})},
            "ema": ema, **extra}


def converted_metadata(model: nn.Module, family: str, config: dict, source_sha256: str, source_name: str,
                       input_size: Optional[int] = None, ema: bool = False) -> dict:
    """The metadata of a conversion of the official file with ``source_sha256`` (see :func:`describe`)."""
    source = Checkpoint(source_name, source_sha256, {}, family, config, input_size=input_size)
    meta = describe(model, "converted", source, ema=ema)
    if meta["family"] != family:
        raise ValueError(f"model is a {meta['family']} network, not {family}")
    return meta


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
        src: official SLaK/RepLKNet/UniRepLKNet/SW file, or an SW train file of the training form (never modified).
        dst: output path; refused if it exists unless ``force``, and always if it is ``src``.
        tile_size: tile side ``N`` (default: the model's small kernel, 5 for SLaK and RepLKNet).
        family: expected family; inferred when None.
        ema: convert the ``model_ema`` weights (SLaK, SW).
        safetensors: write safetensors (default: when ``dst`` ends in ``.safetensors``).

    Example::

        >>> convert_checkpoint("SLaK_tiny_checkpoint.pth", "slak_tiny_sw.pth").tiles
    """
    src, dst = checkpoint_path(src), os.fspath(dst)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise OutputExistsError(f"output {dst} is the source checkpoint; write the conversion to another file")
    claim(dst, force)  # fail before the (slow) read and conversion
    ckpt = read_checkpoint(src, ema=ema, family=family)
    if ckpt.converted:
        raise CheckpointError(f"{src} is already converted ({ckpt.kind} file, tile {ckpt.tile_size}); convert the "
                              "original checkpoint")
    model = build_model(ckpt)
    config = model_config(model)
    converted = convert_model(model, tile_size=tile_size, inplace=True)
    layers = [m for m in converted.modules() if isinstance(m, ShiftWiseConv2d)]
    if not layers:
        raise CheckpointError(f"{src}: the model has no large-kernel layer to convert")
    meta = describe(converted, "converted", ckpt, ema=ema)
    if safetensors is None:
        safetensors = dst.endswith(".safetensors")
    size = save_converted(converted, dst, meta, force=force, safetensors=safetensors)
    return ConvertReport(src, dst, ckpt.family, config, meta["tile_size"], len(layers),
                         sum(m.weight.shape[0] for m in layers), len(converted.state_dict()), size, ckpt.notes)
