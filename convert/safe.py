"""Reading a checkpoint file without running code from it.

``torch.load(weights_only=True)`` unpickles only tensors, plain containers and the allow-listed
``argparse.Namespace`` (SLaK and SW save their training ``args``); safetensors files hold only tensors.
Before torch reads an archive its declared sizes are checked against the file size, and after
it every tensor's shape against its storage, so a forged file cannot make the reader allocate
what it claims. Every problem raises :class:`shiftwise.CheckpointError` with a one-line message.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile

import torch
from torch import Tensor

from shiftwise.errors import CheckpointError

SAFE_GLOBALS = [argparse.Namespace]  # SLaK and SW save their training ``args``


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
