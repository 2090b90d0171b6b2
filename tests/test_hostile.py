"""Hostile checkpoint files: pickled code never runs, bombs are refused before they allocate, and
broken copies end in :class:`CheckpointError` (Python API) or one line and exit code 2 (CLI), with
no output file left behind. Complements the basic refusals in test_io.py / test_cli_checkpoint.py;
docs/checkpoints.md quotes the figures these tests check.
"""
import argparse
import builtins
import dataclasses
import functools
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from shiftwise.convert.io import CheckpointError, build_model, read_checkpoint
from shiftwise.cli import main
from shiftwise.models import create_model, randomize_

# every command that takes a checkpoint: its argv, given the checkpoint and a scratch folder
COMMANDS = {
    "convert": lambda ckpt, d: ["convert", ckpt, "-o", str(d / "out.pth")],
    "eval": lambda ckpt, d: ["eval", ckpt, "--workers", "0", "--limit", "4"],
    "verify": lambda ckpt, d: ["verify", ckpt, "--workers", "0", "--limit", "4"],
    "inspect": lambda ckpt, d: ["inspect", ckpt],
    "erf": lambda ckpt, d: ["erf", ckpt, "--data", str(d), "--num-images", "1", "--image-size", "32"],
    "export": lambda ckpt, d: ["export", ckpt, "-o", str(d / "out.onnx"), "--image-size", "32"],
    "train": lambda ckpt, d: ["train", "--resume", ckpt, "-o", str(d / "run"), "--quiet"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@functools.lru_cache(maxsize=None)
def _tiny_model():
    """slak_demo's architecture at widths 4-8: a SLaK-format file of 69 kB, quick to fuzz."""
    return randomize_(create_model("slak_demo", dims=(4, 8, 8, 8)), seed=5, calibrate=32).eval()


def _slak_layout(model, **extra_args):
    """SLaK's main.py checkpoint layout, its training ``args`` an argparse.Namespace."""
    args = argparse.Namespace(model="SLaK_tiny", input_size=32, kernel_size=[31, 15, 9, 7, 5], Decom=True, bn=True,
                              nb_classes=10, **extra_args)
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "params": [0]}]},
            "epoch": 120, "scaler": {"scale": 65536.0}, "args": args}


@functools.lru_cache(maxsize=None)
def _valid_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_slak_layout(_tiny_model()), buf)
    return buf.getvalue()


def _cli(argv, capsys):
    """(exit code, stderr) of ``shiftwise ARGV`` in this process."""
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def _assert_refused(argv, capsys, folder):
    """One line on stderr, exit code 2, and no new file in ``folder``."""
    before = set(os.listdir(folder))
    rc, err = _cli(argv, capsys)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    assert set(os.listdir(folder)) <= before, "partial output left behind"
    return err


