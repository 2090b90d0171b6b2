"""Shared fixtures: devices, dtypes and the tolerance table."""
import os

import pytest
import torch

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


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


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
