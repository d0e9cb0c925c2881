"""One-file bundles (``.esb``): packing, strict reading, unpacking, and recognition identical to the folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest_for
from edge_shitu import bundlefile
from edge_shitu.bundle import Bundle
from edge_shitu.bundlefile import ALIGNMENT, BundleArchive, pack_bundle, unpack_bundle
from edge_shitu.cli import main
from edge_shitu.errors import BundleError, IntegrityError, InvalidInputError

_LOCAL = struct.Struct("<IHHHHHIIIHH")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def full_bundle(fake_bundle) -> Path:
    """The fake bundle with a hash head and a verify.json too, so every kind of member is packed."""
    rng = np.random.default_rng(7)
    np.savez(fake_bundle / "hash.npz", weight=rng.normal(size=(512, 512)).astype(np.float32),
             bias=np.zeros(512, np.float32))
    m = json.loads((fake_bundle / "manifest.json").read_text())
    m["hash"] = {"file": "hash.npz", "sha256": _sha((fake_bundle / "hash.npz").read_bytes()), "bits": 512,
                 "dim": 512}
    (fake_bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    (fake_bundle / "verify.json").write_text(json.dumps({"passed": True, "precision": "fp32", "images": []}))
    return fake_bundle


# ---------------------------------------------------------------- format


def test_pack_load_gives_the_same_bundle(full_bundle, tmp_path):
    esb = pack_bundle(full_bundle, tmp_path / "b.esb")
    d, f = Bundle.load(full_bundle), Bundle.load(esb)
    assert f.path == esb.resolve() and f.archive is not None and d.archive is None
    assert f.manifest == d.manifest and f.name == d.name
    assert f.code_fingerprint == d.code_fingerprint and f.embedding_fingerprint == d.embedding_fingerprint
    assert f.verification == d.verification
    for role in d.models:
        assert f.models[role].read_bytes() == d.models[role].read_bytes()
        assert f.models[role].nbytes == d.models[role].nbytes
        assert str(f.models[role].path) == f"{esb.resolve()}:{role}.onnx"
    hd, hf = d.load_hash_head(), f.load_hash_head()
    assert np.array_equal(hd.weight, hf.weight) and np.array_equal(hd.bias, hf.bias)
    assert list(f.archive) == ["manifest.json", "detector.onnx", "extractor.onnx", "hash.npz", "verify.json"]


def test_pack_is_reproducible_and_a_plain_zip(full_bundle, tmp_path):
    a = pack_bundle(full_bundle, tmp_path / "a.esb")
    os.utime(full_bundle / "extractor.onnx", (1e9, 1e9))  # file times do not reach the archive
    b = pack_bundle(full_bundle, tmp_path / "b.esb")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:  # any zip tool reads it
        assert z.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0) for i in z.infolist())
        assert z.read("extractor.onnx") == (full_bundle / "extractor.onnx").read_bytes()


def test_member_data_is_aligned(full_bundle, tmp_path):
    esb = pack_bundle(full_bundle, tmp_path / "b.esb")
    data = esb.read_bytes()
    archive = BundleArchive.open(esb)
    for member in archive.members.values():
        assert member.offset % ALIGNMENT == 0, member.name
        assert data[member.offset:member.offset + member.size] == (full_bundle / member.name).read_bytes()
    with zipfile.ZipFile(esb) as z:  # the offsets come from the zip's own local headers
        for info in z.infolist():
            header = _LOCAL.unpack_from(data, info.header_offset)
            assert (info.header_offset + _LOCAL.size + header[9] + header[10]) % ALIGNMENT == 0


def test_unpack_reverses_pack_byte_for_byte(full_bundle, tmp_path):
    esb = pack_bundle(full_bundle, tmp_path / "b.esb")
    out = unpack_bundle(esb, tmp_path / "back")
    assert _files(out) == _files(full_bundle)
    assert pack_bundle(out, tmp_path / "again.esb").read_bytes() == esb.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_files_the_manifest_does_not_name_stay_out(fake_bundle, tmp_path):
    (fake_bundle / "notes.txt").write_text("not part of the bundle")
    esb = pack_bundle(fake_bundle, tmp_path / "b.esb")
    assert list(Bundle.load(esb).archive) == ["manifest.json", "detector.onnx", "extractor.onnx"]


# ---------------------------------------------------------------- strict reading


def _zip(path: Path, members, *, method=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name, made on purpose
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return path


def _members(root: Path):
    return [(n, (root / n).read_bytes()) for n in ("manifest.json", "detector.onnx", "extractor.onnx")]


def test_tampered_member_is_an_integrity_error(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    member = BundleArchive.open(esb)["extractor.onnx"]
    data = bytearray(esb.read_bytes())
    data[member.offset + 3] ^= 0x01
    esb.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"B\.esb:extractor\.onnx: sha256 is [0-9a-f]{64}, but manifest"):
        Bundle.load(esb)
    Bundle.load(esb, verify=False)


def test_tampered_manifest_is_an_integrity_error(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    member = BundleArchive.open(esb)["manifest.json"]
    data = bytearray(esb.read_bytes())
    at = data.index(b'"fake"', member.offset)
    data[at + 1:at + 5] = b"fakf"  # still valid JSON: only the CRC tells
    esb.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"B\.esb:manifest\.json: CRC-32 differs"):
        Bundle.load(esb)


@pytest.mark.parametrize("build, message", [
    (lambda root: _members(root) + [("notes.txt", b"x")], r"B\.esb:notes\.txt: not named by the manifest"),
    (lambda root: _members(root) + [("extractor.onnx", b"x")], r"B\.esb:extractor\.onnx: appears twice"),
    (lambda root: _members(root) + [("../evil.onnx", b"x")], r"member name '\.\./evil\.onnx' must be a relative path"),
    (lambda root: _members(root) + [("/abs.onnx", b"x")], r"member name '/abs\.onnx' must be a relative path"),
    (lambda root: _members(root) + [("a\\b.onnx", b"x")], r"member name 'a\\\\b\.onnx' must not hold"),
    (lambda root: _members(root)[1:] + _members(root)[:1], r"B\.esb: its first member is 'detector\.onnx'"),
    (lambda root: [m for m in _members(root) if m[0] != "extractor.onnx"],
     r"B\.esb:manifest\.json: manifest\.models\.extractor\.file names 'extractor\.onnx', which B\.esb does not hold"),
])
def test_malformed_archives_are_refused_in_one_line(fake_bundle, tmp_path, build, message):
    esb = _zip(tmp_path / "B.esb", build(fake_bundle))
    with pytest.raises(BundleError, match=message) as info:
        Bundle.load(esb)
    assert "\n" not in str(info.value)


def test_compressed_member_is_refused(fake_bundle, tmp_path):
    esb = _zip(tmp_path / "B.esb", _members(fake_bundle), method=zipfile.ZIP_DEFLATED)
    with pytest.raises(BundleError, match=r"B\.esb:manifest\.json: is compressed \(zip method 8\)"):
        Bundle.load(esb)


def test_encrypted_member_is_refused(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    data = bytearray(esb.read_bytes())
    cd = data.rindex(b"PK\x01\x02")  # the last entry of the directory: extractor.onnx
    data[cd + 8] |= 0x01
    esb.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"B\.esb:extractor\.onnx: is encrypted"):
        Bundle.load(esb)


def test_truncated_trailing_and_not_a_zip(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    data = esb.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 30, 3):
        esb.write_bytes(data[:cut])
        with pytest.raises(BundleError, match=r"B\.esb: not a one-file bundle") as info:
            Bundle.load(esb)
        assert "\n" not in str(info.value)
    esb.write_bytes(data + b"\0")
    with pytest.raises(BundleError, match=r"B\.esb: not a one-file bundle: no zip end record at its very end"):
        Bundle.load(esb)
    esb.write_bytes(b"{}")
    with pytest.raises(BundleError, match=r"B\.esb: not a one-file bundle \(\.esb\): it does not start with a zip"):
        Bundle.load(esb)


def test_hidden_and_overlapping_data_is_refused(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    data = bytearray(esb.read_bytes())
    end = struct.unpack_from("<IHHHHIIH", data, len(data) - 22)
    cd_offset = end[6]
    # Data slipped in between the last member and the directory (offsets moved to keep the zip valid).
    hidden = data[:cd_offset] + b"hidden" + data[cd_offset:]
    struct.pack_into("<I", hidden, len(hidden) - 6, cd_offset + 6)
    esb.write_bytes(bytes(hidden))
    with pytest.raises(BundleError, match=r"B\.esb: 6 bytes between the last member and the zip directory"):
        Bundle.load(esb)
    # Data slipped in between the directory and the end record.
    esb.write_bytes(bytes(data[:-22] + b"hidden" + data[-22:]))
    with pytest.raises(BundleError, match=r"B\.esb: its zip directory \(\d+ bytes at \d+\) does not end where its end "
                                          r"record starts"):
        Bundle.load(esb)
    # Two directory entries pointing at the same local record.
    overlap = bytearray(data)
    entries = [i for i in range(cd_offset, len(data)) if overlap[i:i + 4] == b"PK\x01\x02"]
    struct.pack_into("<I", overlap, entries[2] + 42, struct.unpack_from("<I", overlap, entries[1] + 42)[0])
    esb.write_bytes(bytes(overlap))
    with pytest.raises(BundleError, match=r"B\.esb:extractor\.onnx: starts at byte \d+, expected \d+"):
        Bundle.load(esb)


def test_sizes_are_bounded_before_reading(fake_bundle, tmp_path, monkeypatch):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    monkeypatch.setattr(bundlefile, "MAX_MEMBER_BYTES", 10)
    with pytest.raises(BundleError, match=r"B\.esb:manifest\.json: \d+ bytes stored as \d+; .* at most 10 bytes"):
        Bundle.load(esb)
    monkeypatch.undo()
    monkeypatch.setattr(bundlefile, "MAX_MEMBERS", 2)
    with pytest.raises(BundleError, match=r"B\.esb: 3 members, a one-file bundle has 1 to 2"):
        Bundle.load(esb)


def test_file_replaced_after_load_is_refused(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "B.esb")
    bundle = Bundle.load(esb)
    (fake_bundle / "detector.onnx").write_bytes(b"placeholder detector, longer")
    m = json.loads((fake_bundle / "manifest.json").read_text())
    m["models"]["detector"]["sha256"] = _sha(b"placeholder detector, longer")
    (fake_bundle / "manifest.json").write_text(json.dumps(m))
    pack_bundle(fake_bundle, esb, overwrite=True)
    with pytest.raises(BundleError, match=r"B\.esb: changed since it was loaded"):
        bundle.extractor.read_bytes()


# ---------------------------------------------------------------- pack / unpack: destinations and atomicity


def test_pack_and_unpack_refuse_to_overwrite(fake_bundle, tmp_path):
    esb = pack_bundle(fake_bundle, tmp_path / "b.esb")
    with pytest.raises(InvalidInputError, match=r"b\.esb: already exists; pass --overwrite"):
        pack_bundle(fake_bundle, esb)
    assert pack_bundle(fake_bundle, esb, overwrite=True) == esb
    out = unpack_bundle(esb, tmp_path / "out")
    with pytest.raises(InvalidInputError, match=r"out: already exists"):
        unpack_bundle(esb, out)
    (out / "stale.txt").write_text("from the folder it replaces")
    unpack_bundle(esb, out, overwrite=True)
    assert _files(out) == _files(fake_bundle)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match=r"photos: is not a bundle folder"):
        unpack_bundle(esb, other, overwrite=True)
    assert (other / "keep.jpg").is_file()
    with pytest.raises(BundleError, match="is already a one-file bundle"):
        pack_bundle(esb, tmp_path / "c.esb")
    with pytest.raises(BundleError, match="is a bundle folder, not a one-file bundle"):
        unpack_bundle(fake_bundle, tmp_path / "d")


def test_pack_failure_leaves_nothing(fake_bundle, tmp_path, monkeypatch):
    real = bundlefile._write_member
    calls = []

    def failing(out, name, *args):
        calls.append(name)
        if name == "extractor.onnx":
            raise OSError(28, "No space left on device")
        return real(out, name, *args)

    monkeypatch.setattr(bundlefile, "_write_member", failing)
    with pytest.raises(OSError, match="No space left"):
        pack_bundle(fake_bundle, tmp_path / "b.esb")
    assert calls[-1] == "extractor.onnx"
    assert list(tmp_path.iterdir()) == [fake_bundle]
    # An existing destination survives a failed overwrite untouched.
    monkeypatch.undo()
    esb = pack_bundle(fake_bundle, tmp_path / "b.esb")
    before = esb.read_bytes()
    monkeypatch.setattr(bundlefile, "_write_member", failing)
    with pytest.raises(OSError):
        pack_bundle(fake_bundle, esb, overwrite=True)
    assert esb.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["b.esb", "fake-bundle"]


def test_pack_verifies_what_it_wrote(fake_bundle, tmp_path, monkeypatch):
    real = bundlefile._write_member

    def corrupting(out, name, *args):
        record = real(out, name, *args)
        if name == "detector.onnx":
            out.seek(-1, os.SEEK_CUR)  # the last byte of its data, after its CRC was taken
            out.write(b"!")
        return record

    monkeypatch.setattr(bundlefile, "_write_member", corrupting)
    with pytest.raises(IntegrityError, match=r"detector\.onnx: sha256"):
        pack_bundle(fake_bundle, tmp_path / "b.esb")
    assert list(tmp_path.iterdir()) == [fake_bundle]


def test_unpack_failure_leaves_nothing(fake_bundle, tmp_path, monkeypatch):
    esb = pack_bundle(fake_bundle, tmp_path / "b.esb")
    out = unpack_bundle(esb, tmp_path / "out")
    before = _files(out)
    real = os.replace

    def failing(src, dst):
        if Path(src).name.endswith(".tmp"):  # the finished folder's move into place
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output"):
        unpack_bundle(esb, out, overwrite=True)
    with pytest.raises(OSError, match="Input/output"):
        unpack_bundle(esb, tmp_path / "new")
    monkeypatch.undo()
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.esb", "fake-bundle", "out"]


# ---------------------------------------------------------------- the Lite backend takes the model from memory


def test_lite_models_of_a_one_file_bundle_load_from_memory(monkeypatch, tmp_path):
    import platform

    from test_paddlelite_backend import install_fake_lite, nb_bytes

    from edge_shitu.backends import create_session
    from edge_shitu.backends import paddlelite as pl

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(pl, "_numpy_major", lambda: 1)
    calls = install_fake_lite(monkeypatch, arm_build=False)
    buffers = []
    monkeypatch.setattr(sys_modules_lite().MobileConfig, "set_model_from_buffer",
                        lambda self, data: buffers.append(data), raising=False)
    model = nb_bytes()
    root, esb = _lite_esb(tmp_path, model)
    shutil.rmtree(root)  # nothing is read from the folder any more
    spec = Bundle.load(esb).extractor
    session = create_session(spec)
    assert buffers == [model] and calls["configs"][0].model is None  # no file path was handed to Lite
    assert session.input_names == ("x",)
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".nb"]


def _lite_esb(tmp_path, model: bytes):
    """A one-file bundle whose only model is the Paddle-Lite extractor ``model``: (its folder, the .esb)."""
    root = tmp_path / "lite"
    root.mkdir()
    (root / "extractor.nb").write_bytes(model)
    m = manifest_for()
    m["models"] = {"extractor": m["models"]["extractor"]}
    m["models"]["extractor"].update(file="extractor.nb", sha256=_sha(model), backend="paddlelite", target="x86")
    (root / "manifest.json").write_text(json.dumps(m))
    return root, pack_bundle(root, tmp_path / "lite.esb")


def sys_modules_lite():
    import sys

    return sys.modules["paddlelite.lite"]


def test_lite_side_worker_gets_the_model_bytes(monkeypatch, tmp_path):
    """The side-environment worker loads a one-file bundle's model from the open request, not a path."""
    import platform

    from test_paddlelite_backend import ARM_KERNELS, nb_bytes

    from edge_shitu_converters import lite_worker

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    model = nb_bytes(ARM_KERNELS)
    root, esb = _lite_esb(tmp_path, model)
    spec = Bundle.load(esb).extractor
    requests = io.BytesIO()
    lite_worker.write_frame(requests, {"op": "open", "path": str(spec.path), "target": "x86", "input_name": "x",
                                       "input_shape": np.array([-1, 3, 224, 224]),
                                       "model": np.frombuffer(spec.read_bytes(), np.uint8)})
    requests.seek(0)
    replies = io.BytesIO()
    lite_worker._serve(requests, replies)
    replies.seek(0)
    lite_worker.read_frame(replies)
    reply = lite_worker.read_frame(replies)
    # The worker read the kernels from the bytes it was sent (the path names no file).
    assert str(reply["type"]) == "TargetMismatchError"
    assert "lite.esb:extractor.nb: the manifest records x86, but the file holds arm kernels" in str(reply["message"])


