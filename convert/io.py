"""Reading official and converted checkpoints, renaming keys, inferring the architecture, writing.

Everything that touches a checkpoint file lives here:

* :func:`read_checkpoint` reads a file safely (``torch.load(weights_only=True)`` with only
  ``argparse.Namespace`` allowed, or safetensors), unwraps ``model`` / ``model_ema`` /
  ``state_dict``, renames keys to the official names (``module.``/``backbone.`` prefixes,
  SLaK's ``Decom1``/``Decom2``, mmpretrain's ``head.fc`` and ``stages.3.norm``) and infers the
  family and architecture from tensor shapes;
* :func:`build_model` / :func:`load_model` rebuild the model (official or converted) in eval mode;
* :func:`convert_checkpoint` converts a file and writes the result atomically with the
  metadata needed to rebuild it (family, model config, tile size, shiftwise version, sha256 of
  the source), as a torch file or safetensors.

Every problem with an input file raises :class:`shiftwise.CheckpointError` with a one-line message.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from shiftwise.convert.swap import convert_model
from shiftwise import __version__, outputs
from shiftwise.errors import CheckpointError, OutputExistsError
from shiftwise.models import FAMILIES, create_model, model_config, replknet, slak, unireplknet
from shiftwise.modules import ShiftWiseConv2d

logger = logging.getLogger(__name__)

FORMAT = "shiftwise-converted"
FORMAT_VERSION = 1
SAFE_GLOBALS = [argparse.Namespace]  # SLaK saves its training ``args``
MAX_INPUT_SIZE = 8192  # larger evaluation sizes in a file's hints are ignored
FAMILY_NAMES = {"slak": "SLaK", "replknet": "RepLKNet", "unireplknet": "UniRepLKNet"}
_VARIANTS = {"slak": slak.VARIANTS, "replknet": replknet.VARIANTS, "unireplknet": unireplknet.VARIANTS}
_PREFIXES = ("module.", "backbone.")
_PREFIX_RE = re.compile(r"(?:module\.|backbone\.)*")
_SEGMENT_RENAMES = {"Decom1": "LoRA1", "Decom2": "LoRA2"}  # SLaK before the rename


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
        return f"{FAMILY_NAMES[self.family]} {self.config['name']}"


# reading ------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: str) -> int:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, expected a checkpoint file (.pth, .pt, .safetensors)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not complete")
    return size


def _sniff(path: str, size: int) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"  # torch.save since PyTorch 1.6
    if head[:1] == b"\x80":
        # A bare pickle, or torch.save before PyTorch 1.6: that format allocates every storage at the
        # size its pickle declares before reading it, so a few bytes can claim terabytes.
        raise CheckpointError(f"refused {path}: a bare pickle or a legacy (PyTorch < 1.6) torch file, which can run "
                              "code and allocates the tensor sizes it declares before they can be checked; if you "
                              "trust the file, load it in PyTorch and re-save its state dict with torch.save")
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    raise CheckpointError(f"{path} is not a PyTorch or safetensors checkpoint (it starts with {head[:8]!r})")


def _check_zip(path: str, size: int) -> None:
    """Refuse an archive whose records unpack to more bytes than the file holds, before torch reads it.

    torch.save writes its records uncompressed, so their sizes add up to at most the file size;
    torch.load allocates each record at its declared unpacked size, so a compressed record is a
    zip bomb (a megabyte unpacking to gigabytes).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({' '.join(str(exc).split())[:160]})") \
            from None
    if declared > size:
        raise CheckpointError(f"refused {path}: its zip records unpack to {declared:,} bytes but the file has "
                              f"{size:,} (a zip bomb or a re-compressed archive; torch.save never compresses)")


