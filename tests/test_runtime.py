"""Taichi runtime guards: threads, forked and spawned DataLoader workers, the CUDA device Taichi
addresses (simulated device indices), TI_ARCH, a failed start, and the rank-to-GPU mapping of
training under torchrun."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import assert_close
from shiftwise import ShiftWiseConv2d, _runtime, dispatch
from shiftwise.errors import ShiftwiseError
from shiftwise.sparse import trainer


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


# --- which CUDA device Taichi can address -------------------------------------------------------------------
@pytest.fixture
def fresh(monkeypatch):
    """Taichi not started yet as far as the checks see, no TI_ARCH, and CUDA streams that pass the
    default-stream check (no GPU here)."""
    monkeypatch.setattr(_runtime, "_arch_device", None)
    monkeypatch.setattr(_runtime, "_failed", {})
    monkeypatch.delenv("TI_ARCH", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "default")
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: "default")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return monkeypatch


def test_cuda_tensors_beyond_the_first_visible_gpu_are_refused_before_a_launch(fresh):
    _runtime.check_runnable(torch.device("cuda", 0))  # the first visible GPU: accepted
    _runtime.check_runnable(torch.device("cuda"))  # the current device, 0
    for device, current, visible, fix in [
        (torch.device("cuda", 1), 0, None, "CUDA_VISIBLE_DEVICES=1"),
        (torch.device("cuda", 3), 3, None, "CUDA_VISIBLE_DEVICES=3"),  # also the current device: still refused
        (torch.device("cuda"), 2, None, "CUDA_VISIBLE_DEVICES=2"),  # no index: the current device counts
        (torch.device("cuda", 1), 0, "5,7", "CUDA_VISIBLE_DEVICES=7"),  # the launcher's list: its second GPU
    ]:
        fresh.setattr(torch.cuda, "current_device", lambda current=current: current)
        if visible is None:
            fresh.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            fresh.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(_runtime.WrongCudaDevice) as info:
            _runtime.check_runnable(device)
        text = str(info.value)
        assert "\n" not in text and fix in text and "one process per GPU" in text and "cuda:0" in text
        assert f"cuda:{device.index if device.index is not None else current}" in text
        assert isinstance(info.value, ShiftwiseError)  # the CLI prints it in one line, exit 2
    # nothing was started on the way
    assert _runtime._arch_device is None


def test_launch_refuses_the_wrong_gpu_before_starting_taichi(fresh):
    started = []
    fresh.setattr(_runtime, "_init", lambda device_type: started.append(device_type))
    with pytest.raises(_runtime.WrongCudaDevice):
        with _runtime.launch(torch.device("cuda", 2)):
            started.append("launched")
    assert started == []


def test_ti_arch_disagreeing_with_the_tensors_raises_for_every_taichi_backend(fresh):
    fresh.setenv("TI_ARCH", "x64")
    _runtime.check_runnable(torch.device("cpu"))
    with pytest.raises(_runtime.TaichiArchMismatch, match="TI_ARCH=x64 starts Taichi on x64, but the tensors are on "
                                                          "cuda"):
        _runtime.check_runnable(torch.device("cuda", 0))
    fresh.setenv("TI_ARCH", "cuda")
    _runtime.check_runnable(torch.device("cuda", 0))
    for backend in ("auto", "taichi", "taichi_decomposed"):  # auto does not hide it
        with pytest.raises(_runtime.TaichiArchMismatch, match="set it to x64 or arm64"):
            dispatch.resolve_backend(backend, torch.device("cpu"))
    assert dispatch.resolve_backend("torch", torch.device("cpu")) == "torch"
    for name in ("vulkan", "cpu", "gpu"):  # another arch; names Taichi does not know (it would abort)
        fresh.setenv("TI_ARCH", name)
        with pytest.raises(_runtime.TaichiArchMismatch, match=f"TI_ARCH={name!r} is not a Taichi arch name"
                           if name != "vulkan" else "TI_ARCH=vulkan starts Taichi on vulkan"):
            _runtime.check_runnable(torch.device("cpu"))
    # once Taichi runs, TI_ARCH is not read again (ti.init is not called again)
    fresh.setattr(_runtime, "_arch_device", "cpu")
    _runtime.check_runnable(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_on_the_installed_taichi_a_failed_cuda_start_is_remembered_and_ti_arch_overrides_the_arch():
    # in a process of its own (ti.init resets the runtime): shiftwise's start on CUDA fails with the
    # reason, is remembered, and leaves Taichi unstarted; then the premise of the TI_ARCH check:
    # asked for CUDA without fallback, ti.init starts on the arch TI_ARCH names instead
    code = "\n".join([
        "import os, torch, taichi as ti",
        "from shiftwise import _runtime",
        "try:",
        "    _runtime._init('cuda')",
        "except _runtime.TaichiUnavailable as exc:",
        "    print('first:', exc)",
        "try:",
        "    _runtime.check_runnable(torch.device('cuda', 0))",
        "except _runtime.TaichiUnavailable as exc:",
        "    print('again:', exc)",
        "print('arch:', _runtime.initialised_device())",
        "os.environ['TI_ARCH'] = 'x64'",
        "ti.init(arch=ti.cuda, enable_fallback=False, log_level=ti.ERROR)",
        "print('TI_ARCH=x64, arch=cuda:', ti.lang.impl.current_cfg().arch)",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TI_ARCH"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ENABLE_TAICHI_HEADER_PRINT": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines() if ": " in line)
    assert lines["first"].startswith("Taichi could not start on cuda (") and "backend='torch'" in lines["first"]
    assert lines["again"] == lines["first"] and lines["arch"] == "None"  # not on the CPU behind the caller's back
    assert lines["TI_ARCH=x64, arch=cuda"] == "Arch.x64"


# --- one GPU per process under torchrun -------------------------------------------------------------------
@pytest.mark.parametrize("local, visible, count, ranks, want", [
    (0, None, None, None, "0"),
    (3, None, 4, 4, "3"),
    (1, "4,6", None, 2, "6"),  # the launcher's selection is respected
    (1, "4, 6 ,", 8, None, "6"),
    (0, "GPU-8e1c,GPU-77aa", 2, 2, "GPU-8e1c"),  # UUIDs
    (1, "MIG-1,MIG-2", None, None, "MIG-2"),
])
def test_rank_gpu(local, visible, count, ranks, want):
    assert _runtime.rank_gpu(local, visible, count, ranks) == want


@pytest.mark.parametrize("local, visible, count, ranks, message", [
    (2, None, 2, None, "3 processes on this node but 2 GPUs visible; Taichi runs each process on one GPU of its own: "
                       "start at most 2 per node (torchrun --nproc-per-node 2)"),
    (0, None, 2, 4, "4 processes on this node but 2 GPUs visible"),  # every rank refuses, rank 0 too
    (1, "3,-1,5", None, None, "2 processes on this node but 1 GPU visible (CUDA_VISIBLE_DEVICES=3,-1,5)"),
    (2, "0,1,2,3", 2, None, "3 processes on this node but 2 GPUs visible"),  # fewer GPUs than the list names
    (0, "", None, None, "no GPU visible (CUDA_VISIBLE_DEVICES=) for local rank 0"),
    (-1, None, 2, None, "local rank -1 is negative"),
])
def test_rank_gpu_refuses_more_ranks_than_gpus_in_one_line(local, visible, count, ranks, message):
    with pytest.raises(ValueError) as info:
        _runtime.rank_gpu(local, visible, count, ranks)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def torchrun(monkeypatch):
    """A process as torchrun starts it (rank 1 of 2 on one node), CUDA not started, NVML counting
    two GPUs; the mapping's effect on CUDA_VISIBLE_DEVICES is undone after the test."""
    return _as_torchrun(monkeypatch)


