"""The recogniser's HNSW search (``search_backend="hnsw"``): an oracle against brute-force inner product over the
stored embeddings, acceptance by similarity, rebuilds when the gallery changes, refusals, and the command line.
Fake sessions stand in for the models (as in test_cli_device.py), so the library and the CLI see the same ones."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("hnswlib", reason='hnswlib (pip install "edge-shitu[hnsw]") is not installed')

from conftest import FakeDetectorSession, FakeExtractorSession, run_cli as run
from edge_shitu.bundle import Bundle
from edge_shitu.embedder import Embedder
from edge_shitu.errors import (
    BackendUnavailableError,
    FingerprintMismatchError,
    InvalidInputError,
    MissingEmbeddingsError,
)
from edge_shitu.float_index import FloatIndexOptions
from edge_shitu.gallery import Gallery
from edge_shitu.image import crop
from edge_shitu.options import DEFAULT_MIN_SIMILARITY, RecognizerOptions
from edge_shitu.recognizer import Recognizer
from edge_shitu.types import WholeImagePolicy

BOX_A = (96.0, 96.0, 176.0, 160.0)
BOX_B = (400.0, 300.0, 480.0, 380.0)
TOP_K = 10
NOISE = (0.02, 0.05, 0.1, 0.2, 0.4)
DISTRACTORS = 300


@pytest.fixture
def bundle(fake_bundle, monkeypatch):
    """The fake bundle, whose sessions (also those the CLI creates) are the fake detector and extractor."""
    monkeypatch.setattr("edge_shitu.embedder.create_session", lambda spec, **kw: FakeExtractorSession())
    monkeypatch.setattr("edge_shitu.detector.create_session",
                        lambda spec, **kw: FakeDetectorSession([(BOX_A, 0.9), (BOX_B, 0.8)]))
    return fake_bundle


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, size=(640, 640, 3), dtype=np.uint8)
    img[96:160, 96:176] = (200, 30, 30)
    img[300:380, 400:480] = (20, 30, 220)
    path = tmp_path / "photo.png"
    Image.fromarray(img).save(path)
    return path, img


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _region_features(bundle, img) -> np.ndarray:
    with Embedder.from_bundle(bundle) as emb:
        return emb.features([crop(img, BOX_A), crop(img, BOX_B), img])


def _fill(path, bundle, feats: np.ndarray, labels, *, embeddings: bool = True) -> np.ndarray:
    b = Bundle.load(bundle)
    with Embedder.from_bundle(b) as emb:
        codes = emb.encode(_unit(feats))
    with Gallery.create(path, fingerprint=b.code_fingerprint) as g:
        if not embeddings:
            return g.add(codes, labels)
        return g.add(codes, labels, embeddings=feats, embedding_fingerprint=b.embedding_fingerprint)


@pytest.fixture
def gallery(bundle, photo, tmp_path):
    """Noisy copies of each region's feature (labels "A0".."W4", nearest first) among random distractors:
    (path, ids, embeddings, labels)."""
    _, img = photo
    regions = _region_features(bundle, img)
    rng = np.random.default_rng(11)
    feats, labels = [], []
    for name, q in zip("ABW", regions):
        for level, sigma in enumerate(NOISE):
            feats.append(q + sigma * _unit(rng.standard_normal(q.shape[0])))
            labels.append(f"{name}{level}")
    feats += list(rng.standard_normal((DISTRACTORS, regions.shape[1])))
    labels += [f"other{i % 5}" for i in range(DISTRACTORS)]
    emb = np.asarray(feats, dtype=np.float32)
    path = tmp_path / "drinks.gallery"
    return path, _fill(path, bundle, emb, labels), emb, labels


def _hnsw(**kwargs) -> RecognizerOptions:
    kwargs.setdefault("whole_image", WholeImagePolicy.ALWAYS)
    kwargs.setdefault("include_unknown", True)
    return RecognizerOptions(search_backend="hnsw", top_k=TOP_K, **kwargs)


def _whole(result):
    (whole,) = [r for r in result.recognitions if r.whole_image]
    return whole


def _exact(query: np.ndarray, emb: np.ndarray, ids: np.ndarray, k: int):
    """Slow and obvious: float64 inner product of the L2-normalised query with every normalised embedding,
    ranked by (-similarity, id)."""
    q = query.astype(np.float64) / np.linalg.norm(query)
    sims = [float(row.astype(np.float64) @ q / np.linalg.norm(row.astype(np.float64))) for row in emb]
    order = sorted(range(len(ids)), key=lambda j: (-sims[j], int(ids[j])))[:k]
    return [int(ids[j]) for j in order], [sims[j] for j in order], order


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


def test_results_equal_brute_force_inner_product_over_the_stored_embeddings(bundle, photo, gallery):
    _, img = photo
    path, ids, emb, labels = gallery
    with Gallery.open(path, readonly=True) as g:
        item_ids, item_codes = g.codes()
    assert (item_ids == ids).all()
    opts = _hnsw(min_similarity=-1.0, float_index=FloatIndexOptions(ef_search=1000))
    with Recognizer.from_bundle(bundle, path, options=opts) as rec, Embedder.from_bundle(bundle) as emb_model:
        assert rec.accepts_by_similarity and not rec.reranks and rec.float_index.size == len(ids)
        result = rec.recognize(img)
        assert len(result.recognitions) == 3
        for r in result.recognitions:
            feat = emb_model.features([crop(img, r.box)])
            code = emb_model.encode(feat)[0]
            want_ids, want_sims, rows = _exact(feat[0], emb, ids, TOP_K)
            assert [m.id for m in r.candidates] == want_ids
            assert [m.label for m in r.candidates] == [labels[j] for j in rows]
            np.testing.assert_allclose([m.similarity for m in r.candidates], want_sims, rtol=0, atol=1e-5)
            assert [m.distance for m in r.candidates] == [_hamming(code, item_codes[j]) for j in rows]
            assert (r.label, r.similarity, r.distance) == (r.candidates[0].label, r.candidates[0].similarity,
                                                           r.candidates[0].distance)
    # Each region's nearest items are its own noisy copies, nearest first: the search ranks by the embeddings.
    by_region = {r.box: [m.label for m in r.candidates[:3]] for r in result.recognitions}
    assert by_region[BOX_A] == ["A0", "A1", "A2"] and by_region[BOX_B] == ["B0", "B1", "B2"]
    assert path.with_name(path.name + ".hnsw").is_file() and path.with_name(path.name + ".hnsw.json").is_file()


def test_acceptance_flips_exactly_at_min_similarity(bundle, photo, gallery):
    _, img = photo
    path = gallery[0]
    with Recognizer.from_bundle(bundle, path, options=_hnsw()) as rec:
        assert rec.min_similarity == DEFAULT_MIN_SIMILARITY
        best = _whole(rec.recognize(img))
    assert best.label == "W0" and 0.9 < best.similarity < 1.0
    above = float(np.nextafter(best.similarity, 2.0))
    for threshold, known in ((best.similarity, True), (above, False)):
        with Recognizer.from_bundle(bundle, path, options=_hnsw(min_similarity=threshold)) as rec:
            again = _whole(rec.recognize(img))
        assert again.similarity == best.similarity
        assert (again.label is not None) is known, threshold
    # Without the option the gallery's calibrated value applies; unknown regions are dropped by default.
    with Gallery.open(path) as g:
        g.set_min_similarity(above)
    with Recognizer.from_bundle(bundle, path, options=_hnsw(include_unknown=False)) as rec:
        assert rec.min_similarity == above
        assert not any(r.whole_image for r in rec.recognize(img).recognitions)


def test_the_index_is_rebuilt_when_another_handle_changes_the_gallery(bundle, photo, gallery):
    _, img = photo
    path = gallery[0]
    b = Bundle.load(bundle)
    with Recognizer.from_bundle(bundle, path, options=_hnsw()) as rec, Embedder.from_bundle(b) as emb:
        first = rec.float_index
        assert _whole(rec.recognize(img)).label == "W0"
        assert rec.float_index is first  # an unchanged gallery keeps its index
        # The new item's embedding is the whole image's own feature, but its code is the opposite one: only a
        # search of the embeddings can find it first.
        feat = emb.features([img])
        far = np.bitwise_not(emb.encode(feat))
        with Gallery.open(path) as other:
            (new_id,) = other.add(far, ["new"], embeddings=feat, embedding_fingerprint=b.embedding_fingerprint)
        whole = _whole(rec.recognize(img))
        assert rec.float_index is not first and rec.float_index.size == first.size + 1
        assert (whole.label, whole.candidates[0].id, whole.distance) == ("new", int(new_id), 512)
        assert whole.similarity == pytest.approx(1.0, abs=1e-5)
        with Gallery.open(path) as other:
            other.remove([int(new_id)])
        whole = _whole(rec.recognize(img))
        assert whole.label == "W0" and int(new_id) not in [m.id for m in whole.candidates]
    sidecar = json.loads(path.with_name(path.name + ".hnsw.json").read_text())
    assert sidecar["count"] == first.size


def test_final_nms_keeps_the_most_similar_of_overlapping_regions(fake_bundle, photo, tmp_path):
    from edge_shitu.detector import Detector

    _, img = photo
    shifted = (136.0, 96.0, 216.0, 160.0)  # IoU 1/3 with BOX_A: one of them goes in the final NMS
    b = Bundle.load(fake_bundle)
    emb = Embedder.from_bundle(b, session=FakeExtractorSession())
    feat_a, feat_shifted = emb.features([crop(img, BOX_A), crop(img, shifted)])
    # "outer" is BOX_A's own embedding under the opposite code; "near" is close to the shifted box's embedding
    # under that box's own code. By similarity BOX_A ("outer") wins; by Hamming distance or by detector score
    # the shifted box ("near") would.
    noisy = feat_shifted + 0.3 * _unit(np.random.default_rng(5).standard_normal(feat_shifted.shape[0]))
    codes = np.concatenate([np.bitwise_not(emb.encode(feat_a[None])), emb.encode(feat_shifted[None])])
    gallery = Gallery.create(tmp_path / "nms.gallery", fingerprint=b.code_fingerprint)
    gallery.add(codes, ["outer", "near"], embeddings=np.stack([feat_a, noisy]),
                embedding_fingerprint=b.embedding_fingerprint)
    det = Detector.from_bundle(b, session=FakeDetectorSession([(BOX_A, 0.5), (shifted, 0.95)]))
    opts = _hnsw(whole_image=WholeImagePolicy.NEVER, include_unknown=False)
    (winner,) = Recognizer(b, det, emb, gallery, opts).recognize(img).recognitions
    assert (winner.label, winner.distance) == ("outer", 512) and winner.similarity == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(winner.box, BOX_A, atol=1e-3)
    # Without the final NMS both stay: the suppressed region had an accepted match of its own, at distance 0.
    with Recognizer(b, det, emb, gallery, replace(opts, final_nms_iou=1.0), owns_gallery=True) as rec:
        loser = {r.box: r for r in rec.recognize(img).recognitions}[shifted]
    assert (loser.label, loser.distance) == ("near", 0) and 0.5 < loser.similarity < winner.similarity


def test_an_all_zero_feature_has_no_candidate(bundle, photo, gallery):
    _, img = photo
    with Recognizer.from_bundle(bundle, gallery[0], options=_hnsw()) as rec:
        postprocess = rec.embedder.postprocess

        def zero_first(raw):
            feats = postprocess(raw)
            feats[0] = 0.0
            return feats

        rec.embedder.postprocess = zero_first
        result = rec.recognize(img)
    by_box = {r.box: r for r in result.recognitions}
    assert by_box[BOX_A].candidates == () and by_box[BOX_A].label is None
    assert by_box[BOX_B].label == "B0"


def test_a_gallery_without_embeddings_is_refused(bundle, photo, gallery, tmp_path):
    path, _, emb, labels = gallery
    plain = tmp_path / "plain.gallery"
    _fill(plain, bundle, emb[:5], labels[:5], embeddings=False)
    with pytest.raises(MissingEmbeddingsError,
                       match=r"search_backend 'hnsw' searches stored embeddings: .*plain\.gallery.*--keep-embeddings"):
        Recognizer.from_bundle(bundle, plain, options=_hnsw())
    code, out, err = run("recognize", "--bundle", bundle, "--gallery", plain, "--search-backend", "hnsw",
                         photo[0])
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("edge-shitu: error: ") and str(plain) in line and "--keep-embeddings" in line
    # The same gallery is searched by its codes as before.
    assert run("recognize", "--bundle", bundle, "--gallery", plain, photo[0])[0] == 0


def test_embeddings_of_another_extractor_are_refused(bundle, gallery, tmp_path):
    b = Bundle.load(bundle)
    _, _, emb, labels = gallery
    other = tmp_path / "other.gallery"
    with Embedder.from_bundle(b) as model, Gallery.create(other, fingerprint=b.code_fingerprint) as g:
        g.add(model.encode(_unit(emb[:4])), labels[:4], embeddings=emb[:4], embedding_fingerprint="f" * 32)
    with pytest.raises(FingerprintMismatchError, match="stored embeddings were made by extractor f{32}"):
        Recognizer.from_bundle(bundle, other, options=_hnsw())


def test_missing_hnswlib_names_the_extra(bundle, photo, gallery, monkeypatch):
    monkeypatch.setitem(sys.modules, "hnswlib", None)
    with pytest.raises(BackendUnavailableError, match=r'pip install "edge-shitu\[hnsw\]"'):
        Recognizer.from_bundle(bundle, gallery[0], options=_hnsw())
    code, _, err = run("recognize", "--bundle", bundle, "--gallery", gallery[0], "--search-backend", "hnsw", photo[0])
    assert code == 1 and len(err.splitlines()) == 1 and 'pip install "edge-shitu[hnsw]"' in err


def test_options_of_the_hnsw_backend_are_checked():
    opts = RecognizerOptions(search_backend="hnsw", float_index=FloatIndexOptions(ef_search=7))
    assert opts.float_index.ef_search == 7
    with pytest.raises(InvalidInputError, match="max_distance .* does not apply to search_backend 'hnsw'"):
        RecognizerOptions(search_backend="hnsw", max_distance=3)
    with pytest.raises(InvalidInputError, match="float_index applies to search_backend 'hnsw' only"):
        RecognizerOptions(float_index=FloatIndexOptions())
    with pytest.raises(InvalidInputError, match="float_index must be FloatIndexOptions"):
        RecognizerOptions(search_backend="hnsw", float_index={"ef_search": 7})
    with pytest.raises(InvalidInputError, match="one of auto, numpy, faiss, hnsw"):
        RecognizerOptions(search_backend="annoy")


def test_cli_recognize_with_the_hnsw_backend(bundle, photo, gallery):
    image, img = photo
    path = gallery[0]
    code, out, err = run("recognize", "--bundle", bundle, "--gallery", path, "--search-backend", "hnsw",
                         "--hnsw-ef", 500, "--whole-image", "always", "--include-unknown", "--top-k", TOP_K,
                         "--json", image)
    assert code == 0, err
    (record,) = json.loads(out)
    opts = _hnsw(float_index=FloatIndexOptions(ef_search=500))
    with Recognizer.from_bundle(bundle, path, options=opts) as rec:
        expected = rec.recognize(img).recognitions
    assert [r["label"] for r in record["results"]] == [r.label for r in expected]
    for got, want in zip(record["results"], expected):
        assert [c["id"] for c in got["candidates"]] == [m.id for m in want.candidates]
        assert [c["distance"] for c in got["candidates"]] == [m.distance for m in want.candidates]
        assert [c["similarity"] for c in got["candidates"]] == [round(m.similarity, 4) for m in want.candidates]
    assert {r["label"] for r in record["results"]} == {"A0", "B0", "W0"}
    # --min-similarity decides acceptance; the Hamming radius is refused rather than ignored.
    code, out, _ = run("recognize", "--bundle", bundle, "--gallery", path, "--search-backend", "hnsw",
                       "--whole-image", "always", "--min-similarity", "1", "--json", image)
    assert code == 0 and json.loads(out)[0]["results"] == []
    for extra, message in ((["--search-backend", "hnsw", "--max-distance", "10"], "--max-distance does not apply"),
                           (["--hnsw-ef", "64"], "--hnsw-ef applies to --search-backend hnsw only")):
        code, out, err = run("recognize", "--bundle", bundle, "--gallery", path, *extra, image)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err