# pickled code -------------------------------------------------------------------------------------
class _RunsCode:
    """Pickles as ``func(*args)``: what a malicious checkpoint runs under a plain torch.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _EvilDict(dict):
    """A dict whose unpickling (BUILD -> __setstate__) creates the marker."""

    marker = None

    def __setstate__(self, state):
        open(state["marker"], "w").close()

    def __reduce_ex__(self, protocol):
        return _EvilDict, (), {"marker": self.marker}


class _EvilTensor(torch.Tensor):
    """A Tensor subclass whose ``__setstate__`` runs when torch rebuilds it."""

    def __setstate__(self, state):
        attrs = state[0] if isinstance(state, tuple) else state
        open(attrs["marker_path"], "w").close()


def _touch(marker):
    return f"touch {marker}"


def _opener(marker):
    return f"open({str(marker)!r}, 'w').close()"


def _zip_with_pickle(pkl: bytes) -> bytes:
    """A valid torch zip archive whose data.pkl is replaced by ``pkl``."""
    src = zipfile.ZipFile(io.BytesIO(_valid_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return out.getvalue()


def _getattr_pickle(marker) -> bytes:
    # getattr(__import__('os'), 'system')('touch MARKER'), written by hand (protocol 0 opcodes, protocol 2 header)
    return (b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + _touch(marker).encode() + b"\ntR.")


def _payload(kind, marker, path):
    """Write a checkpoint whose loading with a plain ``torch.load`` would create ``marker``."""
    model = _tiny_model()
    if kind == "os.system":
        torch.save({**_slak_layout(model), "epoch": _RunsCode(os.system, _touch(marker))}, path)
    elif kind == "eval":
        sd = dict(model.state_dict(), extra=_RunsCode(eval, _opener(marker)))
        torch.save({"model": sd}, path)
    elif kind == "exec_raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(_RunsCode(exec, _opener(marker)), f, protocol=2)
    elif kind == "getattr":
        path.write_bytes(_zip_with_pickle(_getattr_pickle(marker)))
    elif kind == "getattr_raw_pickle":
        path.write_bytes(_getattr_pickle(marker))
    elif kind == "dict_setstate":
        evil = _EvilDict()
        evil.marker = str(marker)
        torch.save({"model": model.state_dict(), "optimizer": evil}, path)
    elif kind == "tensor_subclass":
        t = torch.zeros(3).as_subclass(_EvilTensor)
        t.marker_path = str(marker)
        torch.save({"model": dict(model.state_dict(), head_extra=t)}, path)
    elif kind == "tensor_reduce_ex":
        class Tensor(torch.Tensor):
            def __reduce_ex__(self, protocol):
                return os.system, (_touch(marker),)
        torch.save({"model": dict(model.state_dict(), **{"head.bias": model.head.bias.detach().as_subclass(Tensor)})},
                   path)
    elif kind == "namespace_smuggled":
        torch.save(_slak_layout(model, smuggled=_RunsCode(os.system, _touch(marker))), path)
    elif kind == "namespace_function":
        torch.save(_slak_layout(model, hook=builtins.exec), path)  # a bare global, never called here
    else:
        raise ValueError(kind)


PAYLOADS = ["os.system", "eval", "exec_raw_pickle", "getattr", "getattr_raw_pickle", "dict_setstate",
            "tensor_subclass", "tensor_reduce_ex", "namespace_smuggled", "namespace_function"]


def test_payloads_would_run_under_a_plain_load(tmp_path):
    """The payloads are real: ``torch.load(weights_only=False)`` / ``pickle.load`` runs them."""
    for kind in PAYLOADS:
        if kind == "namespace_function":
            continue  # holds a reference to exec, runs nothing by itself
        marker = tmp_path / f"{kind}.ran"
        path = tmp_path / f"{kind}.pth"
        _payload(kind, marker, path)
        try:
            if path.read_bytes()[:2] == b"PK":
                torch.load(path, weights_only=False)
            else:
                pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 (the payload runs before any later failure)
            pass
        assert marker.exists(), kind


@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickled_code_is_refused_by_the_api(tmp_path, kind):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    _payload(kind, marker, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickled_code_is_refused_by_every_command(tmp_path, capsys, command, kind):
    marker, path = tmp_path / "ran", tmp_path / "evil.pth"
    _payload(kind, marker, path)
    err = _assert_refused(COMMANDS[command](str(path), tmp_path), capsys, tmp_path)
    assert not marker.exists()
    assert str(path) in err


# bombs: files declaring far more than they hold -----------------------------------------------------
def _one_tensor_file(numel_edits=None) -> bytes:
    """``{"model": {"w": 7 zeros}}``, its pickle's ints 7 (storage numel, then size) optionally replaced."""
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(7)}}, buf)
    if not numel_edits:
        return buf.getvalue()
    src = zipfile.ZipFile(buf)
    pkl_name = next(n for n in src.namelist() if n.endswith("/data.pkl"))
    pkl = src.read(pkl_name)
    assert pkl.count(b"K\x07") == 2  # BININT1 7: the storage's numel, then the tensor's size
    parts = pkl.split(b"K\x07")
    pkl = parts[0] + numel_edits[0] + parts[1] + numel_edits[1] + parts[2]
    return _rezip(src, {pkl_name: pkl})


