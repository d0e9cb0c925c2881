"""Tests of edge_shitu.float_index: recall against exact search, edges, staleness, damaged and half-written files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hnswlib", reason='hnswlib (pip install "edge-shitu[hnsw]") is not installed')

from edge_shitu.codes import binarize
from edge_shitu.errors import (
    BackendUnavailableError,
    ClosedError,
    GalleryError,
    InvalidDtypeError,
    InvalidInputError,
)
from edge_shitu.errors import MissingEmbeddingsError
from edge_shitu.float_index import FloatIndex, FloatIndexOptions
from edge_shitu.gallery import Gallery

FP = "0123abcd"
EMB_FP = "e1e2e3e4"


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 64), dtype=np.uint8)


def _exact(queries: np.ndarray, emb: np.ndarray, ids: np.ndarray, k: int):
    """Brute-force inner product of normalised vectors: ids (q, k) by (-similarity, id), similarities."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = (q.astype(np.float64) @ g.astype(np.float64).T)
    order = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=-1)[:, :k]
    return ids[order], np.take_along_axis(sims, order, axis=1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found.tolist(), truth.tolist())]))


def _fill(path, emb: np.ndarray, rng: np.random.Generator, labels=None) -> np.ndarray:
    with Gallery.create(path, fingerprint=FP) as g:
        labels = labels if labels is not None else [f"p{i % 7}" for i in range(emb.shape[0])]
        return g.add(_codes(rng, emb.shape[0]), labels, embeddings=emb, embedding_fingerprint=EMB_FP)


@pytest.fixture
def gallery_path(tmp_path: Path) -> Path:
    return tmp_path / "drinks.gallery"


@pytest.fixture
def small(gallery_path, rng):
    """A gallery file of 300 random unit vectors in 32-d: (path, ids, embeddings)."""
    emb = _unit(rng, 300, 32)
    return gallery_path, _fill(gallery_path, emb, rng), emb


class TestOptions:
    def test_defaults(self):
        o = FloatIndexOptions()
        assert (o.m, o.ef_construction, o.ef_search, o.threads) == (32, 200, 128, 1)

    @pytest.mark.parametrize("kwargs, match", [
        ({"m": 1}, r"m must be an integer in \[2, 256\], got 1"),
        ({"m": True}, "m must be an integer"),
        ({"ef_search": 0}, "ef_search must be"),
        ({"ef_search": 2.5}, "ef_search must be"),
        ({"threads": 0}, "threads must be"),
        ({"m": 64, "ef_construction": 32}, r"ef_construction \(32\) must be >= m \(64\)"),
    ])
    def test_rejects(self, kwargs, match):
        with pytest.raises(InvalidInputError, match=match):
            FloatIndexOptions(**kwargs)


