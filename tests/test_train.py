"""``shiftwise train`` and ``shiftwise inspect``: resume, AMP, DDP, bad arguments, the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiftwise import cli
from shiftwise.sparse.train_data import Batches
from shiftwise.sparse.trainer import TrainConfig, load_checkpoint, lr_at, train

# A SLaK-architecture model small enough for a few CPU steps a second.
TINY = ["--model", "slak_demo", "--model-kwargs", '{"dims": [4, 8, 8, 8]}', "--image-size", "16",
        "--batch-size", "16", "--backend", "torch", "--update-every", "2", "--quiet", "--eval-every", "100"]


@pytest.fixture(autouse=True)
def _one_thread(request):
    # Tiny models run fastest on one thread, and a busy machine stalls OpenMP teams. Taichi reads the
    # thread count once, when it starts, so a test that may start it keeps the default.
    if "taichi" in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args, capsys=None):
    code = cli.main(["train", *TINY, *args])
    assert code == 0, capsys.readouterr().err if capsys else code
    return code


def final_state(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")


def records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 20, 0.0) == 0.25
    assert lr_at(3, 1.0, 4, 20, 0.0) == 1.0
    assert lr_at(4, 1.0, 4, 20, 0.0) == 1.0
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)


def test_batches_are_a_function_of_the_step():
    images = torch.arange(40.0).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    folder = torch.utils.data.TensorDataset(images, torch.arange(40))  # read through a DataLoader
    seq = Batches(folder, 8, 3, 0, 1, 0, 0)
    labels = [seq(s)[1] for s in range(12)]  # 5 steps an epoch: crosses two epoch ends
    assert labels[0].tolist() != labels[5].tolist()
    restarted = Batches(folder, 8, 3, 0, 1, 0, 0)
    assert all(torch.equal(restarted(s)[1], labels[s]) for s in range(7, 12))
    in_memory = Batches((images, torch.arange(40)), 8, 3, 0, 1, 0, 0)
    assert all(torch.equal(in_memory(s)[1], labels[s]) for s in range(12))
    ranks = [Batches(folder, 8, 3, r, 2, 0, 0)(4)[1] for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(labels[4].tolist())


def test_resume_is_bitwise_identical(tmp_path, capsys):
    flags = ["--steps", "8", "--density", "0.4", "--growth", "random", "--ema-decay", "0.9"]
    run([*flags, "-o", str(tmp_path / "full"), "--json"], capsys)
    captured = capsys.readouterr()
    done = json.loads(captured.out)  # stdout holds the JSON result only
    assert done["step"] == 8 and done["density"] == pytest.approx(0.4, abs=0.02)
    assert captured.err.splitlines() == [f"wrote checkpoint {tmp_path / 'full' / 'checkpoint.pt'}",
                                         f"wrote compacted model {tmp_path / 'full' / 'compact.pt'}",
                                         f"wrote metrics {tmp_path / 'full' / 'metrics.jsonl'}"]
    run([*flags, "-o", str(tmp_path / "cut"), "--stop-after", "5"])
    assert final_state(tmp_path / "cut")["step"] == 5
    assert "stopped at step 5" in capsys.readouterr().out
    run(["-o", str(tmp_path / "cut"), "--resume"])
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    assert a["step"] == b["step"] == 8
    for k in a["sparse"]["masks"]:
        assert torch.equal(a["sparse"]["masks"][k], b["sparse"]["masks"][k]), k
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    for k, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)
    # the metrics log of the resumed run reads as one run: each step once
    steps = [r["step"] for r in records(tmp_path / "cut") if r["event"] == "train"]
    assert steps == sorted(set(steps)) == [r["step"] for r in records(tmp_path / "full") if r["event"] == "train"]


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradual")
    run(["--steps", "6", "--density", "0.3", "--schedule", "gradual", "--schedule-end", "4", "--amp",
         "--init", "snip", "-o", str(out)])
    return out


def test_gradual_schedule_and_amp(gradual_run):
    ckpt = final_state(gradual_run)
    dens = [r["density"] for r in records(gradual_run) if r["event"] == "update"]
    assert dens[0] < 1.0 and dens == sorted(dens, reverse=True)
    total = sum(m.numel() for m in ckpt["sparse"]["masks"].values())
    kept = sum(int(m.sum()) for m in ckpt["sparse"]["masks"].values())
    assert abs(kept - round(0.3 * total)) <= len(ckpt["sparse"]["masks"])
    for name, mask in ckpt["sparse"]["masks"].items():  # masked tiles are exactly zero after AMP steps
        assert bool((ckpt["model"][name + ".weight"][~mask] == 0).all())


def test_inspect_table_json_plot(gradual_run, capsys):
    assert cli.main(["inspect", str(gradual_run / "checkpoint.pt")]) == 0
    table = capsys.readouterr().out
    assert "channels keeping k tiles" in table and "overall density 0.30" in table
    assert cli.main(["inspect", str(gradual_run / "compact.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["density"] == pytest.approx(0.3, abs=0.01)
    for layer in report["layers"]:
        assert sum(layer["histogram"]) == layer["channels"]
        assert sum(k * c for k, c in enumerate(layer["histogram"])) == layer["kept"]
    png = gradual_run / "hist.png"
    code = cli.main(["inspect", str(gradual_run / "checkpoint.pt"), "--plot", str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "needs matplotlib" in capsys.readouterr().err
    else:
        assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--density", "1.5"], r"--density must be in (0, 1]"),
    (["--density", "0"], r"--density must be in (0, 1]"),
    (["--schedule", "cosine"], "unknown --schedule 'cosine'; choose one of constant, gradual, linear"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    (["--ema-decay", "1.5"], "--ema-decay must be in (0, 1)"),
    (["--device", "tpu0"], "unknown device 'tpu0'; use cpu, cuda or cuda:N"),
])
def test_bad_arguments_refused(args, message, tmp_path, capsys):
    assert cli.main(["train", *args, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_image_folder(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / cls / f"{i}.png")
    # through the library, without the command
    config = TrainConfig(model="slak_demo", model_kwargs={"dims": [4, 8, 8, 8]}, image_size=16, backend="torch",
                         data=str(tmp_path / "data"), batch_size=4, steps=2, output=str(tmp_path / "run"))
    summary = train(config, show_progress=False)
    assert capsys.readouterr().out == ""
    assert summary["step"] == 2 and set(summary["outputs"]) == {"checkpoint", "compact", "metrics"}
    ckpt = final_state(tmp_path / "run")
    assert ckpt["num_classes"] == 2 and ckpt["model"]["head.weight"].shape[0] == 2
    assert ckpt["args"]["model_kwargs"] == {"dims": [4, 8, 8, 8]}


def test_existing_run_needs_resume_or_force(gradual_run, capsys):
    assert cli.main(["train", *TINY, "--steps", "2", "-o", str(gradual_run)]) == 2
    assert "pass --resume to continue that run or --force" in capsys.readouterr().err


def test_inspect_missing_file(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENABLE_TAICHI_HEADER_PRINT": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shiftwise", "train", *TINY, "--steps", "6", "--density", "0.3", "--growth", "gradient",
           "--device", "cpu", "-o", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = records(tmp_path)[-1]
    assert done["event"] == "done" and done["world_size"] == 2 and done["ranks_identical"]
    assert done["step"] == 6 and done["density"] == pytest.approx(0.3, abs=0.01)


def test_end_of_run_waits_until_gloo_lets_go_of_the_last_tensors(caplog):
    import threading

    from shiftwise.sparse import trainer
    held = [torch.zeros(2), torch.zeros(3)]
    other = [held[1]]  # another holder, as gloo's worker thread holding a finished collective
    threading.Timer(0.05, other.clear).start()
    trainer._wait_released(held, timeout=5.0)
    assert not other  # returned only once the other holder had let go
    other.append(held[0])
    with caplog.at_level("WARNING"):
        trainer._wait_released(held, timeout=0.02)
    assert "still holds" in caplog.text
