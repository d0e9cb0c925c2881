"""The Paddle-Lite backend: .nb checks, target refusal, input checks, and real runs through the side env.

The main environment has no paddlelite (it needs Python <= 3.10 and numpy < 2): the session logic is
tested here with fake ``paddlelite`` modules and predictors; real Lite runs go through
:class:`edge_shitu_converters.lite_worker.SideEnvSession` (skipped, naming the side environment, when it is absent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import signal
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest_for
from edge_shitu_converters import lite_worker
from edge_shitu_converters.lite_worker import SideEnvSession, WorkerCrashError, find_lite_python
from edge_shitu.backends import create_session
from edge_shitu.backends import paddlelite as pl
from edge_shitu.backends.paddlelite import PaddleLiteSession, check_nb_target, machine_target, read_nb_targets
from edge_shitu.bundle import Bundle
from edge_shitu.errors import (
    BackendUnavailableError,
    BundleError,
    ConversionError,
    IntegrityError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
    TargetMismatchError,
)

X86_KERNELS = (b"conv2d/def/2/1/1", b"relu/def/2/1/1", b"feed/def/1/0/2", b"fetch/def/1/0/2")
ARM_KERNELS = (b"conv2d/def/4/1/1", b"conv2d/int8_out/4/2/1", b"feed/def/1/0/2", b"calib/fp32_to_int8/6/2/1")
posix_only = pytest.mark.skipif(os.name != "posix", reason="worker signals are POSIX")


# ---------------------------------------------------------------- synthetic .nb files

def nb_bytes(kernels=X86_KERNELS, params=(b"w" * 40, b"b" * 12, b"s" * 3), version=b"v2.13-rc") -> bytes:
    """A file with the .nb layout of Paddle-Lite 2.12/2.13 (header, topology, parameter records)."""
    topo = b"\x10\x00\x00\x00flatbuffer" + b"".join(b"\x00\x00" + k + b"\x00\x07\x00" for k in kernels)
    head = struct.pack("<H16sQ", 2, version.ljust(16, b"\0"), len(topo))
    body = struct.pack("<HH", 0, 0) + struct.pack("<H", 6) + struct.pack("<HI", len(params), max(map(len, params)))
    for p in params:
        body += struct.pack("<II", len(p) + 4, 4) + p
    return head + topo + body


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def x86_nb(tmp_path) -> Path:
    return write(tmp_path / "x86.nb", nb_bytes(X86_KERNELS))


@pytest.fixture
def arm_nb(tmp_path) -> Path:
    return write(tmp_path / "arm.nb", nb_bytes(ARM_KERNELS))


@pytest.fixture
def on_x86(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


@pytest.fixture
def on_arm(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")


# ---------------------------------------------------------------- read_nb_targets

def test_read_nb_targets_synthetic(x86_nb, arm_nb):
    assert read_nb_targets(x86_nb) == frozenset({"x86"})
    assert read_nb_targets(arm_nb) == frozenset({"arm"})  # host/any kernels (feed, calib) are left out
    assert read_nb_targets(str(x86_nb)) == frozenset({"x86"})


def test_read_nb_targets_mixed_and_unknown_codes(tmp_path):
    mixed = write(tmp_path / "m.nb", nb_bytes(X86_KERNELS + ARM_KERNELS + (b"conv2d/def/99/1/1",)))
    assert read_nb_targets(mixed) == frozenset({"x86", "arm", "target99"})


def test_read_nb_targets_every_truncation_is_refused(tmp_path):
    data = nb_bytes()
    p = tmp_path / "t.nb"
    for cut in range(len(data)):
        p.write_bytes(data[:cut])
        with pytest.raises(IntegrityError, match=r"t\.nb"):
            read_nb_targets(p)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a Paddle-Lite .nb model"),
        (nb_bytes() + b"\0", "parameters end at byte"),
        (struct.pack("<H", 1) + nb_bytes()[2:], "meta version 1"),
        (struct.pack("<H", 2) + b"PK\3\4" + nb_bytes()[6:], "version field"),
        (nb_bytes(kernels=(b"feed/def/1/0/2", b"fetch/def/6/0/2")), "no target-specific kernel"),
        (nb_bytes()[:18] + struct.pack("<Q", 1 << 40) + nb_bytes()[26:], "topology of"),
    ],
)
def test_read_nb_targets_malformed(tmp_path, data, message):
    p = write(tmp_path / "bad.nb", data)
    with pytest.raises(IntegrityError, match=message):
        read_nb_targets(p)


def test_read_nb_targets_random_bytes(tmp_path, rng):
    for i in range(20):
        p = write(tmp_path / f"r{i}.nb", rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
        with pytest.raises(IntegrityError, match=f"r{i}.nb"):
            read_nb_targets(p)


def test_read_nb_targets_missing_and_directory(tmp_path):
    with pytest.raises(MissingFileError, match="no such Paddle-Lite model file"):
        read_nb_targets(tmp_path / "absent.nb")
    with pytest.raises(IntegrityError, match="is a directory"):
        read_nb_targets(tmp_path)


# ---------------------------------------------------------------- machine / target checks

@pytest.mark.parametrize("machine, target", [
    ("x86_64", "x86"), ("AMD64", "x86"), ("i686", "x86"), ("aarch64", "arm"), ("arm64", "arm"),
    ("armv7l", "arm"), ("armv8l", "arm"), ("riscv64", None), ("ppc64le", None), ("", None),
])
def test_machine_target(machine, target):
    assert machine_target(machine) == target


def test_check_nb_target(x86_nb, arm_nb, on_x86, monkeypatch):
    assert check_nb_target(x86_nb, "x86") == "x86"
    assert check_nb_target(x86_nb, "any") == "x86"
    with pytest.raises(TargetMismatchError, match=r"built for arm, but this machine is x86_64 \(x86\)"):
        check_nb_target(arm_nb, "arm")
    with pytest.raises(TargetMismatchError, match="manifest records x86, but the file holds arm kernels"):
        check_nb_target(arm_nb, "x86")
    with pytest.raises(TargetMismatchError, match="file holds arm kernels"):
        check_nb_target(arm_nb, "any")
    with pytest.raises(BundleError, match="target must be any, x86 or arm"):
        check_nb_target(x86_nb, "mips")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(TargetMismatchError, match="x86 or ARM CPUs; this machine is 'riscv64'"):
        check_nb_target(x86_nb, "any")


# ---------------------------------------------------------------- fake paddlelite

class FakeTensor:
    def __init__(self):
        self.value = None
        self.fed = []

    def from_numpy(self, a):
        self.fed.append((a.dtype, a.shape, a.flags["C_CONTIGUOUS"]))
        self.value = a.copy()

    def numpy(self):
        return self.value


class FakePredictor:
    """feat = first 4 values of each sample * 2, aux = sum per sample; output buffers are reused, like Lite's."""

    def __init__(self, inputs=("x",), outputs=("feat", "aux"), fail=False):
        self.inputs = {n: FakeTensor() for n in inputs}
        self.outputs = {n: FakeTensor() for n in outputs}
        self.fail = fail
        self.runs = 0

    def get_input_names(self):
        return list(self.inputs)

    def get_output_names(self):
        return list(self.outputs)

    def get_input_by_name(self, name):
        return self.inputs[name]

    def get_output_by_name(self, name):
        return self.outputs[name]

    def run(self):
        if self.fail:
            raise RuntimeError("kernel exploded")
        self.runs += 1
        x = next(iter(self.inputs.values())).value
        flat = x.reshape(x.shape[0], -1)
        for name, value in (("feat", flat[:, :4] * 2), ("aux", flat.sum(axis=1, keepdims=True))):
            if name in self.outputs:
                t = self.outputs[name]
                if t.value is not None and t.value.shape == value.shape:
                    t.value[...] = value  # reuse the buffer in place
                else:
                    t.value = value.astype(np.float32)


