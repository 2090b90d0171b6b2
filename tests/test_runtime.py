"""Taichi runtime guards: threads, forked and spawned DataLoader workers."""
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import assert_close
from shiftwise import ShiftWiseConv2d, _runtime


def _pair(backend=None):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, (13, 5), padding=(6, 2), groups=4, dtype=torch.float64)
    return conv, ShiftWiseConv2d.from_dense(conv, backend=backend)


class _ConvDataset(Dataset):
    """Runs the shift-wise conv inside the worker (as a data-augmentation model would)."""

    def __init__(self, backend):
        self.conv, self.sw = _pair(backend)
        self.x = torch.randn(4, 4, 12, 12, dtype=torch.float64)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        with torch.no_grad():
            return self.sw(self.x[i:i + 1])[0], self.conv(self.x[i:i + 1])[0]


def test_threads_share_the_runtime_safely():
    conv, sw = _pair("taichi")
    inputs = [torch.randn(2, 4, 10 + i, 9, dtype=torch.float64) for i in range(6)]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = sw(inputs[i])
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert_close(results[i], conv(x))


def test_forked_workers_fall_back_to_torch_and_explicit_taichi_says_why():
    sw = _pair("taichi")[1]
    sw(torch.randn(1, 4, 8, 8, dtype=torch.float64))  # Taichi is live in this process
    assert _runtime.initialised_device() == "cpu"
    for a, b in DataLoader(_ConvDataset(None), batch_size=2, num_workers=2, multiprocessing_context="fork"):
        assert_close(a, b)
    with pytest.raises(Exception, match="forked after Taichi started"):
        list(DataLoader(_ConvDataset("taichi"), batch_size=2, num_workers=1, multiprocessing_context="fork"))


@pytest.mark.slow
def test_spawned_worker_runs_taichi():
    loader = DataLoader(_ConvDataset("taichi"), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    for a, b in loader:
        assert_close(a, b)
