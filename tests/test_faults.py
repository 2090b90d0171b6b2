"""Faults during ``shiftwise train``: SIGKILL at random points then --resume, a failed checkpoint
write (disk full), Ctrl-C. The run that survives must end bitwise equal to one never interrupted.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shiftwise import cli
from shiftwise.sparse.trainer import load_checkpoint

# A SLaK-architecture model small enough for ~20 CPU steps a second; a checkpoint after every step.
FLAGS = ["--model", "slak_demo", "--model-kwargs", '{"dims": [4, 8, 8, 8]}', "--image-size", "16", "--batch-size", "16",
         "--backend", "torch", "--update-every", "2", "--eval-every", "100", "--density", "0.4", "--growth", "random",
         "--ema-decay", "0.9", "--save-every", "1", "--log-every", "1", "--quiet"]
STEPS = 30
KILLS = 2  # SIGKILLs per run (one of a fresh run, one of a resumed one); docs/sparse-training.md quotes this figure
KILL_SEED = 7
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ENABLE_TAICHI_HEADER_PRINT": "0"}
RUN_FILES = {"checkpoint.pt", "metrics.jsonl", "compact.pt"}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shiftwise", "train", *FLAGS, "--steps", str(STEPS),
                             "-o", str(out), *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _logged_steps(out: Path) -> int:
    """The last step the metrics log records as finished (0 before the first)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if row.get("event") == "train":
            steps.append(row["step"])
    return max(steps, default=0)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _logged_steps(out) < step:
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.002)


def _same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, mask in a["sparse"]["masks"].items():
        assert torch.equal(mask, b["sparse"]["masks"][name]), name
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for idx, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][idx][name]), (idx, name)


def _finish(out: Path) -> dict:
    """Resume the run in ``out`` in this process (no kill follows, so no process of its own) and
    return its final checkpoint."""
    assert cli.main(["train", *FLAGS, "--steps", str(STEPS), "-o", str(out), "--resume"]) == 0
    return load_checkpoint(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final checkpoint of a run never interrupted. It runs in this process, on one thread: the
    trainer is deterministic, so it equals the same run in a subprocess bitwise, which every
    comparison with the killed runs (subprocesses) checks again."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", *FLAGS, "--steps", str(STEPS), "-o", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(out / "checkpoint.pt")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path, reference):
    rng = random.Random(KILL_SEED)
    targets = sorted(rng.sample(range(2, STEPS - 2), KILLS))
    saved = 0  # highest step a checkpoint held so far
    proc = _start(tmp_path)
    for target in targets:
        _wait_for_step(proc, tmp_path, target)
        time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in a step: forward, backward, mask update, save
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        logged = _logged_steps(tmp_path)
        ckpt = load_checkpoint(tmp_path / "checkpoint.pt")  # never corrupt: the write is atomic
        # no completed step lost: every step is saved once done, so at most the step in flight is missing
        assert ckpt["step"] >= max(saved, logged - 1), (ckpt["step"], saved, logged)
        saved = ckpt["step"]
        if target != targets[-1]:
            proc = _start(tmp_path, "--resume")  # a fresh process resumes, to be killed again
    _same_state(_finish(tmp_path), reference)
    assert set(os.listdir(tmp_path)) == RUN_FILES  # no temporary file left by a kill during a save
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    assert steps == list(range(1, STEPS + 1))  # the log reads as one run


def test_torn_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path, capsys):
    assert cli.main(["train", *FLAGS, "--steps", "4", "--stop-after", "2", "-o", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 3, "lo')  # killed in the middle of a write
    assert cli.main(["train", "-o", str(tmp_path), "--resume"]) == 0, capsys.readouterr().err
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1, 2, 3, 4]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_on_the_fourth(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            f.write(b"PK\x03\x04 partial")  # some bytes reach the disk before it fills
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_the_fourth)
    assert cli.main(["train", *FLAGS, "--steps", "6", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert "checkpoint.pt" in err and "nothing was changed" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3  # the previous one, intact and loadable
    assert set(os.listdir(tmp_path)) == {"checkpoint.pt", "metrics.jsonl"}  # no temporary file left
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(["train", "-o", str(tmp_path), "--resume"]) == 0
    full = tmp_path / "full"
    assert cli.main(["train", *FLAGS, "--steps", "6", "-o", str(full)]) == 0
    _same_state(load_checkpoint(tmp_path / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt"))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path, reference):
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 2 and "press again to stop at once" in lines[0], err
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert lines[1].startswith(f"shiftwise train: interrupted at step {ckpt['step']}/{STEPS}; saved "), err
    assert lines[1].endswith("continue with --resume"), err
    assert ckpt["step"] >= _logged_steps(tmp_path)  # saved at a step boundary: nothing half-done, nothing lost
    assert set(os.listdir(tmp_path)) == {"checkpoint.pt", "metrics.jsonl"}
    _same_state(_finish(tmp_path), reference)