def _rezip(src: zipfile.ZipFile, replace: dict, zeros: dict = None) -> bytes:
    """A copy of ``src`` with records replaced; ``zeros`` (name -> bytes) become deflated runs of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            if info.filename in (zeros or {}):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with z.open(record, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 24)
                    for start in range(0, zeros[info.filename], len(chunk)):
                        f.write(chunk[: zeros[info.filename] - start])
            else:
                z.writestr(info.filename, replace.get(info.filename, src.read(info.filename)))
    return out.getvalue()


def _converted_with(tmp_path, name, **meta_changes) -> str:
    """A converted tiny SLaK whose shiftwise metadata is forged with ``meta_changes``."""
    src, dst = tmp_path / "tiny.pth", tmp_path / "tiny_sw.pth"
    if not dst.exists():
        src.write_bytes(_valid_bytes())
        assert main(["convert", str(src), "-o", str(dst)]) == 0
    obj = torch.load(dst, weights_only=True)
    kwargs = meta_changes.pop("kwargs", {})
    obj["shiftwise"]["model"]["kwargs"].update(kwargs)
    obj["shiftwise"].update(meta_changes)
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


def _bombs(tmp_path) -> dict:
    """name -> path of a file declaring gigabytes to terabytes it does not hold."""
    files = {}

    def put(name, data):
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)

    put("storage_numel_2^40.pth", _one_tensor_file([b"\x8a\x06" + (1 << 40).to_bytes(6, "little"), b"K\x07"]))
    numel = struct.pack("<i", 1 << 26)  # 256 MiB of float32 zeros, deflated into ~260 kB
    plain = zipfile.ZipFile(io.BytesIO(_one_tensor_file([b"J" + numel, b"J" + numel])))
    record = next(n for n in plain.namelist() if n.endswith("/data/0"))
    put("deflate_256MiB.pth", _rezip(plain, {}, zeros={record: 1 << 28}))
    legacy = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(7)}}, legacy, _use_new_zipfile_serialization=False)
    put("legacy_64GiB.pth", legacy.getvalue().replace(b"K\x07", b"\x8a\x05" + (1 << 34).to_bytes(5, "little"), 1))
    sd = dict(_tiny_model().state_dict())
    sd["head.weight"] = torch.zeros(1, 1).expand(1 << 37, sd["head.weight"].shape[1])  # 4 TiB of classes
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    put("stride0_4TiB.pth", buf.getvalue())
    sd = dict(_tiny_model().state_dict(), **{"stages.0.99999999.gamma": torch.ones(4)})
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    put("block_index_10^8.pth", buf.getvalue())
    files["meta_depths_10^8.pth"] = _converted_with(tmp_path, "meta_depths_10^8.pth",
                                                    kwargs={"depths": [10**8, 1, 1, 1]})
    files["meta_dims_10^6.pth"] = _converted_with(tmp_path, "meta_dims_10^6.pth", kwargs={"dims": [10**6] * 4})
    files["meta_kernel_10^7.pth"] = _converted_with(tmp_path, "meta_kernel_10^7.pth",
                                                    kwargs={"kernel_size": [10**7 + 1, 15, 9, 7, 5]})
    files["meta_tile_10001.pth"] = _converted_with(tmp_path, "meta_tile_10001.pth", tile_size=10001)
    return files


_BOMB_CHILD = r"""
import contextlib, io, json, resource, sys
from shiftwise.convert.io import CheckpointError, build_model, read_checkpoint
from shiftwise.cli import main

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

paths, out, warm = json.loads(sys.argv[1])
build_model(read_checkpoint(warm))  # first-call costs outside the measurement
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # an unguarded bomb fails fast
results = {}
for path in paths:
    before = peak()
    try:
        build_model(read_checkpoint(path))
        outcome = "loaded"
    except CheckpointError as exc:
        outcome = str(exc)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["convert", path, "-o", out])
    results[path] = {"api": outcome, "rc": rc, "err": err.getvalue(), "grew": peak() - before}
