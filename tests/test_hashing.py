"""Hash heads: file format, validation, bundles (manifest, sha256, fingerprint), runtime use, rehash, CLI."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest

from conftest import FakeExtractorSession, run_cli as run
from edge_shitu.bundle import Bundle
from edge_shitu.codes import binarize, l2_normalize
from edge_shitu.embedder import Embedder
from edge_shitu.errors import (
    BundleError,
    FingerprintMismatchError,
    HashHeadError,
    IntegrityError,
    InvalidInputError,
    MissingFileError,
)
from edge_shitu.gallery import Gallery
from edge_shitu.hashing import HEAD_FILE, HashHead, encoder_for
from edge_shitu_converters.hash_heads import head_bytes, head_sha256, install_head, remove_head, save_head
from edge_shitu.recognizer import Recognizer
from edge_shitu.options import RecognizerOptions


def _head(rng, bits=64, dim=512) -> HashHead:
    return HashHead.from_arrays(rng.normal(size=(bits, dim)).astype(np.float32),
                                rng.normal(scale=0.01, size=bits).astype(np.float32))


def _features(rng, n=12, dim=512) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, dim)).astype(np.float32))


def test_format_round_trip_is_byte_exact(tmp_path, rng):
    head = _head(rng)
    path = save_head(head, tmp_path / "h.npz")
    back = HashHead.load(path)
    assert back.weight.dtype == np.float32 and back.bias.dtype == np.float32
    np.testing.assert_array_equal(back.weight, head.weight)
    np.testing.assert_array_equal(back.bias, head.bias)
    # Same head, same bytes: the sha256 a bundle records is reproducible.
    again = save_head(back, tmp_path / "again.npz")
    assert again.read_bytes() == path.read_bytes()
    assert head_sha256(head) == hashlib.sha256(path.read_bytes()).hexdigest()
    # Plain numpy reads it as the documented format: exactly weight [bits, d] and bias [bits], float32.
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["bias", "weight"]
        assert z["weight"].shape == (64, 512) and z["bias"].shape == (64,) and z["weight"].dtype == np.float32


def test_heads_written_by_numpy_savez_are_read(tmp_path, rng):
    w = np.asfortranarray(rng.normal(size=(16, 24)).astype(np.float32))
    b = rng.normal(size=16).astype(np.float32)
    np.savez(tmp_path / "plain.npz", weight=w, bias=b)
    np.savez_compressed(tmp_path / "packed.npz", weight=w, bias=b)
    for name in ("plain.npz", "packed.npz"):
        head = HashHead.load(tmp_path / name)
        np.testing.assert_array_equal(head.weight, w)
        np.testing.assert_array_equal(head.bias, b)


def test_codes_are_the_documented_formula(rng):
    head = _head(rng, bits=128)
    x = _features(rng, 20)
    expected = np.packbits((x @ head.weight.T + head.bias) > 0, axis=1)
    np.testing.assert_array_equal(head.encode(x), expected)
    assert head.encode(x).shape == (20, 16) and head.nbytes == 16


def test_identity_head_is_plain_sign(rng):
    x = _features(rng, 30)
    x[0, :40] = 0.0  # exact zeros give 0 bits, as binarize does
    x[1, 3] = -0.0
    head = HashHead.identity(512)
    np.testing.assert_array_equal(head.encode(x), binarize(x))
    np.testing.assert_array_equal(encoder_for(None)(x), binarize(x))
    np.testing.assert_array_equal(encoder_for(head)(x), binarize(x))
    with pytest.raises(HashHeadError, match="positive multiple of 8"):
        HashHead.identity(12)


def test_head_arrays_are_read_only_copies(rng):
    w = rng.normal(size=(8, 4)).astype(np.float32)
    head = HashHead.from_arrays(w, np.zeros(8, np.float32))
    w[0, 0] = 123.0
    assert head.weight[0, 0] != 123.0
    with pytest.raises(ValueError):
        head.weight[0, 0] = 1.0


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad_files(tmp_path, rng):
    w = rng.normal(size=(16, 32)).astype(np.float32)
    b = np.zeros(16, np.float32)
    nan_w = w.copy()
    nan_w[2, 3] = np.nan
    cases = {
        "extra key": (_write_npz(tmp_path / "extra.npz", weight=w, bias=b, scale=b), r"holds bias, scale, weight"),
        "missing bias": (_write_npz(tmp_path / "nobias.npz", weight=w), r"holds weight; expected .*'bias'"),
        "float64 weight": (_write_npz(tmp_path / "f64.npz", weight=w.astype(np.float64), bias=b),
                           r"weight has dtype float64, expected float32"),
        "int bias": (_write_npz(tmp_path / "ib.npz", weight=w, bias=b.astype(np.int32)), r"bias has dtype int32"),
        "bits not a multiple of 8": (_write_npz(tmp_path / "b12.npz", weight=w[:12], bias=b[:12]),
                                     r"bits a positive multiple of 8"),
        "zero bits": (_write_npz(tmp_path / "b0.npz", weight=w[:0], bias=b[:0]), r"bits a positive multiple of 8"),
        "bias shape": (_write_npz(tmp_path / "bs.npz", weight=w, bias=b[:8]),
                       r"bias has shape \(8,\), expected \[16\]"),
        "1-D weight": (_write_npz(tmp_path / "w1.npz", weight=w[0], bias=b), r"weight has shape \[32\], expected 2-D"),
        "NaN": (_write_npz(tmp_path / "nan.npz", weight=nan_w, bias=b), r"NaN or infinite"),
        "pickled object array": (_write_npz(tmp_path / "obj.npz", weight=np.array([{"a": 1}], dtype=object), bias=b),
                                 r"weight has dtype object, expected float32"),
    }
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    cases["not a zip"] = (garbage, r"not a valid hash head archive")
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, w)
    cases["a .npy file"] = (npy, r"not a valid hash head archive")
    good = head_bytes(HashHead.from_arrays(w, b))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (trunc, r"not a valid hash head archive")
    empty = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty, "w"):
        pass
    cases["empty archive"] = (empty, r"holds nothing")
    raw = tmp_path / "raw.npz"
    with zipfile.ZipFile(raw, "w") as zf:
        zf.writestr("weight.npy", b"\x00" * 40)
        zf.writestr("bias.npy", b"\x00" * 40)
    cases["members not .npy"] = (raw, r"weight is not a \.npy array")
    return cases


def test_bad_head_files_name_the_file_and_what_was_expected(tmp_path, rng):
    for what, (path, message) in _bad_files(tmp_path, rng).items():
        with pytest.raises(HashHeadError, match=message) as info:
            HashHead.load(path)
        text = str(info.value)
        assert str(path) in text, what
        assert "expected" in text, what
        assert isinstance(info.value, ValueError)


def test_missing_head_file_and_directory(tmp_path):
    with pytest.raises(MissingFileError, match="nope.npz: no such hash head file"):
        HashHead.load(tmp_path / "nope.npz")
    with pytest.raises(HashHeadError, match="is a directory"):
        HashHead.load(tmp_path)


def test_from_arrays_refuses_without_casting(rng):
    with pytest.raises(HashHeadError, match="weight has dtype float64"):
        HashHead.from_arrays(np.zeros((8, 4)), np.zeros(8, np.float32))
    with pytest.raises(HashHeadError, match="must be a numpy array"):
        HashHead.from_arrays([[0.0] * 4] * 8, np.zeros(8, np.float32))
    inf_b = np.zeros(8, np.float32)
    inf_b[1] = np.inf
    with pytest.raises(HashHeadError, match="bias holds NaN or infinite"):
        HashHead.from_arrays(np.zeros((8, 4), np.float32), inf_b)


def test_feature_shape_mismatch(rng):
    head = _head(rng, bits=32, dim=64)
    with pytest.raises(HashHeadError, match=r"expects 64-d features \(weight \[32, 64\]\), got 128-d"):
        head.encode(_features(rng, 3, 128))
    with pytest.raises(InvalidInputError, match="2-D"):
        head.encode(np.zeros(64, np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        head.encode(np.full((1, 64), np.nan, np.float32))
    from edge_shitu.errors import InvalidDtypeError

    with pytest.raises(InvalidDtypeError, match="floating-point"):
        head.encode(np.zeros((1, 64), np.int32))
    assert head.encode(np.zeros((0, 64), np.float32)).shape == (0, 4)


def _old_fingerprint(bundle: Bundle) -> str:
    """The fingerprint formula of bundles without a head (before heads existed)."""
    payload = json.dumps({"extractor_sha256": bundle.extractor.sha256, "bits": bundle.codes.bits,
                          "method": bundle.codes.method, "bit_order": bundle.codes.bit_order}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def test_bundle_without_head_is_unchanged(fake_bundle):
    b = Bundle.load(fake_bundle)
    assert b.hash is None and b.load_hash_head() is None
    assert b.code_fingerprint == _old_fingerprint(b)


def test_head_in_bundle_changes_the_fingerprint(fake_bundle, tmp_path, rng):
    before = Bundle.load(fake_bundle).code_fingerprint
    head = _head(rng, bits=512)
    path = install_head(fake_bundle, save_head(head, tmp_path / "h.npz"), source={"method": "test"})
    assert path == fake_bundle.resolve() / HEAD_FILE and path.read_bytes() == head_bytes(head)
    b = Bundle.load(fake_bundle)
    assert b.hash.sha256 == head_sha256(head) and b.hash.bits == 512 and b.hash.dim == 512
    assert b.hash.source == {"method": "test"}
    assert b.code_fingerprint != before
    # Another head, another fingerprint; the same head again, the same one.
    first = b.code_fingerprint
    install_head(fake_bundle, _head(rng, bits=512))
    assert Bundle.load(fake_bundle).code_fingerprint not in (before, first)
    install_head(fake_bundle, head, source={"method": "test"})
    assert Bundle.load(fake_bundle).code_fingerprint == first
    np.testing.assert_array_equal(Bundle.load(fake_bundle).load_hash_head().weight, head.weight)
    # Taking the head out restores the original codes and fingerprint.
    assert remove_head(fake_bundle) is True
    assert not (fake_bundle / HEAD_FILE).exists()
    assert Bundle.load(fake_bundle).code_fingerprint == before
    assert remove_head(fake_bundle) is False


def test_head_with_other_bits_sets_the_code_length(fake_bundle, rng):
    install_head(fake_bundle, _head(rng, bits=256))
    b = Bundle.load(fake_bundle)
    assert b.codes.bits == 256 and b.codes.nbytes == 32


def test_tampered_head_is_refused_by_sha256(fake_bundle, rng):
    install_head(fake_bundle, _head(rng, bits=512))
    other = head_bytes(_head(rng, bits=512))
    (fake_bundle / HEAD_FILE).write_bytes(other)  # a valid head file, but not the recorded one
    with pytest.raises(IntegrityError, match=r"hash\.npz: sha256 is .* but manifest\.json records"):
        Bundle.load(fake_bundle)
    # Skipping the bundle check does not let the runtime use it either.
    b = Bundle.load(fake_bundle, verify=False)
    with pytest.raises(IntegrityError, match="hash.npz: sha256"):
        b.load_hash_head()
    (fake_bundle / HEAD_FILE).unlink()
    with pytest.raises(MissingFileError, match="hash head file named by"):
        Bundle.load(fake_bundle)


def test_head_that_does_not_fit_the_extractor(fake_bundle, rng):
    with pytest.raises(HashHeadError, match=r"takes 256-d features .* gives 512-d features"):
        install_head(fake_bundle, _head(rng, bits=64, dim=256))
    assert Bundle.load(fake_bundle).hash is None


def _rewrite(root, mutate):
    m = json.loads((root / "manifest.json").read_text())
    mutate(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["hash"].update(extra=1), r"unknown key\(s\) in manifest\.hash: extra"),
    (lambda m: m["hash"].pop("sha256"), r"hash\.sha256 is missing"),
    (lambda m: m["hash"].update(file="../hash.npz"), "path inside the bundle"),
    (lambda m: m["hash"].update(sha256="ABC"), "64 lowercase hex"),
    (lambda m: m["hash"].update(bits=12), "positive multiple of 8"),
    (lambda m: m["codes"].update(bits=128), r"codes\.bits \(128\) differs from the hash head's bits \(64\)"),
    (lambda m: m["hash"].update(dim=256), r"hash\.dim \(256\) differs from the extractor dim \(512\)"),
    (lambda m: m["models"].pop("extractor"), "a hash head needs an extractor"),
])
def test_manifest_hash_entry_is_strict(fake_bundle, rng, mutate, message):
    install_head(fake_bundle, _head(rng, bits=64))
    _rewrite(fake_bundle, mutate)
    with pytest.raises(BundleError, match=message):
        Bundle.load(fake_bundle, verify=False)


def test_embedder_applies_the_head_after_l2_normalisation(fake_bundle, rng):
    img = rng.integers(0, 255, size=(90, 70, 3), dtype=np.uint8)
    plain = Embedder.from_bundle(fake_bundle, session=FakeExtractorSession())
    feats = plain.features([img])
    head = _head(rng, bits=256)
    install_head(fake_bundle, head)
    emb = Embedder.from_bundle(fake_bundle, session=FakeExtractorSession())
    assert emb.head is not None and emb.codes.bits == 256
    np.testing.assert_array_equal(emb.features([img]), feats)
    codes = emb.embed([img])
    assert codes.shape == (1, 32)
    np.testing.assert_array_equal(codes, np.packbits((feats @ head.weight.T + head.bias) > 0, axis=1))
    # L2 normalisation comes first: the raw feature's scale would change codes of a head with a bias.
    raw = emb.infer(emb.preprocess([img]))
    assert not np.allclose(np.linalg.norm(raw), 1.0)
    np.testing.assert_array_equal(codes, head.encode(l2_normalize(raw)))


def test_recognizer_searches_head_codes(fake_bundle, rng):
    install_head(fake_bundle, _head(rng, bits=128))
    bundle = Bundle.load(fake_bundle)
    emb = Embedder.from_bundle(bundle, session=FakeExtractorSession())
    imgs = [rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for _ in range(3)]
    gallery = Gallery.create(":memory:", fingerprint=bundle.code_fingerprint, bits=128)
    gallery.add(emb.embed(imgs), ["a", "b", "c"])
    rec = Recognizer(bundle, None, emb, gallery, RecognizerOptions(max_distance=0))
    assert [r.label for r in rec.recognize(imgs[1]).recognitions] == ["b"]
    # A gallery of plain sign codes (the same bundle without its head) is refused.
    plain = Gallery.create(":memory:", fingerprint=_old_fingerprint(bundle), bits=128)
    with pytest.raises(FingerprintMismatchError):
        Recognizer(bundle, None, emb, plain, RecognizerOptions())


def test_gallery_build_stores_head_codes(fake_bundle, tmp_path, rng):
    from PIL import Image

    from edge_shitu.enrol import build_gallery
    from edge_shitu.labelfile import LabelEntry

    head = _head(rng, bits=512)
    install_head(fake_bundle, head)
    bundle = Bundle.load(fake_bundle)
    root = tmp_path / "images"
    root.mkdir()
    entries = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, size=(48, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        entries.append(LabelEntry(f"{i}.png", f"l{i}", i + 1))
    emb = Embedder.from_bundle(bundle, session=FakeExtractorSession())
    build_gallery(bundle, root, entries, tmp_path / "g.db", embedder=emb, keep_embeddings=True)
    with Gallery.open(tmp_path / "g.db", fingerprint=bundle.code_fingerprint) as g:
        ids, codes = g.codes()
        feats = g.embeddings(ids)
    np.testing.assert_array_equal(codes, head.encode(feats))
    assert not np.array_equal(codes, binarize(feats))


@pytest.fixture
def gallery_with_embeddings(fake_bundle, tmp_path, rng):
    bundle = Bundle.load(fake_bundle)
    feats = _features(rng, 20)
    path = tmp_path / "g.db"
    with Gallery.create(path, fingerprint=bundle.code_fingerprint) as g:
        g.add(binarize(feats), [f"l{i % 5}" for i in range(20)], embeddings=feats,
              embedding_fingerprint=bundle.embedding_fingerprint)
    return path, feats


def test_rehash_with_a_new_head(fake_bundle, gallery_with_embeddings, tmp_path, rng):
    path, feats = gallery_with_embeddings
    head = _head(rng, bits=512)
    code, out, err = run("hash", "install", save_head(head, tmp_path / "h.npz"), "--bundle", fake_bundle)
    assert code == 0, err
    assert "re-hash" in out
    bundle = Bundle.load(fake_bundle)
    with pytest.raises(FingerprintMismatchError):
        Gallery.open(path, fingerprint=bundle.code_fingerprint)
    code, out, err = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 0, err
    assert "re-hashed 20 item(s)" in out
    with Gallery.open(path, fingerprint=bundle.code_fingerprint) as g:
        ids, codes = g.codes()
    np.testing.assert_array_equal(codes, head.encode(feats))
    # Again: nothing to do; --force does it anyway, with the same result.
    code, out, _ = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 0 and "nothing to do" in out
    code, out, _ = run("gallery", "rehash", path, "--bundle", fake_bundle, "--force")
    assert code == 0 and "re-hashed 20" in out
    # Removing the head and re-hashing gives back the plain sign codes.
    code, out, err = run("hash", "remove", "--bundle", fake_bundle)
    assert code == 0 and "removed" in out
    code, out, err = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 0, err
    with Gallery.open(path, fingerprint=Bundle.load(fake_bundle).code_fingerprint) as g:
        np.testing.assert_array_equal(g.codes()[1], binarize(feats))


def test_rehash_refused_without_embeddings(fake_bundle, tmp_path, rng):
    bundle = Bundle.load(fake_bundle)
    path = tmp_path / "noemb.db"
    with Gallery.create(path, fingerprint=bundle.code_fingerprint) as g:
        g.add(binarize(_features(rng, 4)), ["a", "b", "c", "d"])
    before = path.read_bytes()
    install_head(fake_bundle, _head(rng, bits=512))
    code, out, err = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 2
    assert "stores no float embeddings" in err and "--keep-embeddings" in err
    assert path.read_bytes() == before
    # Some items with embeddings and some without: Gallery.rehash refuses, nothing changes.
    with Gallery.open(path) as g:
        feats = _features(rng, 2)
        g.add(binarize(feats), ["e", "f"], embeddings=feats,
              embedding_fingerprint=bundle.embedding_fingerprint)
    code, out, err = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 2 and "have no stored float embedding" in err
    with Gallery.open(path) as g:
        assert g.fingerprint == bundle.code_fingerprint


def test_rehash_refuses_other_code_length(fake_bundle, gallery_with_embeddings, rng):
    path, _ = gallery_with_embeddings
    install_head(fake_bundle, _head(rng, bits=256))
    code, out, err = run("gallery", "rehash", path, "--bundle", fake_bundle)
    assert code == 2 and "holds 512-bit codes" in err and "256-bit" in err


def test_rehash_python_api(gallery_with_embeddings, fake_bundle, rng):
    path, feats = gallery_with_embeddings
    install_head(fake_bundle, _head(rng, bits=512))
    bundle = Bundle.load(fake_bundle)
    with Gallery.open(path) as g:
        assert g.rehash(encoder_for(bundle.load_hash_head()), fingerprint=bundle.code_fingerprint,
                        embedding_fingerprint=bundle.embedding_fingerprint) == 20
    with Gallery.open(path) as g:
        with pytest.raises(InvalidInputError, match="encode must return uint8 codes"):
            g.rehash(lambda e: np.zeros((len(e), 8), np.uint8), fingerprint=bundle.code_fingerprint,
                     embedding_fingerprint=bundle.embedding_fingerprint)
        assert g.fingerprint == bundle.code_fingerprint
        np.testing.assert_array_equal(g.codes()[1], bundle.load_hash_head().encode(feats))


def test_cli_install_errors(fake_bundle, tmp_path, rng):
    bad = tmp_path / "bad.npz"
    np.savez(bad, weight=np.zeros((8, 512), np.float64), bias=np.zeros(8, np.float32))
    code, out, err = run("hash", "install", bad, "--bundle", fake_bundle)
    assert code == 2 and "bad.npz: weight has dtype float64, expected float32" in err
    code, out, err = run("hash", "install", tmp_path / "missing.npz", "--bundle", fake_bundle)
    assert code == 2 and "missing.npz" in err
    assert Bundle.load(fake_bundle).hash is None


@pytest.fixture
def toy_npz(tmp_path):
    """Well separated synthetic classes: 12 classes x 6 items, 64-d, string labels."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 64))
    x = np.repeat(centres, 6, axis=0) + 0.4 * rng.normal(size=(72, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([f"class-{i}" for i in range(12)]).repeat(6)
    path = tmp_path / "toy.npz"
    np.savez(path, embeddings=x.astype(np.float32), labels=labels, paths=np.array([f"{i}.jpg" for i in range(72)]))
    return path


@pytest.mark.parametrize("method, extra", [("itq", []), ("dshsd", ["--init", "orthogonal", "--epochs", 3])])
def test_cli_train_writes_a_loadable_deterministic_head(toy_npz, tmp_path, method, extra):
    outs = []
    for name in ("a.npz", "b.npz"):
        code, out, err = run("hash", "train", "--embeddings", toy_npz, "--out", tmp_path / name, "--method", method,
                             "--bits", 32, "--json", *extra)
        assert code == 0, err
        outs.append(json.loads(out))
    head = HashHead.load(tmp_path / "a.npz")
    assert (head.bits, head.dim) == (32, 64)
    assert outs[0]["method"] == method and outs[0]["items"] == 72 and outs[0]["classes"] == 12
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert outs[0]["sha256"] == outs[1]["sha256"] == head_sha256(head)


def test_cli_train_identity_start_needs_bits_equal_dim(toy_npz, tmp_path):
    code, out, err = run("hash", "train", "--embeddings", toy_npz, "--out", tmp_path / "h.npz", "--bits", 32,
                         "--init", "identity")
    assert code == 2 and "init 'identity' needs bits == d = 64, got bits = 32" in err
    assert not (tmp_path / "h.npz").exists()


def test_cli_eval_table_and_json(toy_npz, tmp_path):
    save_head(HashHead.identity(64), tmp_path / "id.npz")
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--head", tmp_path / "id.npz", "--json")
    assert code == 0, err
    res = json.loads(out)["results"]
    assert list(res) == ["float", "sign", "head", "rerank", "rerank_head"]  # rerank: the Hamming top-16 re-ranked
    assert res["head"] == res["sign"]  # the identity head is plain sign
    assert res["float"]["queries"] == 72 and 0.0 <= res["float"]["map"] <= 1.0
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--split-classes", "--train-fraction", 0.5,
                         "--seed", 3, "--epochs", 2, "--bits", 64)
    assert code == 0, err
    assert "held-out classes: 6 classes, 36 items" in out
    for name in ("float", "sign", "itq", "dshsd"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--split-classes", "--epochs", 2, "--bits", 64,
                         "--json")
    split = json.loads(out)["split"]
    assert split["train"]["classes"] + split["test"]["classes"] == 12
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--epochs", 2, "--select")
    assert code == 2 and "--epochs, --select only apply with --split-classes" in err


@pytest.mark.slow
def test_cli_select_chooses_on_the_training_classes(toy_npz, tmp_path):
    code, out, err = run("hash", "eval", "--embeddings", toy_npz, "--split-classes", "--bits", 64, "--select",
                         "--select-folds", 2, "--json")
    assert code == 0, err
    assert "120 candidates x 2 class splits of the 6 training classes" in err
    assert "selected: init " in err
    assert set(json.loads(out)["results"]) == {"float", "sign", "itq", "dshsd", "rerank"}


def test_cli_bad_embeddings_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((3, 8), np.float32))
    code, out, err = run("hash", "train", "--embeddings", bad, "--out", tmp_path / "h.npz")
    assert code == 2 and "bad.npz: holds features; expected an .npz with 'embeddings'" in err
    code, out, err = run("hash", "eval", "--embeddings", tmp_path / "none.npz")
    assert code == 2 and "none.npz" in err
    assert not (tmp_path / "h.npz").exists()