class TestOracle:
    def test_random_recall_against_exact(self, gallery_path, rng):
        emb = _unit(rng, 3000, 64)
        ids = _fill(gallery_path, emb, rng)
        queries = np.concatenate([_unit(rng, 150, 64), emb[rng.choice(3000, 50, replace=False)]
                                  + 0.05 * _unit(rng, 50, 64)]).astype(np.float32)
        with Gallery.open(gallery_path, readonly=True) as g, FloatIndex.for_gallery(g) as index:
            for k in (1, 5, 10):
                found, sims = index.search(queries, k)
                truth, truth_sims = _exact(queries, emb, ids, k)
                assert found.dtype == np.int64 and sims.dtype == np.float32 and found.shape == (200, k)
                assert _recall(found, truth) >= 0.99
                assert (np.diff(sims, axis=1) <= 0).all()
                hit = found == truth
                np.testing.assert_allclose(sims[hit], truth_sims[hit], atol=1e-5)

    def test_real_ppshituv2_features(self, embeddings_npz, gallery_path, rng):
        if not embeddings_npz.is_file():
            pytest.skip(f"{embeddings_npz} is missing")
        data = np.load(embeddings_npz)
        emb = data["embeddings"]
        assert emb.dtype == np.float32 and emb.shape == (594, 512)
        gallery_rows = np.arange(594) % 3 != 0  # two views of three enrolled, the third queried
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add(binarize(emb[gallery_rows]), [str(v) for v in data["labels"][gallery_rows]],
                        embeddings=emb[gallery_rows], embedding_fingerprint=EMB_FP)
            with FloatIndex.for_gallery(g) as index:
                queries = emb[~gallery_rows]
                for k in (1, 5):
                    found, _ = index.search(queries, k)
                    truth, _ = _exact(queries, emb[gallery_rows], ids, k)
                    assert _recall(found, truth) >= 0.99

    def test_ties_are_ordered_by_id(self, gallery_path, rng):
        base = _unit(rng, 4, 16)
        emb = np.repeat(base, 3, axis=0)  # every vector three times under three ids
        ids = _fill(gallery_path, emb, rng)
        with Gallery.open(gallery_path) as g, FloatIndex.for_gallery(g) as index:
            found, sims = index.search(base[:2], k=3)
        assert found.tolist() == [ids[0:3].tolist(), ids[3:6].tolist()]
        assert (sims == sims[:, :1]).all()
        np.testing.assert_allclose(sims, 1.0, atol=1e-6)

    def test_k_larger_than_size_pads(self, gallery_path, rng):
        emb = _unit(rng, 5, 16)
        ids = _fill(gallery_path, emb, rng)
        with Gallery.open(gallery_path) as g, FloatIndex.for_gallery(g) as index:
            found, sims = index.search(emb[:2], k=8)
        assert found.shape == sims.shape == (2, 8)
        assert sorted(found[0, :5].tolist()) == sorted(ids.tolist()) and found[0, 0] == ids[0]
        assert (found[:, 5:] == -1).all() and np.isnan(sims[:, 5:]).all() and not np.isnan(sims[:, :5]).any()

    def test_empty_gallery_answers_padding(self, gallery_path, tmp_path):
        with Gallery.create(gallery_path, fingerprint=FP) as g, FloatIndex.for_gallery(g) as index:
            assert (index.size, index.dim, index.persisted) == (0, None, False)
            found, sims = index.search(np.ones((3, 7), np.float32), k=4)
            assert index.stale(g) is None
        assert (found == -1).all() and found.shape == (3, 4) and np.isnan(sims).all()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["drinks.gallery"]

    def test_emptied_gallery(self, small):
        path, ids, emb = small
        with Gallery.open(path) as g:
            g.remove(ids.tolist())
            with FloatIndex.for_gallery(g) as index:
                found, _ = index.search(emb[:2], k=3)
        assert index.size == 0 and (found == -1).all()

    def test_no_queries(self, small):
        path, _, _ = small
        with Gallery.open(path) as g, FloatIndex.for_gallery(g) as index:
            found, sims = index.search(np.empty((0, 32), np.float32), k=5)
        assert found.shape == sims.shape == (0, 5) and found.dtype == np.int64 and sims.dtype == np.float32

    def test_queries_are_normalised(self, small):
        path, _, emb = small
        with Gallery.open(path) as g, FloatIndex.for_gallery(g) as index:
            a = index.search(emb[:10], k=5)
            b = index.search(emb[:10] * 7.5, k=5)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], atol=1e-6)


class TestInputs:
    @pytest.mark.parametrize("features, error, match", [
        ([[0.1] * 32], InvalidDtypeError, "float32 numpy array, got list"),
        (np.ones((2, 32), np.float64), InvalidDtypeError, "float32, got float64"),
        (np.ones(32, np.float32), InvalidInputError, r"2-D \(q, d\), got shape \(32,\)"),
        (np.ones((2, 31), np.float32), InvalidInputError, r"32 columns .* got shape \(2, 31\)"),
        (np.full((1, 32), np.nan, np.float32), InvalidInputError, "finite"),
        (np.zeros((2, 32), np.float32), InvalidInputError, r"rows \[0, 1\] are all zero"),
    ])
    def test_bad_features(self, small, features, error, match):
        path, _, _ = small
        with Gallery.open(path) as g, FloatIndex.for_gallery(g) as index:
            with pytest.raises(error, match=match):
                index.search(features, k=3)

    @pytest.mark.parametrize("k", [0, -1, True, 2.0])
    def test_bad_k(self, small, k):
        path, _, emb = small
        with Gallery.open(path) as g, FloatIndex.for_gallery(g) as index:
            with pytest.raises(InvalidInputError, match="k must be an integer >= 1"):
                index.search(emb[:1], k=k)

    def test_closed(self, small):
        path, _, emb = small
        with Gallery.open(path) as g:
            index = FloatIndex.for_gallery(g)
        index.close()
        index.close()
        with pytest.raises(ClosedError, match="closed"):
            index.search(emb[:1], k=1)

    def test_bad_options_type(self, small):
        with Gallery.open(small[0]) as g:
            with pytest.raises(InvalidInputError, match="FloatIndexOptions"):
                FloatIndex.for_gallery(g, options={"m": 16})

    def test_direct_construction_refused(self):
        with pytest.raises(TypeError, match="for_gallery"):
            FloatIndex(None, None, {}, FloatIndexOptions(), None, False, False, None)

    def test_missing_hnswlib_names_the_extra(self, small, monkeypatch):
        monkeypatch.setitem(sys.modules, "hnswlib", None)
        with Gallery.open(small[0]) as g:
            with pytest.raises(BackendUnavailableError, match=r'pip install "edge-shitu\[hnsw\]"'):
                FloatIndex.for_gallery(g)