def _as_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # records the value (or its absence) to restore
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(trainer, "_bound", {})
    monkeypatch.setattr(trainer, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    return monkeypatch


def test_torchrun_rank_gets_its_gpu_as_its_only_device(torchrun):
    assert trainer.bind_rank_gpu() == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert trainer.bind_rank_gpu("cuda") == "1"  # again in the same process: the same, not rank 1 of ["1"]
    torchrun.setattr(trainer, "_bound", {})
    torchrun.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert trainer.bind_rank_gpu("cuda") == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.parametrize("device, world, count", [("cpu", "2", 2), (None, "2", 0), ("cuda", "2", 0), (None, "1", 2)])
def test_torchrun_binding_leaves_cpu_and_single_process_runs_alone(torchrun, device, world, count):
    torchrun.setenv("WORLD_SIZE", world)
    torchrun.setattr(trainer, "visible_gpu_count", lambda: count)
    assert trainer.bind_rank_gpu(device) is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_torchrun_binding_refusals(torchrun):
    with pytest.raises(ValueError, match="--device cuda:1 under torchrun: each process takes the GPU of its local "
                                         "rank"):
        trainer.bind_rank_gpu("cuda:1")
    torchrun.setattr(trainer, "visible_gpu_count", lambda: 1)
    with pytest.raises(ValueError, match=r"start at most 1 per node \(torchrun --nproc-per-node 1\)"):
        trainer.bind_rank_gpu()
    torchrun.setattr(trainer, "visible_gpu_count", lambda: 2)
    torchrun.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ShiftwiseError, match="CUDA started in this process before local rank 1 could be given its own "
                                             "GPU; start the process with CUDA_VISIBLE_DEVICES=1"):
        trainer.bind_rank_gpu()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_setup_distributed_binds_the_gpu_before_cuda_is_asked_anything(torchrun):
    seen, backends = [], []

    def is_available():
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        return False  # no CUDA here: gloo, on the CPU

    torchrun.setattr(torch.cuda, "is_available", is_available)
    torchrun.setattr(trainer.dist, "init_process_group", lambda backend: backends.append(backend))
    rank, world, device = trainer.setup_distributed(None)
    assert seen and set(seen) == {"1"}  # every CUDA question came after the mapping
    assert backends == ["gloo"] and device == torch.device("cpu") and (rank, world) == (0, 1)


