"""Export: a shift-wise model as plain PyTorch (``densify``) and as ONNX checked in onnxruntime.

ONNX has no shift-add operator, so each ``ShiftWiseConv2d`` is exported as the one dense
depthwise convolution it equals (:meth:`ShiftWiseConv2d.to_dense`, exact); an SW network is
converted first. The graph then holds
only standard ops and runs in any ONNX runtime; ``torch.jit.trace`` and ``torch.export`` work on
the densified model the same way. ``export_checkpoint`` exports straight from a checkpoint file
(what ``shiftwise export`` runs).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from shiftwise.convert import convert_model
from shiftwise.convert.io import build_model, read_checkpoint

from . import outputs
from .errors import ShiftwiseError
from .modules import ShiftWiseConv2d, has_plane_layers

logger = logging.getLogger(__name__)


def densify(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`ShiftWiseConv2d` replaced by its equivalent ``nn.Conv2d``.

    Example::

        >>> sw = ShiftWiseConv2d(8, (51, 5))
        >>> dense = densify(nn.Sequential(sw))
        >>> type(dense[0]).__name__
        'Conv2d'
    """
    if isinstance(model, ShiftWiseConv2d):
        return model.to_dense()
    if not inplace:
        model = copy.deepcopy(model)
    if has_plane_layers(model):
        # SW layers (shiftwise.models.sw) read tables through custom ops: their exact conversion
        # (eval-mode BatchNorms folded) is what exports
        model = convert_model(model.eval(), inplace=True)
    for name, module in list(model.named_modules()):
        if isinstance(module, ShiftWiseConv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.to_dense().train(module.training))
    return model


def export_onnx(model: nn.Module, path, input_shape: Sequence[int], force: bool = False, opset: int = 18,
                check: bool = True, tolerance: float = 1e-4) -> Optional[float]:
    """Write ``model`` (densified) as ONNX to ``path``, atomically; return the max |logit diff| in onnxruntime.

    The batch dimension is dynamic. With ``check`` (default) the file is loaded in onnxruntime,
    run on a random input of ``input_shape`` and compared with PyTorch; a difference above
    ``tolerance`` (relative to the largest logit) raises and leaves no file. Returns ``None``
    when onnxruntime is not installed (the check is skipped, with a log message).
    """
    path = outputs.claim(os.fspath(path), force)
    plain = densify(model).eval().cpu().float()
    example = torch.randn(*input_shape)
    with torch.no_grad():
        try:
            expected = plain(example)
        except RuntimeError as exc:  # typically an input smaller than the model's stem
            raise ValueError(f"the model does not run on an input of shape {tuple(input_shape)}: {exc}") from None
    with outputs.atomic(path) as tmp:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(plain, (example,), tmp, input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                                  dynamo=False)
            except RuntimeError as exc:
                if "opset" not in str(exc):
                    raise
                reason = str(exc).splitlines()[0]  # the rest of the message is the whole graph
                raise ValueError(f"ONNX opset {opset} is not supported by this PyTorch ({reason}); the default is 18"
                                 ) from None
        diff = _check(tmp, example, expected, tolerance) if check else None
    return diff


def export_checkpoint(path, output, image_size: Optional[int] = None, opset: int = 18, force: bool = False,
                      check: bool = True) -> dict:
    """Export the model of checkpoint ``path`` (official or converted) to the ONNX file ``output``.

    The check in onnxruntime runs on one random ``image_size`` square input (default: the
    checkpoint's evaluation size, else 224); the exported batch size is dynamic. Returns ``{"output", "bytes", "onnxruntime_max_abs_diff"}`` (the difference
    is ``None`` when the check did not run).

    Example (the embedded demo checkpoint, 32x32 inputs)::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = export_checkpoint("demo", os.path.join(folder, "demo.onnx"))
        >>> result["bytes"] > 0
        True
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image size must be a positive int, got {image_size!r}")
    output = os.fspath(output)
    outputs.claim(output, force)  # before reading the checkpoint
    ckpt = read_checkpoint(path)
    model = build_model(ckpt)
    image_size = image_size or ckpt.input_size or 224
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    diff = export_onnx(model, output, (1, in_chans, image_size, image_size), force=force, opset=opset, check=check)
    return {"output": output, "bytes": os.path.getsize(output), "onnxruntime_max_abs_diff": diff}


def _check(path: str, example: torch.Tensor, expected: torch.Tensor, tolerance: float) -> Optional[float]:
    try:
        import onnxruntime as ort  # noqa: PLC0415 (optional dependency)
    except ImportError:
        logger.warning("onnxruntime is not installed: the exported graph was not checked (pip install onnxruntime)")
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": example.numpy()})[0])
    diff = float((got - expected).abs().max())
    scale = max(float(expected.abs().max()), 1e-30)
    if diff > tolerance * scale:
        raise ShiftwiseError(f"onnxruntime output differs from PyTorch by {diff:.3e} (> {tolerance} of {scale:.3e})")
    return diff
