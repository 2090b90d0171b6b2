"""Mixed precision: ``torch.autocast`` runs ShiftWiseConv2d as a float32 op (low-precision inputs cast
up, float32 out), so a converted model under CPU bfloat16 autocast stays as close to float32 as the
original does."""
import functools

import pytest
import torch

from shiftwise.convert.io import build_model, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise import ShiftWiseConv2d
from shiftwise.data import Digits, package_file, transform_for

AUTOCAST_LOGIT_TOL = 2e-2  # max |logit - float32 logit| / max |float32 logit|; measured 3.8e-3 (docs/backends.md)
SAMPLE = 64  # digits the original also runs under autocast


@pytest.mark.parametrize("backend", ["torch", "taichi"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, "amp"])
def test_module_is_a_float32_op_under_autocast(backend, amp, input_dtype):
    if input_dtype == "amp":
        input_dtype = amp
    conv = ShiftWiseConv2d(6, kernel_size=(13, 7), small_kernel=5, backend=backend)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    x = torch.randn(2, 6, 11, 9, generator=g).to(input_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=amp):
        y = conv(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    conv.zero_grad()
    x32 = x.detach().float().requires_grad_()  # what autocast computes: the same op on the input cast up
    expected = conv(x32)
    expected.square().sum().backward()
    assert torch.equal(y, expected)
    assert x.grad.dtype == input_dtype
    assert torch.equal(grads[0], x32.grad.to(input_dtype))
    assert torch.equal(grads[1], conv.weight.grad) and torch.equal(grads[2], conv.bias.grad)


@functools.lru_cache(maxsize=None)
def _demo():
    ckpt = read_checkpoint(str(package_file("slak_demo.pth")))
    test = Digits("test", transform_for(ckpt.config, ckpt.input_size))
    x = torch.stack([test[i][0] for i in range(len(test))])
    return build_model(ckpt), x


def test_converted_demo_under_bfloat16_autocast():
    original, x = _demo()
    converted = convert_model(original)
    with torch.no_grad():
        reference = original(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = converted(x).float()
            # the original's own bfloat16 error, for comparison, on a sample: its large depthwise convs
            # in bfloat16 take CPUs ~5x longer than the whole converted model
            theirs = original(x[:SAMPLE]).float()
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= AUTOCAST_LOGIT_TOL * scale
    sample_error = (ours[:SAMPLE] - reference[:SAMPLE]).abs().max()
    assert sample_error <= 2 * (theirs - reference[:SAMPLE]).abs().max()  # no worse than the original
    assert torch.equal(ours.argmax(1), reference.argmax(1))  # all 359 test digits classified as in float32