class TestMissingEmbeddings:
    def test_no_embeddings_at_all(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            g.add(_codes(rng, 4), ["a", "b", "c", "d"])
            with pytest.raises(MissingEmbeddingsError, match="none of its 4 items .*--keep-embeddings"):
                FloatIndex.for_gallery(g)

    def test_some_without(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            g.add(_codes(rng, 3), ["a", "b", "c"], embeddings=_unit(rng, 3, 8), embedding_fingerprint=EMB_FP)
            plain = g.add(_codes(rng, 2), ["d", "e"])
            with pytest.raises(MissingEmbeddingsError, match=rf"\[{plain[0]}, {plain[1]}\].*--keep-embeddings") as info:
                FloatIndex.for_gallery(g)
        assert isinstance(info.value, GalleryError)
        assert sorted(p.name for p in gallery_path.parent.iterdir()) == ["drinks.gallery"]


class TestPersistence:
    def test_saved_then_loaded(self, small):
        path, ids, emb = small
        with Gallery.open(path) as g:
            first = FloatIndex.for_gallery(g)
            assert (first.built, first.persisted, first.path) == (True, True, Path(str(path) + ".hnsw"))
            assert first.build_reason == "no sidecar drinks.gallery.hnsw.json"
            second = FloatIndex.for_gallery(g)
            assert (second.built, second.persisted, second.build_reason) == (False, True, None)
            np.testing.assert_array_equal(first.search(emb[:20], 5)[0], second.search(emb[:20], 5)[0])
        sidecar = json.loads(Path(str(path) + ".hnsw.json").read_text(encoding="utf-8"))
        assert sidecar["gallery_fingerprint"] == FP and sidecar["embedding_fingerprint"] == EMB_FP
        assert (sidecar["count"], sidecar["dim"], sidecar["space"], sidecar["normalized"]) == (300, 32, "ip", True)
        assert (sidecar["m"], sidecar["ef_construction"], sidecar["format_version"]) == (32, 200, 1)
        assert sidecar["index_bytes"] == Path(str(path) + ".hnsw").stat().st_size
        assert isinstance(sidecar["generation"], int)
        assert sorted(p.name for p in path.parent.iterdir()) == ["drinks.gallery", "drinks.gallery.hnsw",
                                                                  "drinks.gallery.hnsw.json"]

    def test_ef_search_needs_no_rebuild_but_m_does(self, small):
        with Gallery.open(small[0]) as g:
            FloatIndex.for_gallery(g)
            assert not FloatIndex.for_gallery(g, options=FloatIndexOptions(ef_search=16)).built
            rebuilt = FloatIndex.for_gallery(g, options=FloatIndexOptions(m=16))
        assert rebuilt.built and rebuilt.build_reason == "m is 16 in the gallery but 32 in the index"

    def test_in_memory_gallery_writes_nothing(self, tmp_path, rng, monkeypatch):
        monkeypatch.chdir(tmp_path)
        emb = _unit(rng, 50, 16)
        with Gallery.create(":memory:", fingerprint=FP) as g:
            ids = g.add(_codes(rng, 50), ["x"] * 50, embeddings=emb, embedding_fingerprint=EMB_FP)
            index = FloatIndex.for_gallery(g, path=tmp_path / "ignored.hnsw")
        assert (index.persisted, index.path, index.built) == (False, None, True)
        assert index.search(emb[7:8], 1)[0][0, 0] == ids[7]
        assert list(tmp_path.iterdir()) == []

    def test_unwritable_location_builds_in_memory(self, small, tmp_path):
        path, ids, emb = small
        with Gallery.open(path) as g:
            index = FloatIndex.for_gallery(g, path=tmp_path / "no such folder" / "x.hnsw")
        assert (index.persisted, index.path, index.built) == (False, None, True)
        assert index.search(emb[3:4], 1)[0][0, 0] == ids[3]

    def test_explicit_path(self, small, tmp_path):
        path, _, _ = small
        target = tmp_path / "elsewhere.hnsw"
        with Gallery.open(path) as g:
            assert FloatIndex.for_gallery(g, path=target).persisted
            assert not FloatIndex.for_gallery(g, path=target).built
        assert Path(str(target) + ".json").is_file()


class TestStaleness:
    def test_add_then_rebuild_finds_new_items(self, small, rng):
        path, _, _ = small
        new = _unit(rng, 10, 32)
        with Gallery.open(path) as g:
            old = FloatIndex.for_gallery(g)
            assert old.stale(g) is None
            assert old.generation == g.generation
            new_ids = g.add(_codes(rng, 10), ["new"] * 10, embeddings=new, embedding_fingerprint=EMB_FP)
            assert old.stale(g) == f"generation is {g.generation} in the gallery but {old.generation} in the index"
            index = FloatIndex.for_gallery(g)
            assert index.built and index.persisted and index.size == 310 and index.stale(g) is None
            found, _ = index.search(new, k=1)
        assert found[:, 0].tolist() == new_ids.tolist()

    def test_remove_then_rebuild_excludes_them(self, small):
        path, ids, emb = small
        gone = ids[::3]
        with Gallery.open(path) as g:
            FloatIndex.for_gallery(g)
            g.remove(gone.tolist())
            index = FloatIndex.for_gallery(g)
            assert index.built and index.size == 300 - gone.size
            found, _ = index.search(emb, k=10)
        assert not np.isin(found, gone).any()
        assert (found[1::3, 0] == ids[1::3]).all()

    def test_remove_and_readd_same_count(self, small, rng):
        """Same count, other ids: caught by the generation and by the digest of the ids."""
        path, ids, _ = small
        with Gallery.open(path) as g:
            index = FloatIndex.for_gallery(g)
            g.remove([int(ids[0])])
            g.add(_codes(rng, 1), ["z"], embeddings=_unit(rng, 1, 32), embedding_fingerprint=EMB_FP)
            assert index.stale(g) is not None
            assert FloatIndex.for_gallery(g).built

    def test_another_process_sees_the_change(self, small, rng):
        path, _, _ = small
        with Gallery.open(path, readonly=True) as reader:
            index = FloatIndex.for_gallery(reader)
            with Gallery.open(path) as writer:
                writer.add(_codes(rng, 1), ["z"], embeddings=_unit(rng, 1, 32), embedding_fingerprint=EMB_FP)
            assert index.stale(reader) is not None

    @pytest.mark.parametrize("edit, reason", [
        (lambda s: {**s, "gallery_fingerprint": "feedbeef"}, "gallery_fingerprint is '0123abcd' in the gallery"),
        (lambda s: {**s, "embedding_fingerprint": "feedbeef"}, "embedding_fingerprint"),
        (lambda s: {**s, "count": 299}, "count is 300 in the gallery but 299"),
        (lambda s: {**s, "format_version": 99}, "version 99"),
        (lambda s: {**s, "ids_sha256": "0" * 64}, "other item ids"),
        (lambda s: [s], "not a JSON object"),
    ])
    def test_tampered_sidecar_rebuilds(self, small, edit, reason):
        path, ids, emb = small
        sidecar = Path(str(path) + ".hnsw.json")
        with Gallery.open(path) as g:
            FloatIndex.for_gallery(g)
            sidecar.write_text(json.dumps(edit(json.loads(sidecar.read_text(encoding="utf-8")))), encoding="utf-8")
            index = FloatIndex.for_gallery(g)
            assert index.built and reason in index.build_reason and index.persisted
            assert not FloatIndex.for_gallery(g).built
        assert index.search(emb[:5], 1)[0][:, 0].tolist() == ids[:5].tolist()

    def test_unreadable_sidecar_rebuilds(self, small):
        path, _, _ = small
        sidecar = Path(str(path) + ".hnsw.json")
        with Gallery.open(path) as g:
            FloatIndex.for_gallery(g)
            sidecar.write_bytes(b"\xff{not json")
            index = FloatIndex.for_gallery(g)
        assert index.built and "unreadable" in index.build_reason

    @pytest.mark.parametrize("damage", ["flip", "truncate", "garbage-with-matching-sidecar", "missing"])
    def test_corrupt_index_file_rebuilds(self, small, damage):
        path, ids, emb = small
        index_file = Path(str(path) + ".hnsw")
        sidecar = Path(str(path) + ".hnsw.json")
        with Gallery.open(path) as g:
            FloatIndex.for_gallery(g)
            data = bytearray(index_file.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0xFF
                index_file.write_bytes(bytes(data))
            elif damage == "truncate":
                index_file.write_bytes(bytes(data[: len(data) // 3]))
            elif damage == "missing":
                index_file.unlink()
            else:
                # A file whose sha256 the sidecar vouches for but hnswlib rejects: still a rebuild, not a crash.
                import hashlib

                junk = b"garbage" * 100
                index_file.write_bytes(junk)
                record = json.loads(sidecar.read_text(encoding="utf-8"))
                record.update(index_bytes=len(junk), index_sha256=hashlib.sha256(junk).hexdigest())
                sidecar.write_text(json.dumps(record), encoding="utf-8")
            index = FloatIndex.for_gallery(g)
            assert index.built and index.persisted
            assert ("hnswlib cannot load" if damage.startswith("garbage") else
                    "unreadable" if damage == "missing" else "changed or damaged") in index.build_reason
            assert not FloatIndex.for_gallery(g).built
        assert index.search(emb[:5], 1)[0][:, 0].tolist() == ids[:5].tolist()

    def test_crash_between_index_and_sidecar(self, small, rng, monkeypatch):
        path, _, _ = small
        real_replace = os.replace

        def replace_failing_on_sidecar(src, dst):
            if str(dst).endswith(".hnsw.json"):
                raise OSError("simulated crash before the sidecar was renamed")
            real_replace(src, dst)

        new = _unit(rng, 5, 32)
        with Gallery.open(path) as g:
            FloatIndex.for_gallery(g)
            new_ids = g.add(_codes(rng, 5), ["n"] * 5, embeddings=new, embedding_fingerprint=EMB_FP)
            monkeypatch.setattr(os, "replace", replace_failing_on_sidecar)
            during = FloatIndex.for_gallery(g)
            monkeypatch.setattr(os, "replace", real_replace)
            # On disk now: the new .hnsw beside the old sidecar, which does not describe it.
            assert (during.built, during.persisted) == (True, False)
            assert during.search(new, 1)[0][:, 0].tolist() == new_ids.tolist()
            after = FloatIndex.for_gallery(g)
            assert after.built and after.persisted
            assert after.search(new, 1)[0][:, 0].tolist() == new_ids.tolist()
            assert not FloatIndex.for_gallery(g).built
        assert sorted(p.name for p in path.parent.iterdir()) == ["drinks.gallery", "drinks.gallery.hnsw",
                                                                  "drinks.gallery.hnsw.json"]


def test_bench_short_run_writes_json_and_markdown(tmp_path, capsys):
    from edge_shitu_bench import float_index as bench

    code = bench.main(["--sizes", "300", "--dim", "16", "--queries", "20", "--centres", "10", "--efs", "8,64",
                       "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "float_index.json").read_text(encoding="utf-8"))
    (entry,) = result["sizes"]
    assert entry["size"] == 300 and [r["ef_search"] for r in entry["by_ef"]] == [8, 64]
    assert entry["by_ef"][1]["recall_at_1"] >= 0.99 and entry["smallest_ef_reaching_target"] in (8, 64)
    assert "| 300 |" in (tmp_path / "float_index.md").read_text(encoding="utf-8") and "recall@1" in capsys.readouterr().out
    assert bench.main(["--sizes", "300", "--efs", "2", "--out", str(tmp_path)]) == 1


def test_gallery_check_reports_the_state_of_the_float_index(small, capsys):
    from edge_shitu.cli import main
    from edge_shitu.float_index import index_status

    gallery_path = small[0]
    rng = np.random.default_rng(5)
    with Gallery.open(gallery_path) as g:
        assert index_status(g) is None  # no index built yet
        FloatIndex.for_gallery(g).close()
        path, why = index_status(g)
        assert path == Path(str(gallery_path) + ".hnsw") and why is None
    assert main(["gallery", "check", str(gallery_path)]) == 0
    assert f"float index {gallery_path}.hnsw: up to date" in capsys.readouterr().out
    with Gallery.open(gallery_path) as g:
        g.add(_codes(rng, 1), ["new"], embeddings=_unit(rng, 1, 32), embedding_fingerprint=EMB_FP)
        assert "generation" in index_status(g)[1]
    assert main(["gallery", "check", str(gallery_path), "--json"]) == 0  # a cache out of date is not damage
    record = json.loads(capsys.readouterr().out)
    assert record["ok"] and record["float_index"]["current"] is False and "generation" in record["float_index"]["why"]
    with Gallery.open(gallery_path) as g:
        FloatIndex.for_gallery(g).close()  # rebuilt
        assert index_status(g)[1] is None
        index_file = Path(str(gallery_path) + ".hnsw")
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index_file.write_bytes(bytes(data))
        assert "changed or damaged" in index_status(g)[1]
    assert main(["gallery", "check", str(gallery_path)]) == 0
    assert "out of date, rebuilt when next used: index file" in capsys.readouterr().out
