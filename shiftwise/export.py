"""Export: a shift-wise model as plain PyTorch (``densify``) and as ONNX checked in onnxruntime.

``torch.onnx.export`` works on a model holding shift-wise layers as it is, with either exporter:
while it traces, each ``ShiftWiseConv2d`` is written with standard operators in one of two forms
(:mod:`shiftwise.onnx_form`): ``"dense"``, the one depthwise convolution of its merged kernel,
or ``"shiftwise"``, its tiles as small convolutions in blocks of 8 channels, each reading the
input rows at its tile's offset through a gather, the slots summed. :func:`shiftwise.onnx_form.choose` picks one per layer from the plan and
the map size; :func:`export_onnx` can force one and says which each layer got.
``export_checkpoint`` exports straight from a checkpoint file (what ``shiftwise export`` runs).
``densify`` gives the plain PyTorch model of dense convolutions.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from shiftwise.convert import convert_model
from shiftwise.convert.io import build_model, read_checkpoint

from . import onnx_form, outputs
from .errors import ShiftwiseError
from .modules import ShiftWiseConv2d, has_plane_layers



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


# what a user runs to get the optional packages export needs
EXTRA_HINT = "pip install 'torch-shiftwise[export]'"


def require(*names: str) -> None:
    """Raise a one-line :class:`~shiftwise.errors.ShiftwiseError` naming the export extra when one
    of the packages ``names`` (``"onnx"``, ``"onnxruntime"``, ``"onnxscript"``) is missing."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ShiftwiseError(f"{name} is not installed: ONNX export needs the export extra ({EXTRA_HINT})"
                                 ) from None


def export_onnx(model: nn.Module, path, input_shape: Sequence[int], form: str = "auto", force: bool = False,
                opset: int = 18, check: bool = True, tolerance: float = 1e-4, dynamic_hw: bool = False,
                dynamo: bool = False) -> dict:
    """Write ``model`` as ONNX to ``path``, atomically, each shift-wise layer in ``form``.

    Args:
        model: any module; an SW network is converted first (exact, fewer layers).
        path: the ``.onnx`` file; an existing one is refused unless ``force``.
        input_shape: ``(B, C, H, W)`` of the traced example (random values).
        form: ``"auto"`` (per layer, :func:`shiftwise.onnx_form.choose`), ``"dense"`` or
            ``"shiftwise"`` (:mod:`shiftwise.onnx_form`).
        opset: ONNX operator set version.
        check: run the file in onnxruntime on the example and compare it with PyTorch; a
            difference above ``tolerance`` (relative to the largest output) raises and leaves no file.
        dynamic_hw: make height and width dynamic too (the batch always is).
        dynamo: the dynamo exporter (needs ``onnxscript``) instead of the TorchScript one.

    Returns:
        ``{"output", "bytes", "onnxruntime_max_abs_diff" (None without check), "layers"}``;
        ``layers``: per shift-wise layer exported, ``{"channels", "tiles", "kernel", "map",
        "form", "reason"}``.

    Example::

        >>> import os, tempfile
        >>> layer = nn.Sequential(ShiftWiseConv2d(8, (31, 5)))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = export_onnx(layer, os.path.join(folder, "m.onnx"), (1, 8, 32, 32), form="shiftwise")
        >>> [(r["form"], r["reason"]) for r in result["layers"]]
        [('shiftwise', 'asked for')]
    """
    if form not in onnx_form.FORMS:
        raise ValueError(f"ONNX form must be one of {onnx_form.FORMS}, got {form!r}")
    require("onnx", *(("onnxscript",) if dynamo else ()), *(("onnxruntime",) if check else ()))
    path = outputs.claim(os.fspath(path), force)
    plain = copy.deepcopy(model).eval()
    if has_plane_layers(plain):  # SW layers: their exact conversion has fewer layers
        plain = convert_model(plain, inplace=True)
    plain = plain.cpu().float()
    example = torch.randn(*input_shape)
    with torch.no_grad():
        try:
            expected = plain(example)
        except RuntimeError as exc:  # typically an input smaller than the model's stem
            raise ValueError(f"the model does not run on an input of shape {tuple(input_shape)}: {exc}") from None
    onnx_form.remember(plain)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    with outputs.atomic(path) as tmp, onnx_form.forced(form), onnx_form.recording() as layers:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_exporter():
            warnings.simplefilter("ignore")
            try:
                if dynamo:
                    torch.onnx.export(plain, (example,), tmp, input_names=["input"], output_names=["output"],
                                      dynamic_shapes=(axes,), opset_version=opset, dynamo=True,
                                      external_data=False)
                else:
                    torch.onnx.export(plain, (example,), tmp, input_names=["input"], output_names=["output"],
                                      dynamic_axes={"input": axes, "output": axes}, opset_version=opset,
                                      dynamo=False)
            except RuntimeError as exc:
                if "opset" not in str(exc):
                    raise
                reason = str(exc).splitlines()[0]  # the rest of the message is the whole graph
                raise ValueError(f"ONNX opset {opset} is not supported by this PyTorch ({reason}); the default is 18"
                                 ) from None
        diff = _check(tmp, example, expected, tolerance) if check else None
    return {"output": path, "bytes": os.path.getsize(path), "onnxruntime_max_abs_diff": diff,
            "layers": layers}


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter and the ONNX libraries it calls log their progress: silenced here."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def summary(layers: Sequence[dict]) -> str:
    """One line saying which form the shift-wise layers got and why (``"no shift-wise layers"``)."""
    if not layers:
        return "no shift-wise layers"
    groups: dict = {}
    for r in layers:
        groups.setdefault((r["form"], r["reason"]), []).append(r)
    total = len(layers)
    if len(groups) > 4:  # one reason per layer: counts, the rule, and where the reasons are
        counts: dict = {}
        for r in layers:
            counts[r["form"]] = counts.get(r["form"], 0) + 1
        by_form = ", ".join(f"{n} {form}" for form, n in counts.items())
        return (f"{total} shift-wise layers: {by_form} (shiftwise where a layer's tile planes per channel are at "
                f"most {onnx_form.SHIFTWISE_MAX_PLANES_PER_TAP} x its dense taps; per layer with --json)")
    parts = []
    for (form, reason), rs in groups.items():
        parts.append(f"{len(rs)} {form} ({reason})" if len(groups) > 1 or len(rs) > 1 else f"{form} ({reason})")
    return f"{total} shift-wise layer{'s' if total > 1 else ''}: " + "; ".join(parts)


