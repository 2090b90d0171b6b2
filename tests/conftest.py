"""Shared fixtures: devices, dtypes and the tolerance table; the CUDA suite's Taichi start.

Taichi runs on one arch per process. Tests marked ``cuda`` therefore run in a process of their
own, ``pytest -m cuda tests``: when every selected test is a ``cuda`` one and PyTorch sees a GPU,
Taichi starts on CUDA right after collection, before any test runs. In any other run they skip
with the reason (no GPU, or a run that also holds CPU tests, whose Taichi runs on the CPU).
"""
import os
from typing import Optional

import pytest
import torch

from shiftwise import _runtime

os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the cores: one thread each, none oversubscribed
    os.environ.setdefault("SHIFTWISE_CPU_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (rtol, atol relative to max|reference|) per dtype: float32 sums of up to ~2600 products.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}


def assert_close(actual, expected, dtype=None):
    """Every element within TOL[dtype] * max(|expected|, 1e-30) of the reference."""
    dtype = dtype or expected.dtype
    tol = TOL[dtype]
    scale = max(expected.detach().abs().max().item() if expected.numel() else 0.0, 1e-30)
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert worst <= tol * scale, f"max |diff| {worst:.3e} > {tol:.0e} * max|ref| {scale:.3e}"


_cuda_start_error: Optional[str] = None  # why Taichi could not start on CUDA, when it was tried


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    global _cuda_start_error
    if config.option.collectonly or not items or not torch.cuda.is_available():
        return
    if not all(item.get_closest_marker("cuda") for item in items) or _runtime.initialised_device() is not None:
        return
    try:
        with _runtime.launch(torch.device("cuda", 0)):  # the first launch starts Taichi on the device's arch
            pass
    except Exception as exc:  # noqa: BLE001 (each cuda test fails with it)
        _cuda_start_error = f"Taichi could not start on CUDA: {type(exc).__name__}: {exc}"


def _require_cuda_taichi() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; PyTorch sees none")
    arch = _runtime.initialised_device()
    if arch == "cuda":
        return
    if _cuda_start_error is not None:
        pytest.fail(_cuda_start_error, pytrace=False)
    if arch == "cpu":
        pytest.skip("Taichi already runs on the CPU in this process (one arch per process); "
                    "run the CUDA suite on its own: pytest -m cuda tests")
    pytest.skip("this run also selects tests without the cuda marker, whose Taichi runs on the CPU; "
                "run the CUDA suite on its own: pytest -m cuda tests")


@pytest.fixture(autouse=True)
def _cuda_taichi(request):
    """Tests marked ``cuda`` run only where Taichi was started on CUDA for them (module docs)."""
    if request.node.get_closest_marker("cuda") is not None:
        _require_cuda_taichi()


@pytest.fixture
def no_tf32():
    """cuDNN convolutions in full float32 (TF32 would round their inputs to 10-bit mantissas)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """PyTorch on one thread for the test (tiny models run fastest so, and runs compared bitwise
    with single-threaded subprocesses must match them); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_demo_model(seed: int = 0):
    """``slak_demo`` in eval mode with layer scale 1 (the 1e-6 default would hide the large
    kernels) and perturbed BatchNorm statistics."""
    from shiftwise.models import create_model

    torch.manual_seed(seed)
    model = create_model("slak_demo")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