def install_fake_lite(monkeypatch, *, arm_build: bool, predictor=None):
    """Put a fake ``paddlelite.lite`` in sys.modules; returns a record of what was called."""
    calls = {"configs": [], "predictors": []}

    class MobileConfig:
        def __init__(self):
            self.model = None
            self.threads = None
            self.power_mode = None
            calls["configs"].append(self)

        def set_model_from_file(self, path):
            self.model = path

    if arm_build:
        MobileConfig.set_threads = lambda self, n: setattr(self, "threads", n)
        MobileConfig.set_power_mode = lambda self, m: setattr(self, "power_mode", m)

    def create_paddle_predictor(config):
        p = predictor or FakePredictor()
        calls["predictors"].append((config, p))
        return p

    lite = types.ModuleType("paddlelite.lite")
    lite.MobileConfig = MobileConfig
    lite.create_paddle_predictor = create_paddle_predictor
    lite.PowerMode = types.SimpleNamespace(**{v: f"<{v}>" for v in pl.POWER_MODES.values()})
    pkg = types.ModuleType("paddlelite")
    pkg.lite = lite
    monkeypatch.setitem(sys.modules, "paddlelite", pkg)
    monkeypatch.setitem(sys.modules, "paddlelite.lite", lite)
    return calls


def test_arm_bundle_on_x86_refused_before_anything_is_loaded(monkeypatch, tmp_path, on_x86):
    calls = install_fake_lite(monkeypatch, arm_build=False)
    # The file does not even exist: the machine check comes before reading it.
    with pytest.raises(TargetMismatchError, match=r"absent\.nb: this Paddle-Lite model was built for arm"):
        PaddleLiteSession.from_file(tmp_path / "absent.nb", target="arm")
    assert calls["configs"] == []


