"""Side-by-side timings of large depthwise kernels, dense and shift-wise (``shiftwise bench``).

Every implementation of a case runs on the same input, weights and output gradient; its output
and its gradients are checked against the torch reference before it is timed. Then: forward and
training-step medians and spreads, the peak memory of a training step, and for the shift-add
stage its multiple of a memory-bandwidth (copy) floor.

* :mod:`~shiftwise.bench.cases`: :class:`Case` (an SW layer: :class:`SWSpec`), :data:`PRESETS`, the random layer
  of a case, compaction;
* :mod:`~shiftwise.bench.impls`: the implementations compared (:data:`IMPLS`; SW layers: :data:`SW_IMPLS`;
  onnxruntime: :data:`ONNX_IMPLS`), :func:`fft_depthwise_conv2d`;
* :mod:`~shiftwise.bench.ort`: a model exported to ONNX in one of its forms and run in onnxruntime
  (:func:`ort_model`);
* :mod:`~shiftwise.bench.timing`: :func:`time_calls`, the copy floor, peak memory;
* :mod:`~shiftwise.bench.runner`: :func:`run_case`, :func:`run_bench`;
* :mod:`~shiftwise.bench.report`: the tables, the results JSON, the plots;
* :mod:`~shiftwise.bench.models`: whole models (``--model``): :func:`run_model_bench`, their forms
  (:class:`ModelForms`: original, merged dense, shift-wise, sparse, floor), :func:`magnitude_masks`, and
  several models side by side (:func:`format_comparison`).
"""
from .cases import (PRESETS, Case, Layer, SWSpec, compact, custom_case, default_batch, make_layer, make_sw_layer,
                    parse_kernels, select_cases, with_densities)
from .impls import (BASELINE, DENSE, IMPLS, ONNX_IMPLS, SW_BASELINE, SW_IMPLS, Impl, baseline_of, build_impls,
                    fft_depthwise_conv2d, official_plan, shift_add_bytes, shift_add_stage, sw_reference)
from .models import (BenchModel, ModelCheckError, ModelForms, floor_model, load_bench_model,
                     magnitude_masks, run_model_bench)
from .ort import OrtModule, ort_model
from .report import (device_tag, format_comparison, format_model_report, format_model_table, format_report,
                     format_table, load_report, save_model_plot, save_plot, to_json, versions)
from .runner import failures, resolve_impls, run_bench, run_case
from .timing import (FLOOR_BUFFER_MAX, FLOOR_BUFFER_MIN, FLOOR_REPEATS_MIN, copy_bandwidth, paired_floor,
                     peak_step_bytes, settle, time_calls, time_once, timed_first)

__all__ = [
    "PRESETS", "Case", "Layer", "SWSpec", "compact", "custom_case", "default_batch", "make_layer", "make_sw_layer",
    "parse_kernels", "select_cases", "with_densities",
    "BASELINE", "DENSE", "IMPLS", "ONNX_IMPLS", "SW_BASELINE", "SW_IMPLS", "Impl", "baseline_of", "build_impls",
    "fft_depthwise_conv2d", "official_plan", "shift_add_bytes", "shift_add_stage", "sw_reference",
    "BenchModel", "ModelCheckError", "ModelForms", "floor_model", "load_bench_model",
    "magnitude_masks", "run_model_bench", "OrtModule", "ort_model",
    "device_tag", "format_comparison", "format_model_report", "format_model_table", "format_report", "format_table",
    "load_report", "save_model_plot", "save_plot", "to_json", "versions",
    "failures", "resolve_impls", "run_bench", "run_case",
    "FLOOR_BUFFER_MAX", "FLOOR_BUFFER_MIN", "FLOOR_REPEATS_MIN", "copy_bandwidth", "paired_floor",
    "peak_step_bytes", "settle", "time_calls", "time_once", "timed_first",
]