print(json.dumps(results))
"""


def test_bombs_are_refused_before_allocating(tmp_path):
    """Each file claims 256 MiB to 4 TiB; reading it costs < 64 MiB and ends in CheckpointError / exit 2."""
    files = _bombs(tmp_path)
    warm = tmp_path / "valid.pth"
    warm.write_bytes(_valid_bytes())
    out = tmp_path / "out.pth"
    proc = subprocess.run([sys.executable, "-c", _BOMB_CHILD, json.dumps([list(files.values()), str(out), str(warm)])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for name, path in files.items():
        r = results[path]
        assert r["api"] != "loaded", name
        assert path in r["api"] and "can't allocate" not in r["api"] and "MemoryError" not in r["api"], (name, r)
        assert r["rc"] == 2 and len(r["err"].strip().splitlines()) == 1 and "Traceback" not in r["err"], (name, r)
        assert r["grew"] < 64 << 20, (name, r["grew"])
        assert not out.exists()


# truncated and bit-flipped copies ------------------------------------------------------------------
FUZZ_SEED = 20240611
FUZZ_CUTS, FUZZ_FLIPS, FUZZ_SMASHES = 120, 240, 60  # docs/checkpoints.md quotes these figures
# Most loadable mutants differ from the valid file in tensor values only (a flip inside tensor data):
# the same model is built from the same keys, shapes and metadata each time, so one in VALUES_EVERY
# of them is built and run (or sent through the CLI); every other mutant always is.
VALUES_EVERY = 4


def _layout(ckpt) -> tuple:
    """Everything a read checkpoint says but its tensor values: keys, shapes, strides, dtypes, metadata."""
    tensors = [(k, v.dtype, tuple(v.shape), v.stride(), v.storage_offset()) for k, v in ckpt.state_dict.items()]
    fields = [(f.name, getattr(ckpt, f.name)) for f in dataclasses.fields(ckpt)
              if f.name not in ("path", "sha256", "state_dict")]
    return tensors, repr(fields)  # (a tensor in the metadata: its values count, as structure)


def _structure(data: bytes) -> list:
    """Byte ranges of everything but tensor payloads: zip headers, data.pkl, small records, the directory."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    ranges, last = [], 0
    for info in sorted(archive.infolist(), key=lambda i: i.header_offset):
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header is 30 bytes
        if "/data/" in info.filename:
            ranges.append((last, start))
            last = start + info.compress_size
    ranges.append((last, len(data)))
    return ranges


def _mutations(data: bytes):
    """(description, bytes): seeded truncations, single-bit flips and short overwrites of ``data``."""
    rng = random.Random(FUZZ_SEED)
    structure = _structure(data)

    def structural_offset():
        lo, hi = rng.choice(structure)
        return rng.randrange(lo, hi)

    cuts = sorted({0, 1, 4, len(data) - 1, len(data) - 22} | {rng.randrange(len(data)) for _ in range(FUZZ_CUTS)})
    for cut in cuts[:FUZZ_CUTS]:
        yield f"cut at {cut}", data[:cut]
    for i in range(FUZZ_FLIPS):
        pos = structural_offset() if i % 2 else rng.randrange(len(data))
        bit = rng.randrange(8)
        yield f"flip bit {bit} of byte {pos}", data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]
    for _ in range(FUZZ_SMASHES):
        pos, n = structural_offset(), rng.randint(1, 8)
        yield f"overwrite {n} bytes at {pos}", data[:pos] + rng.randbytes(n) + data[pos + n:]


def _values_only(tmp_path):
    """A function telling whether a read checkpoint differs from the valid file in tensor values only."""
    (tmp_path / "valid.pth").write_bytes(_valid_bytes())
    valid = _layout(read_checkpoint(tmp_path / "valid.pth"))
    (tmp_path / "valid.pth").unlink()
    return lambda ckpt: _layout(ckpt) == valid