def test_x86_nb_refused_on_arm_machine(monkeypatch, x86_nb, on_arm):
    calls = install_fake_lite(monkeypatch, arm_build=True)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    with pytest.raises(TargetMismatchError, match=r"built for x86, but this machine is aarch64 \(arm\)"):
        PaddleLiteSession.from_file(x86_nb, target="x86")
    with pytest.raises(TargetMismatchError, match=r"the file holds x86 kernels and this machine is aarch64"):
        PaddleLiteSession.from_file(x86_nb, target="any")
    assert calls["configs"] == []


def test_corrupt_nb_refused_before_lite(monkeypatch, tmp_path, on_x86):
    calls = install_fake_lite(monkeypatch, arm_build=False)
    p = write(tmp_path / "cut.nb", nb_bytes()[:-5])
    with pytest.raises(IntegrityError, match=r"cut\.nb: truncated"):
        PaddleLiteSession.from_file(p, target="x86")
    assert calls["configs"] == []


def test_numpy2_refused(monkeypatch, x86_nb, on_x86):
    calls = install_fake_lite(monkeypatch, arm_build=False)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 2)
    with pytest.raises(BackendUnavailableError, match=r'from_numpy silently corrupts.*Install "numpy<2"'):
        PaddleLiteSession.from_file(x86_nb, target="x86")
    assert calls["configs"] == []


def test_numpy_major_is_the_installed_one():
    assert pl._numpy_major() == int(np.__version__.split(".")[0])


def test_missing_paddlelite_names_how_to_install(monkeypatch, x86_nb, on_x86):
    monkeypatch.setitem(sys.modules, "paddlelite", None)
    monkeypatch.setitem(sys.modules, "paddlelite.lite", None)
    with pytest.raises(BackendUnavailableError, match=r'Python <= 3\.10: pip install paddlelite==2\.13rc0 "numpy<2"'):
        PaddleLiteSession.from_file(x86_nb, target="x86")


def test_from_file_x86_build_has_no_threads(monkeypatch, x86_nb, on_x86):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # thread counts are checked against the machine
    calls = install_fake_lite(monkeypatch, arm_build=False)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    s = PaddleLiteSession.from_file(x86_nb, target="x86", threads=4, power_mode="high",
                                    input_shapes={"x": (-1, 3, 2, 2)})
    (config,) = calls["configs"]
    assert config.model == str(x86_nb)
    assert (config.threads, config.power_mode) == (None, None)
    assert s.input_names == ("x",) and s.output_names == ("feat", "aux")


