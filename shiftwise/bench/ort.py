"""Models exported to ONNX and run in onnxruntime, as the benchmark times them.

A model is exported by :func:`shiftwise.export.export_onnx` in one of its forms (``"dense"``:
each shift-wise layer as the one depthwise conv of its merged kernel; ``"shiftwise"``: the
tiles as small convs, their shifts and sums as standard ops) and loaded in an onnxruntime CPU
session: ``intra_op_num_threads`` = the threads PyTorch runs with (the
benchmark's ``--threads``), one inter-op thread, sequential execution, every graph
optimisation on. Inference only: onnxruntime has no training step here.
"""
from __future__ import annotations

import collections
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ShiftwiseError
from ..export import export_onnx, require

FORMS = ("dense", "shiftwise")


def unavailable(device: torch.device) -> Optional[str]:
    """Why onnxruntime cannot be timed for a run on ``device`` (None when it can)."""
    if torch.device(device).type != "cpu":
        return f"onnxruntime runs on the CPU here; time it with --device cpu (this run: {torch.device(device)})"
    try:
        require("onnx", "onnxruntime")
    except ShiftwiseError as exc:
        return str(exc)
    return None


def session_options(threads: Optional[int] = None):
    """The onnxruntime session options the benchmark uses (``threads``: PyTorch's by default)."""
    import onnxruntime as ort  # noqa: PLC0415 (optional dependency)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def export_bytes(model: nn.Module, input_shape: Sequence[int], form: str) -> Tuple[bytes, List[dict]]:
    """The ONNX file :func:`~shiftwise.export.export_onnx` writes for ``model`` in ``form``
    (not checked there: the benchmark checks the session's output itself), and its record of
    the shift-wise layers exported."""
    if form not in FORMS:
        raise ValueError(f"unknown ONNX form {form!r}; choose from {', '.join(FORMS)}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{form}.onnx")
        result = export_onnx(model, path, tuple(input_shape), form=form, check=False)
        with open(path, "rb") as f:
            return f.read(), result["layers"]


def op_counts(data: bytes) -> Dict[str, int]:
    """Node count per operator type of the ONNX graph ``data`` (``"Conv 5x5": 1``: convs by kernel)."""
    import onnx  # noqa: PLC0415 (optional dependency)

    graph = onnx.load_from_string(data).graph
    counts: Dict[str, int] = collections.Counter()
    for node in graph.node:
        name = node.op_type
        if name == "Conv":
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
            name += f" {'x'.join(map(str, kernel))}" if kernel else ""
        counts[name] += 1
    return dict(sorted(counts.items()))


class OrtModule(nn.Module):
    """An onnxruntime session as a module: ``forward(x)`` runs it on ``x`` (CPU, float32) and
    returns its first output. ``info``: how it was made (``onnx_form``, ``onnx_ops``, ``export_ms``,
    ``session_ms``, ``ort_threads``, the onnxruntime version)."""

    def __init__(self, data: bytes, info: Optional[dict] = None, threads: Optional[int] = None):
        super().__init__()
        import onnxruntime as ort  # noqa: PLC0415 (optional dependency)

        t0 = time.perf_counter()
        opts = session_options(threads)
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.info = dict(info or {})
        self.info.update(session_ms=(time.perf_counter() - t0) * 1e3, ort_threads=opts.intra_op_num_threads,
                         onnxruntime=ort.__version__)

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def ort_model(model: nn.Module, input_shape: Sequence[int], form: str, threads: Optional[int] = None) -> OrtModule:
    """``model`` exported in ``form`` for inputs of ``input_shape`` (batch dynamic) and loaded in
    an onnxruntime session (:class:`OrtModule`); ``info`` records the form, the graph's operators
    and the export time.

    Example::

        >>> from shiftwise.modules import ShiftWiseConv2d
        >>> layer = nn.Sequential(ShiftWiseConv2d(4, (13, 5))).eval()
        >>> m = ort_model(layer, (1, 4, 16, 16), "shiftwise")
        >>> x = torch.randn(2, 4, 16, 16)
        >>> with torch.no_grad():
        ...     print(torch.allclose(m(x), layer(x), atol=1e-5), m.info["onnx_form"])
        True shiftwise
    """
    t0 = time.perf_counter()
    data, layers = export_bytes(model, input_shape, form)
    info = {"onnx_form": form, "export_ms": (time.perf_counter() - t0) * 1e3, "onnx_bytes": len(data),
            "onnx_ops": op_counts(data), "onnx_layers": len(layers)}
    return OrtModule(data, info, threads)