def test_convert_refuses_a_bad_head_before_any_work(tmp_path, rng):
    from edge_shitu_converters.convert import convert

    bad = tmp_path / "bad.npz"
    np.savez(bad, weight=np.zeros((12, 512), np.float32), bias=np.zeros(12, np.float32))
    # The model folders do not even exist: the head is checked first.
    with pytest.raises(HashHeadError, match="bad.npz: weight has shape"):
        convert(None, tmp_path / "no-rec", tmp_path / "out", hash_head=bad)
    good = save_head(_head(rng, bits=64), tmp_path / "good.npz")
    with pytest.raises(InvalidInputError, match="a hash head needs the extractor"):
        convert(tmp_path / "no-det", None, tmp_path / "out", hash_head=good)
    assert not (tmp_path / "out").exists()
    # The same through the command line: one line on stderr, exit 2.
    import io

    from edge_shitu.cli import main

    err = io.StringIO()
    code = main(["convert", "--rec", str(tmp_path / "no-rec"), "--out", str(tmp_path / "out"), "--hash-head", str(bad)],
                stdout=io.StringIO(), stderr=err)
    assert code == 2 and "bad.npz: weight has shape" in err.getvalue() and err.getvalue().count("\n") == 1


@pytest.mark.paddle
@pytest.mark.slow
def test_convert_puts_the_head_into_the_bundle(replica_dirs, tmp_path, rng, test_images):
    from edge_shitu_converters.convert import convert

    head = _head(rng, bits=256)
    out = convert(None, replica_dirs["extractor"], tmp_path / "bundle", hash_head=save_head(head, tmp_path / "h.npz"))
    b = Bundle.load(out)
    assert b.hash.sha256 == head_sha256(head) and b.codes.bits == 256 and b.hash.source == {"installed_from": "h.npz"}
    assert sorted(p.name for p in out.iterdir()) == ["extractor.onnx", HEAD_FILE, "manifest.json"]
    with Embedder.from_bundle(b) as emb:
        feats = emb.features(test_images[:3])
        codes = emb.embed(test_images[:3])
    assert codes.shape == (3, 32)
    np.testing.assert_array_equal(codes, head.encode(feats))
    code, out_text, err = run("bundle", "info", out)
    assert code == 0 and "codes 256 bits" in out_text