def _check_tensors(obj, path: str) -> None:
    """Refuse tensors that claim more elements than their storage holds (zero or overlapping strides).

    Such a view costs nothing to load, but the shapes inferred from it (classes, widths, kernel
    sizes) would build a model of that size: a 4-byte storage viewed as 2^20 x 2^20 claims 4 TiB.
    """
    todo = [("", obj)]
    while todo:
        where, item = todo.pop()
        if isinstance(item, Tensor):
            if item.layout != torch.strided:
                raise CheckpointError(f"refused {path}: tensor {where or '(top level)'} has layout {item.layout}; "
                                      "checkpoints hold dense tensors")
            claimed, stored = item.numel() * item.element_size(), item.untyped_storage().nbytes()
            if claimed > stored:
                raise CheckpointError(f"refused {path}: tensor {where} claims shape {tuple(item.shape)} "
                                      f"({claimed:,} bytes) but its storage holds {stored:,} bytes")
        elif isinstance(item, dict):
            todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, argparse.Namespace):
            todo.extend((f"{where}.{k}", v) for k, v in vars(item).items())


def _torch_load(path: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol N" notes on legacy files
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+?)[ ,]", text)
        if found:
            raise CheckpointError(
                f"refused {path}: it holds the pickled Python object {found.group(1)!r} (pickles can run code "
                "when loaded); shiftwise reads only tensors, plain containers and argparse.Namespace. If you "
                "trust the file, re-save just its state dict with torch.save") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        detail = " ".join(detail.group(1).split())[:120] if detail else "unsupported pickle content"
        raise CheckpointError(f"cannot read {path}: not a plain PyTorch checkpoint ({detail})") from None
    except Exception as exc:  # any failure to parse the bytes is a problem of the file
        reason = " ".join(str(exc).split(".")[0].split()) or type(exc).__name__
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({reason[:160]})") from None


def _safetensors_load(path: str):
    try:
        from safetensors import safe_open  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise CheckpointError(f"{path} is a safetensors file; pip install safetensors to read it") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file "
                              f"({' '.join(str(exc).split())[:160]})") from None
    if "shiftwise" in metadata:
        try:
            return {"shiftwise": json.loads(metadata["shiftwise"]), "state_dict": tensors}
        except json.JSONDecodeError:
            raise CheckpointError(f"cannot read {path}: its shiftwise metadata is not valid JSON") from None
    return tensors


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, Tensor) for v in obj.values()))


def _unwrap(obj, path: str, ema: bool) -> Tuple[Dict[str, Tensor], dict]:
    """The state dict inside a loaded object, and the hints stored beside it (SLaK's args)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    args = obj.get("args")
    hints = dict(vars(args)) if isinstance(args, argparse.Namespace) else {}
    if ema:
        if not _is_state_dict(obj.get("model_ema")):
            raise CheckpointError(f"{path} has no EMA weights ('model_ema'); drop --ema "
                                  f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        return obj["model_ema"], hints
    for key in ("model", "state_dict"):
        if _is_state_dict(obj.get(key)):
            return obj[key], hints
    if _is_state_dict(obj):
        return obj, hints
    raise CheckpointError(f"{path} holds no state dict: expected 'model', 'state_dict' or a flat dict of tensors "
                          f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")


def normalize_keys(state_dict: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Rename keys to the official ones; returns the new dict and notes on what was renamed.

    Strips ``module.`` (DataParallel) and ``backbone.`` (OpenMMLab) prefixes, maps SLaK's old
    ``Decom1``/``Decom2`` to ``LoRA1``/``LoRA2`` and mmpretrain's RepLKNet names
    (``head.fc.*`` -> ``head.*``, ``stages.<last>.norm.*`` -> ``norm.*``).
    """
    out, stripped, decom = {}, set(), False
    for key, value in state_dict.items():
        prefixes = _PREFIX_RE.match(key).group(0)
        stripped.update(p for p in _PREFIXES if p in prefixes)
        parts = key[len(prefixes):].split(".")
        decom = decom or any(p in _SEGMENT_RENAMES for p in parts)
        out[".".join(_SEGMENT_RENAMES.get(p, p) for p in parts)] = value
    notes = [f"stripped {p!r}" for p in _PREFIXES if p in stripped]
    if decom:
        notes.append("renamed Decom1/Decom2 to LoRA1/LoRA2")
    if any(k.startswith("head.fc.") for k in out) and not any(k in out for k in ("head.weight", "head.bias")):
        out = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in out.items()}
        notes.append("renamed mmpretrain 'head.fc' to 'head'")
    # mmpretrain keeps RepLKNet's final BN as the last stage's norm (out_indices=(3,))
    stage_norms = sorted({int(k.split(".")[1]) for k in out if re.match(r"stages\.\d+\.norm\.", k)})
    if stage_norms and "transitions.0.0.conv.weight" in out and not any(k.startswith("norm.") for k in out):
        last = f"stages.{stage_norms[-1]}.norm."
        out = {("norm." + k[len(last):] if k.startswith(last) else k): v for k, v in out.items()}
        notes.append(f"renamed mmpretrain '{last[:-1]}' to 'norm'")
    return out, notes