def test_from_file_arm_build_sets_threads_and_power_mode(monkeypatch, arm_nb, on_arm):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # thread counts are checked against the machine
    calls = install_fake_lite(monkeypatch, arm_build=True)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    PaddleLiteSession.from_file(arm_nb, target="arm", threads=3, power_mode="rand_low")
    PaddleLiteSession.from_file(arm_nb, target="arm")
    first, second = calls["configs"]
    assert (first.threads, first.power_mode) == (3, "<LITE_POWER_RAND_LOW>")
    assert (second.threads, second.power_mode) == (None, None)


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "threads must be a positive int"),
    ({"threads": True}, "threads must be a positive int"),
    ({"threads": 1.5}, "threads must be a positive int"),
    ({"power_mode": "turbo"}, "power_mode must be one of high, low, full"),
    ({"input_shapes": {"x": (0, 3)}}, "positive sizes or -1"),
])
def test_from_file_bad_options(monkeypatch, x86_nb, on_x86, kwargs, message):
    install_fake_lite(monkeypatch, arm_build=False)
    with pytest.raises(InvalidInputError, match=message):
        PaddleLiteSession.from_file(x86_nb, target="x86", **kwargs)


def test_lite_load_failure_is_a_bundle_error(monkeypatch, x86_nb, on_x86):
    install_fake_lite(monkeypatch, arm_build=False)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    monkeypatch.setattr(sys.modules["paddlelite.lite"], "create_paddle_predictor",
                        lambda c: (_ for _ in ()).throw(RuntimeError("bad op")))
    with pytest.raises(BundleError, match="Paddle-Lite cannot load this model: bad op"):
        PaddleLiteSession.from_file(x86_nb, target="x86")


# ---------------------------------------------------------------- run(): dtype, shape, names

@pytest.fixture
def fake_session():
    return PaddleLiteSession(FakePredictor(), path="m.nb", input_shapes={"x": (-1, 3, 2, 2)})


def test_run_outputs_by_name_and_dynamic_batch(fake_session, rng):
    for batch in (1, 3):
        x = rng.normal(size=(batch, 3, 2, 2)).astype(np.float32)
        feat, aux = fake_session.run({"x": x})
        np.testing.assert_array_equal(feat, x.reshape(batch, -1)[:, :4] * 2)
        np.testing.assert_allclose(aux, x.reshape(batch, -1).sum(1, keepdims=True), rtol=1e-6)
    (aux_only,) = fake_session.run({"x": x}, ["aux"])
    np.testing.assert_allclose(aux_only, aux)
    swapped = fake_session.run({"x": x}, ["aux", "feat"])
    np.testing.assert_array_equal(swapped[1], feat)


def test_run_returns_copies(fake_session, rng):
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    first = fake_session.run({"x": x})[0]
    kept = first.copy()
    fake_session.run({"x": -x})  # Lite reuses its output buffers
    np.testing.assert_array_equal(first, kept)


def test_run_feeds_c_contiguous(fake_session, rng):
    x = np.asfortranarray(rng.normal(size=(2, 3, 2, 2)).astype(np.float32))
    strided = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)[:, :, ::2, ::2]
    for a in (x, strided):
        assert not a.flags["C_CONTIGUOUS"]
        out = fake_session.run({"x": a})[0]
        np.testing.assert_array_equal(out, np.ascontiguousarray(a).reshape(2, -1)[:, :4] * 2)
    assert all(fed[2] for fed in fake_session._predictor.inputs["x"].fed)