@pytest.mark.parametrize("seen", [1, 4])
def test_setup_distributed_on_cuda_runs_nccl_on_cuda0_and_checks_the_mapping_took(torchrun, seen):
    # a simulated GPU machine: CUDA becomes available once the rank's GPU is bound; CUDA started
    # earlier in the process would still show every GPU, which is refused
    backends = []
    torchrun.setattr(torch.cuda, "is_available", lambda: True)
    torchrun.setattr(torch.cuda, "init", lambda: None)
    torchrun.setattr(torch.cuda, "device_count", lambda: seen)
    torchrun.setattr(torch.cuda, "current_device", lambda: 0)
    torchrun.setattr(trainer.dist, "init_process_group", lambda backend: backends.append(backend))
    if seen == 1:
        assert trainer.setup_distributed("cuda")[2] == torch.device("cuda", 0)
        assert backends == ["nccl"] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    else:
        with pytest.raises(ShiftwiseError, match="CUDA started in this process before CUDA_VISIBLE_DEVICES=1 was set "
                                                 r"\(it sees 4 GPUs\)"):
            trainer.setup_distributed(None)
        assert backends == []



def test_torchrun_fixture_leaves_cuda_visible_devices_as_it_was():
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    patch = pytest.MonkeyPatch()
    try:
        _as_torchrun(patch)
        assert trainer.bind_rank_gpu("cuda") == "1"  # writes os.environ itself
    finally:
        patch.undo()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