# architecture inference ---------------------------------------------------------------------
def detect_family(state_dict: Dict[str, Tensor]) -> Optional[str]:
    """``"slak"``, ``"replknet"``, ``"unireplknet"``, ``"convnext"`` or ``None``, from the key names."""
    keys = state_dict.keys()
    if "stem.0.conv.weight" in state_dict and any(".blocks." in k and ".large_kernel." in k for k in keys):
        return "replknet"
    if "downsample_layers.0.0.weight" in state_dict:
        if any(".large_kernel." in k for k in keys):
            return "slak"
        if any(".se.down.weight" in k for k in keys):
            return "unireplknet"
        if any(".dwconv." in k for k in keys):
            return "convnext"
    return None


def _shape(sd: Dict[str, Tensor], key: str, family: str) -> Tuple[int, ...]:
    try:
        return tuple(sd[key].shape)
    except KeyError:
        raise CheckpointError(f"{FAMILY_NAMES[family]} weights without {key!r}: incomplete or of an unknown "
                              "variant of the architecture") from None


def _block_counts(sd: Dict[str, Tensor], pattern: str) -> Dict[int, int]:
    blocks: Dict[int, set] = {}
    for key in sd:
        m = re.match(pattern, key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for stage, found in blocks.items():
        if len(found) != max(found) + 1:  # a key such as stages.0.99999999.gamma would build 10^8 blocks
            raise CheckpointError(f"stage {stage} numbers its blocks with gaps (highest {max(found)}, "
                                  f"{len(found)} present): incomplete or corrupt weights")
    return {s: len(b) for s, b in blocks.items()}


def _infer_slak(sd) -> dict:
    stem = _shape(sd, "downsample_layers.0.0.weight", "slak")  # (C0, in, k, k)
    widths = [stem[0]] + [_shape(sd, f"downsample_layers.{i}.1.weight", "slak")[0] for i in (1, 2, 3)]
    counts = _block_counts(sd, r"stages\.(\d+)\.(\d+)\.")
    depths = [counts.get(i, 0) for i in range(4)]
    kernels: List[Optional[int]] = []
    small = None
    decom = bn = False
    for i in range(4):
        if not depths[i]:
            kernels.append(None)
            continue
        p = f"stages.{i}.0.large_kernel."
        if p + "LoRA1.conv.weight" in sd:
            _, _, k, small = sd[p + "LoRA1.conv.weight"].shape
            decom = True
        elif p + "lkb_origin.conv.weight" in sd:
            k = sd[p + "lkb_origin.conv.weight"].shape[-1]
        else:
            raise CheckpointError(f"SLaK block {p[:-1]} has neither LoRA1 nor lkb_origin weights "
                                  "(a merged lkb_reparam SLaK is not supported)")
        if p + "small_conv.conv.weight" in sd:
            small = sd[p + "small_conv.conv.weight"].shape[-1]
        bn = bn or (p + ("LoRA1" if decom else "lkb_origin") + ".bn.weight") in sd
        kernels.append(int(k))
    known = [k for k in kernels if k is not None]
    small = int(small) if small is not None else max(known, default=5)  # no small branch anywhere
    kernels = [k if k is not None else small for k in kernels]
    first = next((i for i in range(4) if depths[i]), 0)
    kwargs = dict(depths=depths, dims=widths, width_factor=1.0, kernel_size=kernels + [small], decom=decom, bn=bn,
                  num_classes=_shape(sd, "head.weight", "slak")[0], in_chans=stem[1], stem_kernel=stem[2],
                  stem_stride=stem[2], layer_scale_init_value=1e-6 if f"stages.{first}.0.gamma" in sd else 0.0)
    for name, variant in _VARIANTS["slak"].items():
        cfg = slak.SLaKConfig(**variant)
        if list(cfg.depths) == depths and list(cfg.widths) == widths:
            kwargs.update(dims=list(cfg.dims), width_factor=cfg.width_factor)
            return {"name": name, "kwargs": kwargs}
    return {"name": "slak", "kwargs": kwargs}


def _infer_replknet(sd) -> dict:
    counts = _block_counts(sd, r"stages\.(\d+)\.blocks\.(\d+)\.")
    stages = range(len(counts))
    channels = [_shape(sd, f"stages.{i}.blocks.0.prelkb_bn.weight", "replknet")[0] for i in stages]
    layers = [counts[i] // 2 for i in stages]
    kernels, small, merged = [], None, False
    dw_ratio = ffn_ratio = 1.0
    for i in stages:
        p = f"stages.{i}.blocks.0.large_kernel."
        if p + "lkb_reparam.weight" in sd:
            kernels.append(sd[p + "lkb_reparam.weight"].shape[-1])
            merged = True
        else:
            kernels.append(_shape(sd, p + "lkb_origin.conv.weight", "replknet")[-1])
        if p + "small_conv.conv.weight" in sd:
            small = sd[p + "small_conv.conv.weight"].shape[-1]
        dw_ratio = _shape(sd, f"stages.{i}.blocks.0.pw1.conv.weight", "replknet")[0] / channels[i]
        ffn_ratio = _shape(sd, f"stages.{i}.blocks.1.pw1.conv.weight", "replknet")[0] / channels[i]
    kwargs = dict(large_kernel_sizes=kernels, layers=layers, channels=channels,
                  small_kernel=None if merged or small is None else int(small), dw_ratio=dw_ratio,
                  ffn_ratio=ffn_ratio, merged=merged, num_classes=_shape(sd, "head.weight", "replknet")[0],
                  in_chans=_shape(sd, "stem.0.conv.weight", "replknet")[1])
    if merged:  # the small kernel is folded in; keep the variant's value so the config reads as the original
        kwargs.pop("small_kernel")
    return {"name": _variant_name("replknet", {"layers": layers, "channels": channels}), "kwargs": kwargs}


def _infer_unireplknet(sd) -> dict:
    stem = _shape(sd, "downsample_layers.0.0.weight", "unireplknet")
    dims = [_shape(sd, "downsample_layers.0.3.weight", "unireplknet")[0]]
    dims += [_shape(sd, f"downsample_layers.{i}.0.weight", "unireplknet")[0] for i in (1, 2, 3)]
    counts = _block_counts(sd, r"stages\.(\d+)\.(\d+)\.")
    depths = [counts.get(i, 0) for i in range(4)]
    kernel_sizes = []
    for i in range(4):
        stage = []
        for j in range(depths[i]):
            p = f"stages.{i}.{j}.dwconv."
            w = sd.get(p + "lk_origin.weight", sd.get(p + "weight"))
            stage.append(0 if w is None else int(w.shape[-1]))
        kernel_sizes.append(stage)
    deploy = any(k.endswith(".pwconv2.0.bias") for k in sd)
    first = next((i for i in range(4) if depths[i]), 0)
    kwargs = dict(depths=depths, dims=dims, kernel_sizes=kernel_sizes, deploy=deploy,
                  num_classes=_shape(sd, "head.weight", "unireplknet")[0], in_chans=stem[1])
    if not deploy:  # the deploy form folds gamma away whatever its initial value was
        kwargs["layer_scale_init_value"] = 1e-6 if f"stages.{first}.0.gamma" in sd else 0.0
    return {"name": _variant_name("unireplknet", {"depths": depths, "dims": dims}), "kwargs": kwargs}


def _variant_name(family: str, identity: dict) -> str:
    for name, variant in _VARIANTS[family].items():
        if all(list(variant.get(k, ())) == v for k, v in identity.items()):
            return name
    return family


_INFER = {"slak": _infer_slak, "replknet": _infer_replknet, "unireplknet": _infer_unireplknet}


def infer_config(state_dict: Dict[str, Tensor], family: Optional[str] = None, source: str = "the checkpoint"
                 ) -> Tuple[str, dict]:
    """``(family, {"name", "kwargs"})`` of the architecture whose weights ``state_dict`` holds.

    The family comes from the key names and the architecture (depths, widths, kernels, small
    kernel, form, classes) from the tensor shapes. ``family`` (if given) must agree.
    """
    found = detect_family(state_dict)
    if family is not None and family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if found == "convnext":
        raise CheckpointError(f"{source} holds ConvNeXt-style weights without large kernels (no SLaK "
                              "large_kernel, no UniRepLKNet SE blocks): nothing to convert")
    if found is None:
        first = ", ".join(list(state_dict)[:3])
        raise CheckpointError(f"{source} is not a SLaK, RepLKNet or UniRepLKNet state dict (first keys: {first})")
    if family is not None and family != found:
        raise CheckpointError(f"{source} is a {FAMILY_NAMES[found]} checkpoint, not {FAMILY_NAMES[family]} "
                              f"(--family {family}); pass --family {found} or leave it out")
    try:
        return found, _INFER[found](state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


# reading, the whole way -----------------------------------------------------------------------
def safe_load(path):
    """The object in a ``torch.save`` or safetensors file, read without running pickled code.

    Allows tensors, plain containers and ``argparse.Namespace``; refuses bare pickles and the
    legacy (pre-1.6) torch format, archives whose records unpack to more than the file size,
    and tensors claiming more elements than they store. Every problem raises
    :class:`CheckpointError` with a one-line message.

    Example::

        >>> ckpt = safe_load("runs/train/checkpoint.pt")
    """
    path = os.fspath(path)
    size = _check_file(path)
    if _sniff(path, size) == "safetensors":
        obj = _safetensors_load(path)
    else:
        _check_zip(path, size)
        obj = _torch_load(path)
    _check_tensors(obj, path)
    return obj


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
    state_dict, hints = _unwrap(obj, path, ema)
    state_dict, notes = normalize_keys(state_dict)
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
    if meta.get("format") != FORMAT or not _is_state_dict(obj.get("state_dict")):
        raise CheckpointError(f"{path} has shiftwise metadata of an unknown format {meta.get('format')!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer shiftwise ({meta.get('shiftwise_version')}, format "
                              f"{meta.get('format_version')}); upgrade shiftwise to read it")
    found = meta.get("family")
    if found not in FAMILIES:
        raise CheckpointError(f"{path} names an unknown family {found!r}")
    if family is not None and family != found:
        raise CheckpointError(f"{path} is a converted {FAMILY_NAMES[found]} checkpoint, not "
                              f"{FAMILY_NAMES.get(family, family)} (--family {family})")
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
    what = f"{FAMILY_NAMES[ckpt.family]} {name}"
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
        return (f"{self.source} ({FAMILY_NAMES[self.family]} {self.config['name']}) -> {self.output}: "
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
        return _atomic_write(path, lambda f: f.write(data), force)
    return _atomic_write(path, lambda f: torch.save({"shiftwise": metadata, "state_dict": state_dict}, f), force)


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


def _atomic_write(path, write, force: bool) -> int:
    outputs.claim(path, force)
    with outputs.atomic(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return os.path.getsize(path)


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
    outputs.claim(dst, force)  # fail before the (slow) read and conversion
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