@pytest.mark.parametrize("value, error, message", [
    (np.zeros((1, 3, 2, 2), np.float64), InvalidDtypeError, "must be float32, got float64"),
    (np.zeros((1, 3, 2, 2), np.float16), InvalidDtypeError, "must be float32, got float16"),
    (np.zeros((1, 3, 2, 2), np.uint8), InvalidDtypeError, "must be float32, got uint8"),
    ([[0.0]], InvalidDtypeError, "numpy float32 array, got list"),
    (np.zeros((1, 3, 4, 4), np.float32), InvalidInputError, r"shape \(N, 3, 2, 2\), got \(1, 3, 4, 4\)"),
    (np.zeros((3, 2, 2), np.float32), InvalidInputError, r"shape \(N, 3, 2, 2\), got \(3, 2, 2\)"),
    (np.zeros((0, 3, 2, 2), np.float32), InvalidInputError, "is empty"),
])
def test_run_rejects_bad_feeds(fake_session, value, error, message):
    with pytest.raises(error, match=message):
        fake_session.run({"x": value})
    assert fake_session._predictor.runs == 0


def test_run_rejects_bad_names(fake_session):
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(InvalidInputError, match=r"unknown \['y'\], missing \['x'\]"):
        fake_session.run({"y": x})
    with pytest.raises(InvalidInputError, match=r"unknown \['y'\], missing \[\]"):
        fake_session.run({"x": x, "y": x})
    with pytest.raises(InvalidInputError, match=r"unknown outputs \['nope'\]"):
        fake_session.run({"x": x}, ["feat", "nope"])


def test_run_lite_failure_and_close(rng):
    s = PaddleLiteSession(FakePredictor(fail=True), path="m.nb")
    with pytest.raises(BundleError, match="m.nb: Paddle-Lite failed to run the model: kernel exploded"):
        s.run({"x": np.zeros((1, 3, 2, 2), np.float32)})
    s.close()
    with pytest.raises(BundleError, match="session is closed"):
        s.run({"x": np.zeros((1, 3, 2, 2), np.float32)})


def test_input_shapes_must_name_model_inputs():
    with pytest.raises(BundleError, match=r"model has inputs \['x'\], but shapes are given for \['image'\]"):
        PaddleLiteSession(FakePredictor(), path="m.nb", input_shapes={"image": (1, 3, 2, 2)})


# ---------------------------------------------------------------- create_session dispatch

def lite_spec(tmp_path: Path, data: bytes, *, target: str, role: str = "extractor"):
    """The ModelSpec of a one-model paddlelite bundle holding ``data`` as its .nb file."""
    root = tmp_path / f"lite-{target}-{role}"
    root.mkdir()
    name = f"{role}.nb"
    (root / name).write_bytes(data)
    m = manifest_for()
    entry = m["models"][role]
    entry.update(file=name, sha256=hashlib.sha256(data).hexdigest(), backend="paddlelite", target=target)
    m["models"] = {role: entry}
    (root / "manifest.json").write_text(json.dumps(m))
    return Bundle.load(root).models[role]


def test_create_session_dispatches_to_paddlelite(monkeypatch, tmp_path, on_x86):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # thread counts are checked against the machine
    calls = install_fake_lite(monkeypatch, arm_build=False)
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    spec = lite_spec(tmp_path, nb_bytes(), target="x86")
    session = create_session(spec, threads=2)
    assert isinstance(session, PaddleLiteSession)
    assert calls["configs"][0].model == str(spec.path)
    with pytest.raises(InvalidInputError, match=r"shape \(N, 3, 224, 224\), got \(1, 3, 2, 2\)"):
        session.run({"x": np.zeros((1, 3, 2, 2), np.float32)})
    with pytest.raises(BundleError, match="converted for the paddlelite backend, not onnxruntime"):
        create_session(spec, name="onnxruntime")


def test_create_session_refuses_arm_spec_on_x86(monkeypatch, tmp_path, on_x86):
    calls = install_fake_lite(monkeypatch, arm_build=False)
    spec = lite_spec(tmp_path, nb_bytes(ARM_KERNELS), target="arm")
    with pytest.raises(TargetMismatchError, match="built for arm, but this machine is x86_64"):
        create_session(spec)
    assert calls["configs"] == []


def test_create_session_model_lacks_manifest_input(monkeypatch, tmp_path, on_x86):
    install_fake_lite(monkeypatch, arm_build=False, predictor=FakePredictor(inputs=("image",)))
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    spec = lite_spec(tmp_path, nb_bytes(), target="x86")
    with pytest.raises(BundleError, match=r"model has inputs \['image'\], but shapes are given for \['x'\]"):
        create_session(spec)