def test_fuzzed_copies_load_or_raise_checkpoint_error(tmp_path):
    """Every mutation of a valid SLaK file either loads or raises CheckpointError: no other exception."""
    data = _valid_bytes()
    path = tmp_path / "mutant.pth"
    values_only, seen = _values_only(tmp_path), 0
    outcomes, unexpected = {"loaded": 0, "refused": 0}, []
    for what, mutant in _mutations(data):
        path.write_bytes(mutant)
        try:
            ckpt = read_checkpoint(path)
            if values_only(ckpt):
                seen += 1
                if seen % VALUES_EVERY:
                    outcomes["loaded"] += 1  # read; built as the last values-only mutant was
                    continue
            model = build_model(ckpt)
            with torch.no_grad():
                model(torch.zeros(1, 3, 32, 32))
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert "\n" not in str(exc), (what, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 (what the test hunts for)
            unexpected.append(f"{what}: {type(exc).__name__}: {exc}")
    assert not unexpected, f"{len(unexpected)} mutations escaped CheckpointError:\n" + "\n".join(unexpected[:10])
    assert sum(outcomes.values()) == FUZZ_CUTS + FUZZ_FLIPS + FUZZ_SMASHES
    assert outcomes["refused"] >= FUZZ_CUTS  # every truncation is refused; most structural damage too
    assert seen >= VALUES_EVERY * 10  # a sample of value-only mutants was built and run


def test_fuzzed_copies_through_the_cli(tmp_path, capsys):
    """Every 6th mutation (of those changing tensor values only, one in VALUES_EVERY) through ``shiftwise
    convert``: exit 0 with a loadable output, or one line, exit 2, no file."""
    data = _valid_bytes()
    src, out = tmp_path / "mutant.pth", tmp_path / "out.pth"
    values_only, seen = _values_only(tmp_path), 0
    for i, (what, mutant) in enumerate(_mutations(data)):
        if i % 6:
            continue
        src.write_bytes(mutant)
        try:
            if values_only(read_checkpoint(src)):
                seen += 1
                if seen % VALUES_EVERY:
                    continue  # converted as the last values-only mutant was
        except CheckpointError:
            pass
        rc, err = _cli(["convert", str(src), "-o", str(out)], capsys)
        if rc == 0:
            assert read_checkpoint(out).converted, what
            out.unlink()
        else:
            assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert sorted(os.listdir(tmp_path)) == ["mutant.pth"], (what, os.listdir(tmp_path))


# wrong files --------------------------------------------------------------------------------------
def _wrong_file(kind, tmp_path):
    path = tmp_path / "ckpt.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "html":
        path.write_text("<html><body>Quota exceeded: the file cannot be downloaded</body></html>\n")
    elif kind == "resnet":
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    elif kind == "tensor_not_dict":
        torch.save(torch.zeros(3), path)
    elif kind == "int_keys":
        torch.save({"model": {0: torch.zeros(3), 1: torch.zeros(3)}}, path)
    elif kind == "safetensors_garbage":
        path.write_bytes(struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [1000000000' + b"\0" * 8)
    return str(path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["empty", "directory", "html", "resnet", "tensor_not_dict", "int_keys",
                                  "safetensors_garbage"])
def test_wrong_files_are_one_line_exit_2(tmp_path, capsys, command, kind):
    path = _wrong_file(kind, tmp_path)
    _assert_refused(COMMANDS[command](path, tmp_path), capsys, tmp_path)


def test_wrong_family_and_wrong_kind_of_checkpoint(tmp_path, capsys):
    official = tmp_path / "slak.pth"
    official.write_bytes(_valid_bytes())
    replknet = tmp_path / "replknet.pth"
    torch.save(randomize_(create_model("replknet", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                       large_kernel_sizes=(7, 7, 7, 7), num_classes=10), calibrate=32).state_dict(),
               replknet)
    for command in ("convert", "eval", "verify"):
        err = _assert_refused(COMMANDS[command](str(replknet), tmp_path) + ["--family", "slak"], capsys, tmp_path)
        assert "is a RepLKNet checkpoint, not SLaK" in err
        err = _assert_refused(COMMANDS[command](str(official), tmp_path) + ["--family", "unireplknet"], capsys,
                              tmp_path)
        assert "is a SLaK checkpoint, not UniRepLKNet" in err
    assert "not a shiftwise train checkpoint" in _assert_refused(COMMANDS["train"](str(official), tmp_path), capsys,
                                                                 tmp_path)
    assert main(COMMANDS["inspect"](str(official), tmp_path)) == 0  # the tiles of its full conversion
    assert "overall density 1.0000" in capsys.readouterr().out
    converted = tmp_path / "sw.pth"
    assert main(["convert", str(official), "-o", str(converted)]) == 0
    capsys.readouterr()
    assert "already converted" in _assert_refused(["convert", str(converted), "-o", str(tmp_path / "again.pth")],
                                                  capsys, tmp_path)
    assert "already converted" in _assert_refused(COMMANDS["verify"](str(converted), tmp_path), capsys, tmp_path)


def test_hints_outside_any_image_size_are_ignored(tmp_path, caplog):
    path = tmp_path / "slak.pth"
    torch.save(dict(_slak_layout(_tiny_model()), args=argparse.Namespace(model="SLaK_tiny", input_size=10**9)), path)
    assert read_checkpoint(path).input_size is None  # eval would otherwise resize to 10^9 x 10^9
    assert "ignoring args.input_size=1000000000" in caplog.text
    torch.save(dict(_slak_layout(_tiny_model()), args=argparse.Namespace(input_size=224)), path)
    assert read_checkpoint(path).input_size == 224