def export_checkpoint(path, output, image_size: Optional[int] = None, opset: int = 18, force: bool = False,
                      check: bool = True, form: str = "auto", dynamic_hw: bool = False, dynamo: bool = False) -> dict:
    """Export the model of checkpoint ``path`` (any kind :func:`~shiftwise.convert.io.read_checkpoint`
    reads) to the ONNX file ``output``, shift-wise layers in ``form`` (see :func:`export_onnx`).

    The check in onnxruntime runs on one random ``image_size`` square input (default: the
    checkpoint's evaluation size, else 224); the exported batch size is dynamic. Returns
    :func:`export_onnx`'s result plus ``"forms"``, the line of :func:`summary`.

    Example (the embedded demo checkpoint, 32x32 inputs)::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     result = export_checkpoint("demo", os.path.join(folder, "demo.onnx"))
        >>> result["bytes"] > 0
        True
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image size must be a positive int, got {image_size!r}")
    if form not in onnx_form.FORMS:
        raise ValueError(f"ONNX form must be one of {onnx_form.FORMS}, got {form!r}")
    require("onnx", *(("onnxscript",) if dynamo else ()), *(("onnxruntime",) if check else ()))
    output = os.fspath(output)
    outputs.claim(output, force)  # before reading the checkpoint
    ckpt = read_checkpoint(path)
    model = build_model(ckpt)
    image_size = image_size or ckpt.input_size or 224
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    result = export_onnx(model, output, (1, in_chans, image_size, image_size), form=form, force=force, opset=opset,
                         check=check, dynamic_hw=dynamic_hw, dynamo=dynamo)
    result["forms"] = summary(result["layers"])
    return result


def _check(path: str, example: torch.Tensor, expected: torch.Tensor, tolerance: float) -> float:
    import onnxruntime as ort  # noqa: PLC0415 (optional dependency)

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": example.numpy()})[0])
    diff = float((got - expected).abs().max())
    scale = max(float(expected.abs().max()), 1e-30)
    if diff > tolerance * scale:
        raise ShiftwiseError(f"onnxruntime output differs from PyTorch by {diff:.3e} (> {tolerance} of {scale:.3e})")
    return diff