# ---------------------------------------------------------------- side environment: plumbing

def test_find_lite_python(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGE_SHITU_LITE_PYTHON", raising=False)
    monkeypatch.setattr(lite_worker, "_repo_root", lambda: tmp_path)
    with pytest.raises(BackendUnavailableError, match=r"\.venv-lite.*does not exist; create it with scripts/setup-lite-env"):
        find_lite_python()
    with pytest.raises(BackendUnavailableError, match="absent.*the given lite python.*setup-lite-env"):
        find_lite_python(tmp_path / "absent")
    monkeypatch.setenv("EDGE_SHITU_LITE_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailableError, match=r"nope \(\$EDGE_SHITU_LITE_PYTHON\)"):
        find_lite_python()
    monkeypatch.setenv("EDGE_SHITU_LITE_PYTHON", sys.executable)
    assert find_lite_python() == Path(sys.executable)
    monkeypatch.delenv("EDGE_SHITU_LITE_PYTHON")
    venv_python = lite_worker._venv_python(tmp_path / ".venv-lite")
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    assert find_lite_python() == venv_python


def test_frames_round_trip_without_pickle():
    buf = io.BytesIO()
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    lite_worker.write_frame(buf, {"op": "run", "n": 3, "names": ["a", "b.c"], "empty": [], "skip": None, "x": feats})
    lite_worker.write_frame(buf, {"op": "close"})
    buf.seek(0)
    msg = lite_worker.read_frame(buf)
    assert str(msg["op"]) == "run" and int(msg["n"]) == 3 and "skip" not in msg
    assert lite_worker._names(msg, "names") == ("a", "b.c") and lite_worker._names(msg, "empty") == ()
    np.testing.assert_array_equal(msg["x"], feats)
    assert msg["x"].dtype == np.float32
    assert str(lite_worker.read_frame(buf)["op"]) == "close"
    assert lite_worker.read_frame(buf) is None
    with pytest.raises(InvalidDtypeError, match="object dtype"):
        lite_worker.encode({"x": np.array([object()])})


def test_frames_malformed():
    good = io.BytesIO()
    lite_worker.write_frame(good, {"op": "x"})
    data = good.getvalue()
    with pytest.raises(ValueError, match="not a frame"):
        lite_worker.read_frame(io.BytesIO(b"JUNK" + data[4:]))
    with pytest.raises(EOFError, match="inside a frame"):
        lite_worker.read_frame(io.BytesIO(data[:-1]))
    with pytest.raises(EOFError, match="frame header"):
        lite_worker.read_frame(io.BytesIO(data[:5]))


def test_worker_serve_in_process(arm_nb, on_x86):
    """The worker loop answers every request, errors included, and stops at end of input."""
    requests = io.BytesIO()
    for msg in ({"op": "run", "feed_names": ["x"], "feed_0": np.zeros((1, 3), np.float32)},
                {"op": "dance"},
                {"op": "open", "path": str(arm_nb), "target": "arm", "input_name": "x",
                 "input_shape": np.array([-1, 3, 224, 224])}):
        lite_worker.write_frame(requests, msg)
    requests.seek(0)
    replies = io.BytesIO()
    lite_worker._serve(requests, replies)
    replies.seek(0)
    hello = lite_worker.read_frame(replies)
    assert str(hello["op"]) == "hello" and int(hello["protocol"]) == lite_worker.PROTOCOL
    got = [lite_worker.read_frame(replies) for _ in range(3)]
    assert lite_worker.read_frame(replies) is None
    assert [(str(r["status"]), str(r["type"])) for r in got] == [
        ("error", "InvalidInputError"), ("error", "InvalidInputError"), ("error", "TargetMismatchError")]
    assert "no model is open" in str(got[0]["message"]) and "unknown worker request 'dance'" in str(got[1]["message"])


def test_side_env_session_refuses_onnx_spec(tmp_path):
    spec = types.SimpleNamespace(backend="onnxruntime", path=tmp_path / "extractor.onnx")
    with pytest.raises(BundleError, match="onnxruntime model cannot run in the Paddle-Lite side environment"):
        SideEnvSession(spec, python=sys.executable)


def test_worker_errors_come_back_typed(tmp_path):
    """A worker in this (paddlelite-less) environment: errors raised there arrive as the same classes."""
    if machine_target() != "x86":
        pytest.skip("the synthetic x86 model needs an x86 machine")
    arm = lite_spec(tmp_path, nb_bytes(ARM_KERNELS), target="arm")
    with pytest.raises(TargetMismatchError, match=r"built for arm.*\(in the Paddle-Lite worker, "):
        SideEnvSession(arm, python=sys.executable)
    x86 = lite_spec(tmp_path, nb_bytes(), target="x86")
    with pytest.raises(BackendUnavailableError, match="paddlelite backend is not installed"):
        SideEnvSession(x86, python=sys.executable)
    mislabelled = lite_spec(tmp_path, nb_bytes(ARM_KERNELS), target="x86", role="detector")
    with pytest.raises(TargetMismatchError, match="manifest records x86, but the file holds arm kernels"):
        SideEnvSession(mislabelled, python=sys.executable)


@posix_only
def test_worker_that_cannot_start(tmp_path):
    spec = lite_spec(tmp_path, nb_bytes(), target="x86")
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'No module named converters' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    with pytest.raises(BackendUnavailableError, match=r"(?s)cannot start the worker.*exit code 3.*No module named converters.*setup-lite-env"):
        SideEnvSession(spec, python=fake_python)


# ---------------------------------------------------------------- side environment: real Paddle-Lite runs

@pytest.fixture(scope="session")
def lite_bundles(replica_dirs, lite_opt, tmp_path_factory) -> dict:
    """Lite bundles of the replicas, made by the converter with the side environment's opt:
    x86 (detector + extractor) and arm (extractor only, for the refusal)."""
    from edge_shitu_converters.lite import convert_lite

    opt = lite_opt
    root = tmp_path_factory.mktemp("lite-bundles")
    return {
        "x86": convert_lite(replica_dirs["detector"], replica_dirs["extractor"], root / "x86", target="x86", opt=opt),
        "arm": convert_lite(None, replica_dirs["extractor"], root / "arm", target="arm", opt=opt),
    }


@pytest.mark.paddle
def test_read_nb_targets_real_files(lite_bundles, tmp_path):
    x86, arm = Bundle.load(lite_bundles["x86"]), Bundle.load(lite_bundles["arm"])
    assert read_nb_targets(x86.detector.path) == read_nb_targets(x86.extractor.path) == frozenset({"x86"})
    assert read_nb_targets(arm.extractor.path) == frozenset({"arm"})
    data = x86.extractor.path.read_bytes()
    for cut in (30, len(data) // 2, len(data) - 1):
        with pytest.raises(IntegrityError, match=r"cut\.nb: truncated"):
            read_nb_targets(write(tmp_path / "cut.nb", data[:cut]))


@pytest.mark.paddle
def test_lite_x86_matches_onnxruntime(lite_bundles, replica_bundle, lite_python, test_images):
    from edge_shitu.detector import Detector
    from edge_shitu.image import load_image
    from edge_shitu.options import DetectorOptions
    from edge_shitu.preprocess import image_to_tensor

    lite, onnx = Bundle.load(lite_bundles["x86"]), Bundle.load(replica_bundle)
    images = [load_image(p) for p in test_images[:2]]
    for role in ("detector", "extractor"):
        ls, os_ = lite.models[role], onnx.models[role]
        assert (ls.backend, ls.target) == ("paddlelite", "x86")
        batch = images[:1] if role == "detector" else images  # the extractor takes a dynamic batch
        x = np.stack([image_to_tensor(img, ls.input) for img in batch])
        ort = create_session(os_, threads=1)
        with SideEnvSession(ls, python=lite_python, threads=1) as side:
            assert side.input_names == (ls.input.name,)
            names = list(ort.output_names)
            assert sorted(side.output_names) == sorted(names)
            got = side.run({ls.input.name: x}, names)
        want = ort.run({os_.input.name: x}, names)
        ort.close()
        for name, g, w in zip(names, got, want):
            assert g.dtype == np.float32 and g.shape == w.shape, name
            assert np.abs(g - w).max() <= 1e-4 * max(1.0, float(np.abs(w).max())), name

    # The whole detector stage gives the same boxes on both backends.
    opts = DetectorOptions.from_mapping(lite.detector.defaults)
    with SideEnvSession(lite.detector, python=lite_python) as side:
        lite_boxes = Detector(lite.detector, side, opts).detect(images[0])
    ort_boxes = Detector(onnx.detector, create_session(onnx.detector), opts).detect(images[0])
    assert len(ort_boxes) > 0 and len(lite_boxes) == len(ort_boxes)
    for a, b in zip(lite_boxes, ort_boxes):
        np.testing.assert_allclose(a.box, b.box, atol=1e-2)
        assert abs(a.score - b.score) < 1e-4


@pytest.mark.paddle
def test_lite_arm_bundle_refused_in_worker(lite_bundles, lite_python):
    arm = Bundle.load(lite_bundles["arm"]).extractor
    assert arm.target == "arm"
    if machine_target() == "arm":
        pytest.skip("this machine is ARM: the ARM bundle is not foreign here")
    with pytest.raises(TargetMismatchError, match=r"extractor\.nb: this Paddle-Lite model was built for arm.*Paddle-Lite worker"):
        SideEnvSession(arm, python=lite_python)
    with pytest.raises(TargetMismatchError, match=r"manifest records x86, but the file holds arm kernels"):
        SideEnvSession(dataclasses.replace(arm, target="x86"), python=lite_python)


@pytest.fixture
def extractor_session(lite_bundles, lite_python):
    spec = Bundle.load(lite_bundles["x86"]).extractor
    session = SideEnvSession(spec, python=lite_python, timeout=2.0)
    yield spec, session
    session.close()


@pytest.mark.paddle
@posix_only
def test_lite_worker_crash_is_reported(extractor_session):
    spec, session = extractor_session
    x = np.zeros((1, 3, 224, 224), np.float32)
    assert session.run({"x": x})[0].shape == (1, spec.output.dim)
    os.kill(session.pid, signal.SIGSEGV)
    with pytest.raises(WorkerCrashError, match=r"(?s)extractor\.nb: the Paddle-Lite worker .* died \(signal SIGSEGV\); last stderr:"):
        session.run({"x": x})
    with pytest.raises(WorkerCrashError, match=r"worker is dead \(signal SIGSEGV\); create a new session"):
        session.run({"x": x})
    assert isinstance(WorkerCrashError("x"), ConversionError)


@pytest.mark.paddle
@posix_only
def test_lite_worker_hang_is_killed(extractor_session):
    spec, session = extractor_session
    os.kill(session.pid, signal.SIGSTOP)
    with pytest.raises(WorkerCrashError, match=r"did not answer within 2 s and was killed"):
        session.run({"x": np.zeros((1, 3, 224, 224), np.float32)})


@pytest.mark.paddle
def test_lite_worker_checks_feeds_and_closes(extractor_session):
    spec, session = extractor_session
    with pytest.raises(InvalidDtypeError, match="must be a float32 array, got float64"):
        session.run({"x": np.zeros((1, 3, 224, 224))})
    with pytest.raises(InvalidInputError, match=r"shape \(N, 3, 224, 224\), got \(1, 3, 320, 320\).*Paddle-Lite worker"):
        session.run({"x": np.zeros((1, 3, 320, 320), np.float32)})
    with pytest.raises(InvalidInputError, match=r"unknown outputs \['nope'\]"):
        session.run({"x": np.zeros((1, 3, 224, 224), np.float32)}, ["nope"])
    pid = session.pid
    session.close()
    session.close()
    assert session._proc.returncode == 0
    with pytest.raises(BundleError, match="session is closed"):
        session.run({"x": np.zeros((1, 3, 224, 224), np.float32)})
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
