"""taichi_kernels.launch.Launcher: the direct launch path gives what Taichi's own call gives."""
import pytest
import taichi as ti
import torch

from shiftwise import _runtime, reference
from shiftwise.taichi_kernels import shift_add_kernels
from shiftwise.taichi_kernels.launch import Launcher

CPU = torch.device("cpu")


def _kernels():
    with _runtime.launch(CPU):  # Taichi initialised as the library does it
        pass

    @ti.kernel
    def axpy(x: ti.types.ndarray(dtype=ti.f32, ndim=2), a: ti.f32, k: ti.i32,
             y: ti.types.ndarray(dtype=ti.f32, ndim=2)):
        for i, j in ti.ndrange(x.shape[0], x.shape[1]):
            y[i, j] = a * x[i, j] + k

    @ti.kernel
    def scale(x: ti.types.ndarray(dtype=ti.f64, ndim=1), n: ti.template()):
        for i in range(x.shape[0]):
            x[i] *= n

    return axpy, scale


def test_direct_calls_match_taichi_and_the_formula():
    axpy, _ = _kernels()
    launcher = Launcher(axpy)
    x = torch.randn(5, 7)
    with _runtime.launch(CPU):
        for step in range(3):  # the first call goes through Taichi, the others are direct
            y = torch.full_like(x, float("nan"))
            launcher(x, 0.5 + step, 3, y)
            assert torch.equal(y, (0.5 + step) * x + 3)
        assert launcher.direct_calls == 2
        expected = torch.empty_like(x)
        axpy(x, 2.5, 3, expected)
        assert torch.equal(y, expected)


def test_library_kernel_direct_path_is_exact():
    # the shift-add backward through the launcher, direct calls on fresh tensors each time
    _, bwd = shift_add_kernels("float32", "cpu")
    torch.manual_seed(0)
    tile_channel = torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32)
    sy = torch.tensor([0, 2, 4, 1, 3], dtype=torch.int32)
    sx = torch.tensor([4, 0, 2, 3, 1], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    calls = bwd.direct_calls
    for _ in range(3):
        gy = torch.randn(2, 3, 6, 9)
        gu = torch.full((2, 5, 10, 13), float("nan"))
        with _runtime.launch(CPU):
            bwd(gy, tile_channel, sy, sx, 10, 13, gu.view(-1))
        # the transpose of the shift-add: <shift_add(u), gy> == <u, gu> for any u
        u = torch.randn(2, 5, 10, 13, dtype=torch.float64)
        lhs = (reference.shift_add(u, offsets, sy, sx, (6, 9)) * gy.double()).sum()
        assert torch.allclose(lhs, (u * gu.double()).sum(), rtol=1e-6, atol=1e-6)
    assert bwd.direct_calls >= calls + 2


def test_new_signature_compiles_and_runs():
    axpy, _ = _kernels()
    launcher = Launcher(axpy)
    with _runtime.launch(CPU):
        x, y = torch.randn(3, 4), torch.empty(3, 4)
        launcher(x, 1.0, 0, y)
        launcher(x, 1.0, 0, y)
        with pytest.raises(Exception, match="(?i)dtype|type"):  # Taichi's own error for a float64 array
            launcher(x.double(), 1.0, 0, y)
        assert launcher.direct_calls == 1


def test_non_contiguous_and_grad_tensors():
    axpy, _ = _kernels()
    launcher = Launcher(axpy)
    x, y = torch.randn(4, 6), torch.empty(4, 6)
    with _runtime.launch(CPU):
        launcher(x, 1.0, 1, y)
        with pytest.raises(ValueError, match="contiguous"):
            launcher(x.t(), 1.0, 1, torch.empty(6, 4))
        w = torch.randn(4, 6, requires_grad=True)  # Taichi's path (it attaches a grad buffer)
        before = launcher.direct_calls
        launcher(w, 2.0, 0, y)
        assert launcher.direct_calls == before
        assert torch.equal(y, 2.0 * w.detach())
        with pytest.raises(Exception, match="cannot be converted"):  # a new signature: Taichi checks it
            launcher(x, 1.0, 1.5, y)


def test_template_kernels_always_go_through_taichi():
    _, scale = _kernels()
    launcher = Launcher(scale)
    x = torch.ones(8, dtype=torch.float64)
    with _runtime.launch(CPU):
        launcher(x, 2)
        launcher(x, 3)
    assert launcher.direct_calls == 0
    assert torch.equal(x, torch.full((8,), 6.0, dtype=torch.float64))


def test_without_taichi_internals_every_call_goes_through_the_kernel():
    calls = []

    def plain(*args):  # a callable without Taichi 1.7's kernel internals (no ``_primal``)
        calls.append(args)
        return len(calls)

    launcher = Launcher(plain)
    x = torch.zeros(3)
    with _runtime.launch(CPU):
        assert launcher(x, 1) == 1
        assert launcher(x, 1) == 2
    assert launcher.direct_calls == 0 and len(calls) == 2


def test_vector_element_arrays_are_checked():
    with _runtime.launch(CPU):
        pass

    @ti.kernel
    def fill(y: ti.types.ndarray(dtype=ti.types.vector(4, ti.f32), ndim=1), v: ti.f32):
        for i in range(y.shape[0]):
            y[i] = ti.Vector([v, v + 1, v + 2, v + 3])

    launcher = Launcher(fill)
    y = torch.zeros(6, 4)
    with _runtime.launch(CPU):
        launcher(y, 1.0)
        launcher(y, 2.0)  # direct
        assert launcher.direct_calls == 1
        assert torch.equal(y, torch.tensor([2.0, 3.0, 4.0, 5.0]).expand(6, 4))
        with pytest.raises(ValueError, match="last dimensions"):
            launcher(torch.zeros(12, 2), 1.0)  # same dtype and rank, wrong element shape