# ---------------------------------------------------------------- a tiny real ONNX bundle recognises the same


def _tiny_onnx_bundle(root: Path) -> Path:
    """A runnable bundle of two small random ONNX models with the manifest's tensor names and shapes."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def conv(name, out_ch, k):
        w = (rng.normal(size=(out_ch, 3, k, k)) / np.sqrt(3 * k * k)).astype(np.float32)
        return numpy_helper.from_array(w, name)

    nodes, inits, outs = [], [], []
    for s in (8, 16, 32, 64):
        inits += [conv(f"ws{s}", 1, s), conv(f"wb{s}", 32, s)]
        nodes += [helper.make_node("Conv", ["image", f"ws{s}"], [f"cs{s}"], kernel_shape=[s, s], strides=[s, s]),
                  helper.make_node("Sigmoid", [f"cs{s}"], [f"ss{s}"]),
                  helper.make_node("Transpose", [f"ss{s}"], [f"s{s}"], perm=[0, 2, 3, 1]),
                  helper.make_node("Conv", ["image", f"wb{s}"], [f"cb{s}"], kernel_shape=[s, s], strides=[s, s]),
                  helper.make_node("Transpose", [f"cb{s}"], [f"b{s}"], perm=[0, 2, 3, 1])]
    for kind in "sb":
        outs += [helper.make_tensor_value_info(f"{kind}{s}", TensorProto.FLOAT, None) for s in (8, 16, 32, 64)]
    det = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 640, 640])],
                            outs, inits)
    proj = numpy_helper.from_array(rng.normal(size=(192, 512)).astype(np.float32), "proj")
    shape = numpy_helper.from_array(np.array([-1, 192], np.int64), "shape")
    ext = helper.make_graph(
        [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[28, 28], strides=[28, 28]),
         helper.make_node("Reshape", ["p", "shape"], ["f"]),
         helper.make_node("MatMul", ["f", "proj"], ["feat"])],
        "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 512])], [proj, shape])
    root.mkdir()
    for graph, file in ((det, "detector.onnx"), (ext, "extractor.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(root / file))
    m = manifest_for(det_sha=_sha((root / "detector.onnx").read_bytes()),
                     rec_sha=_sha((root / "extractor.onnx").read_bytes()))
    (root / "manifest.json").write_text(json.dumps(m, indent=2))
    return root


def _recognitions(bundle, gallery, images):
    from edge_shitu.options import RecognizerOptions
    from edge_shitu.recognizer import Recognizer

    # Every region is accepted, however far its match: the comparison covers all of them.
    with Recognizer.from_bundle(bundle, gallery, options=RecognizerOptions(max_distance=512)) as rec:
        return [[(r.box, r.label, r.distance, r.detection_score, r.whole_image, r.candidates)
                 for r in rec.recognize(p).recognitions] for p in images]


def _gallery(bundle, path, images):
    from edge_shitu.embedder import Embedder
    from edge_shitu.gallery import Gallery

    b = Bundle.load(bundle)
    with Embedder.from_bundle(b) as emb, Gallery.create(path, fingerprint=b.code_fingerprint) as g:
        from edge_shitu.image import load_image

        g.add(emb.embed([load_image(p) for p in images]), [p.stem for p in images])
    return path


def test_tiny_onnx_one_file_bundle_recognises_like_its_folder(tmp_path, test_images):
    folder = _tiny_onnx_bundle(tmp_path / "tiny")
    esb = pack_bundle(folder, tmp_path / "tiny.esb")
    images = test_images[:4]
    gallery = _gallery(folder, tmp_path / "g.db", test_images[4:8])
    want = _recognitions(folder, gallery, images)
    assert sum(len(r) for r in want) > 0
    shutil.rmtree(folder)  # the one file is all the device has
    assert _recognitions(esb, gallery, images) == want


def test_cli_commands_take_a_one_file_bundle(tmp_path, test_images, drink_dir):
    folder = _tiny_onnx_bundle(tmp_path / "tiny")
    esb, back = tmp_path / "tiny.esb", tmp_path / "back"
    assert _run(["bundle", "pack", str(folder), "-o", str(esb)])[0] == 0
    code, out, err = _run(["bundle", "pack", str(folder), "-o", str(esb)])
    assert code == 2 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert _run(["bundle", "pack", str(folder), "-o", str(esb), "--overwrite"])[0] == 0
    code, out, _ = _run(["bundle", "info", str(esb)])
    size = (folder / "extractor.onnx").stat().st_size
    assert code == 0 and f"({esb.resolve()})" in out and f"extractor: extractor.onnx {size / 1e6:.2f} MB" in out
    code, info_esb, _ = _run(["bundle", "info", "--json", str(esb)])
    assert json.loads(info_esb) == json.loads(_run(["bundle", "info", "--json", str(folder)])[1])
    label_file = tmp_path / "labels.txt"
    label_file.write_text("".join(f"{p.name}\t{p.stem}\n" for p in test_images[4:8]), encoding="utf-8")
    images = [str(p) for p in test_images[:3]]
    results = {}
    for name, bundle in (("folder", folder), ("esb", esb)):
        g = tmp_path / f"{name}.db"
        assert _run(["gallery", "build", "--bundle", str(bundle), "--images", str(test_images[0].parent),
                     "--labels", str(label_file), "--out", str(g), "--keep-embeddings"])[0] == 0
        assert _run(["gallery", "add", str(g), "--bundle", str(bundle), "--label", "extra", "--keep-embeddings",
                     images[0]])[0] == 0
        assert _run(["gallery", "check", str(g), "--bundle", str(bundle)])[0] == 0
        assert _run(["gallery", "rehash", str(g), "--bundle", str(bundle), "--force"])[0] == 0
        results[name] = [_run([cmd, "--bundle", str(bundle), "--json", *images]
                              + (["--gallery", str(g), "--max-distance", "512"] if cmd == "recognize" else []))
                         for cmd in ("detect", "embed", "recognize")]
    for (code_f, out_f, _), (code_e, out_e, _) in zip(results["folder"], results["esb"]):
        got, want = json.loads(out_e), json.loads(out_f)
        for record in got + want:
            record.pop("timings_ms", None)
        assert code_f == code_e == 0 and got == want
    assert sum(len(r["results"]) for r in got) > 0
    assert _run(["bundle", "unpack", str(esb), "-o", str(back)])[0] == 0
    assert _files(back) == _files(folder)
    code, _, err = _run(["bundle", "unpack", str(esb), "-o", str(back)])
    assert code == 2 and "already exists" in err


def test_cli_help_describes_every_option():
    for action in ("pack", "unpack"):
        code, out, _ = _run(["bundle", action, "--help"])
        assert code == 0
        for option in ("-o OUT, --out OUT", "--overwrite"):
            line = next(l for l in out.splitlines() if l.strip().startswith(option))
            assert len(line.strip()) > len(option) + 5 or "replace" in out, line


# ---------------------------------------------------------------- real converted replica models


@pytest.mark.paddle
@pytest.mark.slow
def test_replica_one_file_bundle_recognises_exactly_like_its_folder(replica_bundle, tmp_path, test_images):
    esb = pack_bundle(replica_bundle, tmp_path / "replica.esb")
    gallery = _gallery(replica_bundle, tmp_path / "g.db", test_images[::3])
    want = _recognitions(replica_bundle, gallery, test_images)
    got = _recognitions(esb, gallery, test_images)
    assert len(test_images) == 13 and sum(len(r) for r in want) > 0
    assert got == want
    assert unpack_bundle(esb, tmp_path / "back") and _files(tmp_path / "back") == _files(replica_bundle)
