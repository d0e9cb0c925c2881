"""Tests of edge_shitu.gallery: persistence, stable ids, atomic changes, damaged files, crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_shitu.codes import binarize
from edge_shitu.errors import (
    FingerprintMismatchError,
    GalleryCorruptError,
    GalleryError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
)
from edge_shitu.gallery import FORMAT_VERSION, Gallery, GalleryInfo, GalleryItem, check_gallery
from edge_shitu_converters.gallery_upgrade import upgrade_gallery
from edge_shitu.search import available_backends

# faiss where installed and sound (tests/test_search.py checks that it is on x86_64 and why not elsewhere).
BACKENDS = [b for b in ("numpy", "faiss") if b in available_backends()]

FP = "0123abcd"
EMB_FP = "e1e2e3e4"  # identity of the (imaginary) extractor of the test embeddings
OTHER_FP = "feedbeef"


def _codes(rng: np.random.Generator, n: int, nbytes: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)


def _slow_distances(queries, codes):
    """Hamming distances by unpacking every bit: int64 (n, m)."""
    return np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=-1).sum(axis=-1, dtype=np.int64)


def _oracle_search(queries, codes, ids, k, max_distance=None):
    """Pure-Python search: sort (distance, id) pairs; k is capped at the gallery's size."""
    k = min(k, len(ids))
    out = []
    for q in queries:
        pairs = sorted(
            (sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, c)), int(i)) for c, i in zip(codes, ids)
        )
        if max_distance is not None:
            pairs = [p for p in pairs if p[0] <= max_distance]
        out.append([i for _, i in pairs[:k]] + [-1] * (k - len(pairs[:k])))
    return out


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


@pytest.fixture
def gallery_path(tmp_path: Path) -> Path:
    return tmp_path / "drinks.gallery"


@pytest.fixture
def filled(gallery_path: Path, rng) -> tuple:
    """A closed gallery file with 30 items (ids 0..29, 3 labels) and its data."""
    codes = _codes(rng, 30)
    labels = [f"label{i % 3}" for i in range(30)]
    with Gallery.create(gallery_path, fingerprint=FP) as g:
        g.add(codes, labels)
    return gallery_path, codes, labels


class TestCreateOpen:
    def test_create_reopen_add_reopen(self, gallery_path, rng):
        expected = {}
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            assert len(g) == 0 and g.bits == 512 and g.nbytes == 64 and g.fingerprint == FP
            assert g.path == gallery_path and not g.readonly and g.max_distance is None
        for round_ in range(3):
            codes = _codes(rng, 7)
            labels = [f"r{round_}-{i}" for i in range(7)]
            with Gallery.open(gallery_path, fingerprint=FP) as g:
                assert len(g) == len(expected)
                ids = g.add(codes, labels, sources=[f"img/{round_}/{i}.jpg" for i in range(7)])
                expected.update({int(i): (lab, c.tobytes()) for i, lab, c in zip(ids, labels, codes)})
            with Gallery.open(gallery_path) as g:
                items = g.items()
                assert [it.id for it in items] == sorted(expected)
                assert {it.id: (it.label, it.code) for it in items} == expected
                all_codes = np.array([np.frombuffer(expected[i][1], np.uint8) for i in sorted(expected)])
                result = g.search(all_codes[:4], k=3)
                assert result.ids.tolist() == _oracle_search(all_codes[:4], all_codes, sorted(expected), 3)
                assert g.check() == []
        with Gallery.open(gallery_path) as g:
            assert g.items(limit=1)[0].source == "img/0/0.jpg"

    def test_awkward_path(self, tmp_path, rng):
        folder = tmp_path / "a b#c?d%20 饮料"
        folder.mkdir()
        path = folder / "g 1.gallery"
        codes = _codes(rng, 3)
        with Gallery.create(str(path), fingerprint=FP) as g:
            g.add(codes, ["x", "y", "z"])
        with Gallery.open(path, readonly=True) as g:
            assert g.search(codes, k=1).ids[:, 0].tolist() == [0, 1, 2]
        assert sorted(p.name for p in folder.iterdir()) == ["g 1.gallery"]

    def test_info(self, filled):
        path, _, _ = filled
        with Gallery.open(path, readonly=True) as g:
            info = g.info()
        assert isinstance(info, GalleryInfo)
        assert (info.path, info.count, info.label_count, info.bits) == (path, 30, 3, 512)
        assert (info.fingerprint, info.format_version, info.max_distance) == (FP, FORMAT_VERSION, None)
        assert info.readonly and info.embedding_dim is None and info.created_by.startswith("edge-shitu ")
        assert 0 < info.file_size <= path.stat().st_size

    def test_meta_table_describes_the_codes(self, filled):
        path, _, _ = filled
        with _raw(path) as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert meta["format_version"] == FORMAT_VERSION and meta["bits"] == "512" and meta["bit_order"] == "big"
        assert meta["metric"] == "hamming" and meta["fingerprint"] == FP and meta["next_id"] == "30"

    def test_existing_file_refused_unless_overwrite(self, filled):
        path, _, _ = filled
        with pytest.raises(GalleryError, match="already exists.*overwrite=True"):
            Gallery.create(path, fingerprint=FP)
        with Gallery.open(path) as g:
            assert len(g) == 30
        with Gallery.create(path, fingerprint=OTHER_FP, bits=64, overwrite=True) as g:
            assert len(g) == 0 and g.bits == 64 and g.fingerprint == OTHER_FP
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    def test_in_memory(self, rng):
        with Gallery.create(":memory:", fingerprint=FP, bits=128) as g:
            assert g.path is None and g.nbytes == 16
            ids = g.add(_codes(rng, 4, 16), list("abcd"))
            assert ids.tolist() == [0, 1, 2, 3] and g.check() == []
        with pytest.raises(InvalidInputError, match="in-memory gallery cannot be reopened"):
            Gallery.open(":memory:")

    def test_create_errors(self, tmp_path):
        with pytest.raises(MissingFileError, match="does not exist"):
            Gallery.create(tmp_path / "nope" / "g.gallery", fingerprint=FP)
        with pytest.raises(GalleryError, match="is a directory"):
            Gallery.create(tmp_path, fingerprint=FP)
        for bits in (0, 12, -8, 8.0, True):
            with pytest.raises(InvalidInputError, match="bits must be a positive multiple of 8"):
                Gallery.create(":memory:", fingerprint=FP, bits=bits)
        for fp in ("", "xyz", 123, "12 34"):
            with pytest.raises(InvalidInputError, match="fingerprint must be a non-empty hex string"):
                Gallery.create(":memory:", fingerprint=fp)

    def test_direct_construction_refused(self):
        with pytest.raises(TypeError, match="Gallery.create"):
            Gallery(None, None, None, None, None, 0, False)

    def test_missing_file(self, tmp_path):
        with pytest.raises(MissingFileError, match="gallery file not found.*absent.gallery"):
            Gallery.open(tmp_path / "absent.gallery")
        assert not (tmp_path / "absent.gallery").exists()


class TestFingerprint:
    def test_mismatch_names_both_and_says_rebuild(self, filled):
        path, _, _ = filled
        with pytest.raises(FingerprintMismatchError, match=f"{FP}.*{OTHER_FP}.*Rebuild"):
            Gallery.open(path, fingerprint=OTHER_FP)

    def test_match_is_case_insensitive(self, filled):
        path, _, _ = filled
        with Gallery.open(path, fingerprint=FP.upper()) as g:
            assert g.fingerprint == FP

    def test_bad_fingerprint_argument(self, filled):
        path, _, _ = filled
        with pytest.raises(InvalidInputError, match="hex string"):
            Gallery.open(path, fingerprint="not-hex")


class TestCorruptFiles:
    def test_garbage_bytes(self, tmp_path, rng):
        path = tmp_path / "garbage.gallery"
        path.write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
        with pytest.raises(GalleryCorruptError, match="garbage.gallery is not a readable edge-shitu gallery"):
            Gallery.open(path)

    def test_empty_file(self, tmp_path):
        path = tmp_path / "empty.gallery"
        path.write_bytes(b"")
        with pytest.raises(GalleryCorruptError, match="empty.gallery: not an edge-shitu gallery"):
            Gallery.open(path)

    def test_foreign_sqlite_database(self, tmp_path):
        path = tmp_path / "foreign.db"
        with _raw(path) as conn:
            conn.execute("CREATE TABLE songs(title TEXT)")
        with pytest.raises(GalleryCorruptError, match=r"foreign.db: not an edge-shitu gallery.*\['items', 'labels', 'meta'\]"):
            Gallery.open(path)

    def test_foreign_tables_with_our_names(self, tmp_path):
        path = tmp_path / "foreign.db"
        with _raw(path) as conn:
            conn.execute("CREATE TABLE meta(key, value)")
            conn.execute("CREATE TABLE items(id, name)")
            conn.execute("CREATE TABLE labels(id, label, count)")
        with pytest.raises(GalleryCorruptError, match="items table lacks the column"):
            Gallery.open(path)

    @pytest.mark.parametrize("fraction", [0.75, 0.3, 0.02])
    def test_truncated_file(self, gallery_path, rng, fraction):
        emb = rng.standard_normal((600, 512)).astype(np.float32)
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            g.add(binarize(emb), ["x"] * 600, embeddings=emb, embedding_fingerprint=EMB_FP)
        data = gallery_path.read_bytes()
        gallery_path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(GalleryCorruptError, match="drinks.gallery"):
            Gallery.open(gallery_path)

    def test_wrong_format_version(self, filled):
        path, _, _ = filled
        with _raw(path) as conn:
            conn.execute("UPDATE meta SET value = '7' WHERE key = 'format_version'")
        with pytest.raises(GalleryCorruptError, match="format_version '7' is not supported"):
            Gallery.open(path)

    @pytest.mark.parametrize(
        "key,value,match",
        [("bits", "500", "multiple of 8"), ("bit_order", "little", "bit_order"), ("metric", "cosine", "metric"),
         ("next_id", "many", "next_id"), ("max_distance", "999", "max_distance")],
    )
    def test_bad_meta(self, filled, key, value, match):
        path, _, _ = filled
        with _raw(path) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        with pytest.raises(GalleryCorruptError, match=match):
            Gallery.open(path)

    def test_missing_meta_key(self, filled):
        path, _, _ = filled
        with _raw(path) as conn:
            conn.execute("DELETE FROM meta WHERE key = 'fingerprint'")
        with pytest.raises(GalleryCorruptError, match=r"lacks \['fingerprint'\]"):
            Gallery.open(path)

    def test_code_of_wrong_length(self, filled):
        path, _, _ = filled
        with _raw(path) as conn:
            conn.execute("UPDATE items SET code = ? WHERE id = 7", (bytes(63),))
        with pytest.raises(GalleryCorruptError, match=r"drinks.gallery: items \[7\].*not 64-byte blobs"):
            Gallery.open(path)

    def test_directory(self, tmp_path):
        with pytest.raises(GalleryCorruptError, match="is a directory"):
            Gallery.open(tmp_path)


class TestAdd:
    def test_auto_ids_and_search(self, rng):
        codes = _codes(rng, 50)
        with Gallery.create(":memory:", fingerprint=FP) as g:
            ids = g.add(codes, [f"l{i}" for i in range(50)])
            assert ids.dtype == np.int64 and ids.tolist() == list(range(50))
            assert len(g) == 50 and 49 in g and 50 not in g and -1 not in g and "x" not in g
            queries = np.concatenate([codes[[3, 17]], _codes(rng, 3)])
            result = g.search(queries, k=6)
            assert result.ids.tolist() == _oracle_search(queries, codes, ids, 6)
            assert result.ids[0, 0] == 3 and result.distances[0, 0] == 0
            np.testing.assert_array_equal(result.distances, np.take_along_axis(
                _slow_distances(queries, codes), result.ids, axis=1))

    def test_explicit_ids_are_keys_not_positions(self, rng):
        codes = _codes(rng, 6)
        ids = [40, 7, 1000, 3, 12, 9]
        with Gallery.create(":memory:", fingerprint=FP) as g:
            assert g.add(codes, list("abcdef"), ids=ids).tolist() == ids
            assert g.ids().tolist() == sorted(ids)
            result = g.search(codes, k=2)
            assert result.ids[:, 0].tolist() == ids
            assert result.ids.tolist() == _oracle_search(codes, codes, ids, 2)
            assert g.labels_of([1000, 3, -1, 5]) == ["c", "d", None, None]
            assert g.add(_codes(rng, 1), ["g"]).tolist() == [1001]

    def test_ties_broken_by_id(self, rng):
        code = _codes(rng, 1)
        with Gallery.create(":memory:", fingerprint=FP) as g:
            g.add(np.repeat(code, 5, axis=0), list("abcde"), ids=[50, 10, 40, 20, 30])
            result = g.search(code, k=3)
            assert result.ids.tolist() == [[10, 20, 30]] and result.distances.tolist() == [[0, 0, 0]]

    def test_k_larger_than_gallery_and_empty_gallery(self, rng):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            empty = g.search(_codes(rng, 2), k=3)
            assert empty.ids.shape == (2, 0) and empty.counts.tolist() == [0, 0]
            g.add(_codes(rng, 2), ["a", "b"])
            result = g.search(_codes(rng, 1), k=4)
            assert result.counts.tolist() == [2] and result.ids.shape == (1, 2) and (result.ids >= 0).all()
            # Any k is safe: it is capped at the gallery's size instead of allocating k columns.
            huge = g.search(_codes(rng, 3), k=10**12)
            assert huge.ids.shape == (3, 2) and huge.counts.tolist() == [2, 2, 2]
            with pytest.raises(InvalidInputError, match="k must be an integer >= 1"):
                g.search(_codes(rng, 1), k=0)

    def test_max_distance_in_search(self, rng):
        codes = _codes(rng, 20)
        with Gallery.create(":memory:", fingerprint=FP) as g:
            ids = g.add(codes, ["a"] * 20)
            query = codes[:1].copy()
            query[0, 0] ^= 0b111
            result = g.search(query, k=5, max_distance=3)
            assert result.ids.tolist() == _oracle_search(query, codes, ids, 5, max_distance=3)
            assert result.ids[0, 0] == 0 and result.distances[0, 0] == 3 and result.counts[0] == 1
            g.set_max_distance(2)
            assert g.search(query, k=1).counts.tolist() == [1]

    def test_embeddings_round_trip(self, gallery_path, rng):
        emb = rng.standard_normal((5, 32))
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add(_codes(rng, 5), list("abcde"), embeddings=emb, embedding_fingerprint=EMB_FP)
            g.add(_codes(rng, 1), ["plain"])
        with Gallery.open(gallery_path, readonly=True) as g:
            got = g.embeddings([ids[3], ids[0], ids[3]])
            assert got.dtype == np.float32 and got.shape == (3, 32)
            np.testing.assert_array_equal(got, emb[[3, 0, 3]].astype(np.float32))
            assert g.embeddings([]).shape == (0, 32)
            assert [it.has_embedding for it in g.items()] == [True] * 5 + [False]
            with pytest.raises(GalleryError, match=r"items \[5\].*no stored embedding"):
                g.embeddings([0, 5])
            with pytest.raises(GalleryError, match=r"unknown ids \[77\]"):
                g.embeddings([77])

    def test_embedding_errors(self, rng):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            g.add(_codes(rng, 2), ["a", "b"], embeddings=np.ones((2, 8), np.float32), embedding_fingerprint=EMB_FP)
            with pytest.raises(InvalidInputError, match="embeddings must have 8 columns"):
                g.add(_codes(rng, 1), ["c"], embeddings=np.ones((1, 16), np.float32), embedding_fingerprint=EMB_FP)
            bad = np.ones((1, 8), np.float32)
            bad[0, 2] = np.nan
            with pytest.raises(InvalidInputError, match="NaN or infinite"):
                g.add(_codes(rng, 1), ["c"], embeddings=bad, embedding_fingerprint=EMB_FP)
            with pytest.raises(InvalidInputError, match="float32 range"):
                g.add(_codes(rng, 1), ["c"], embeddings=np.full((1, 8), 1e300), embedding_fingerprint=EMB_FP)
            with pytest.raises(InvalidDtypeError, match="float array"):
                g.add(_codes(rng, 1), ["c"], embeddings=np.ones((1, 8), np.int32), embedding_fingerprint=EMB_FP)
            with pytest.raises(InvalidInputError, match=r"shape \(1, d\)"):
                g.add(_codes(rng, 1), ["c"], embeddings=np.ones((2, 8), np.float32), embedding_fingerprint=EMB_FP)
            assert len(g) == 2

    def test_bad_codes(self, rng):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            with pytest.raises(InvalidDtypeError, match="uint8"):
                g.add(_codes(rng, 2).astype(np.int16), ["a", "b"])
            with pytest.raises(InvalidInputError, match=r"shape \(n, 64\).*\(2, 32\)"):
                g.add(_codes(rng, 2, 32), ["a", "b"])
            with pytest.raises(InvalidDtypeError, match="uint8"):
                g.search(_codes(rng, 1).astype(np.float32))
            with pytest.raises(InvalidInputError, match=r"shape \(n, 64\)"):
                g.search(_codes(rng, 1, 8))
            with pytest.raises(InvalidInputError, match="k must be"):
                g.search(_codes(rng, 1), k=0)
            assert len(g) == 0

    @pytest.mark.parametrize("label", ["", " cola", "cola ", "co\tla", "co\nla", "a\rb", "nul\x00", 5, None])
    def test_bad_labels(self, rng, label):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            with pytest.raises(InvalidInputError, match=r"labels\[1\]"):
                g.add(_codes(rng, 2), ["ok", label])
            assert len(g) == 0

    def test_label_list_errors(self, rng):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            with pytest.raises(InvalidInputError, match=r"labels must have one entry per code \(2\), got 1"):
                g.add(_codes(rng, 2), ["a"])
            with pytest.raises(InvalidInputError, match="labels must be a sequence"):
                g.add(_codes(rng, 4), "cola")
            with pytest.raises(InvalidInputError, match=r"sources\[0\]"):
                g.add(_codes(rng, 1), ["a"], sources=["x\ty"])
            with pytest.raises(InvalidInputError, match="sources must have one entry per code"):
                g.add(_codes(rng, 1), ["a"], sources=["x", "y"])
            with pytest.raises(InvalidInputError, match=r"ids must be in \[0"):
                g.add(_codes(rng, 1), ["a"], ids=[-3])
            with pytest.raises(InvalidDtypeError, match="ids must be integers"):
                g.add(_codes(rng, 1), ["a"], ids=[1.5])
            with pytest.raises(InvalidInputError, match=r"ids must have one entry per code \(1\), got 2"):
                g.add(_codes(rng, 1), ["a"], ids=[1, 2])
            ok = g.add(_codes(rng, 2), np.array(["numpy", "labels"]), sources=["p/1.jpg", None])
            assert g.labels_of(ok) == ["numpy", "labels"]
            assert g.add(np.zeros((0, 64), np.uint8), []).shape == (0,)
            assert len(g) == 2

    def test_unicode_labels(self, rng):
        with Gallery.create(":memory:", fingerprint=FP) as g:
            ids = g.add(_codes(rng, 2), ["农夫山泉 550ml", "脉动"])
            assert g.labels_of(ids) == ["农夫山泉 550ml", "脉动"]
            assert g.label_counts() == {"农夫山泉 550ml": 1, "脉动": 1}


class TestIdsAndAtomicity:
    def test_ids_never_reused_after_remove(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            assert g.add(_codes(rng, 5), list("abcde")).tolist() == [0, 1, 2, 3, 4]
            assert g.remove([3, 4]) == 2
            assert g.add(_codes(rng, 2), list("fg")).tolist() == [5, 6]
            assert g.remove([5, 6]) == 2
        with Gallery.open(gallery_path) as g:
            assert g.ids().tolist() == [0, 1, 2]
            assert g.add(_codes(rng, 1), ["h"]).tolist() == [7]
            g.remove_label("h")
            assert g.add(_codes(rng, 1), ["i"], ids=[7]).tolist() == [7]
            assert g.add(_codes(rng, 1), ["j"]).tolist() == [8]

    def test_duplicate_ids_rejected_atomically(self, filled, rng):
        path, codes, _ = filled
        with Gallery.open(path) as g:
            before = g.search(codes[:3], k=4)
            with pytest.raises(GalleryError, match=r"already in the gallery: \[5, 29\]"):
                g.add(_codes(rng, 3), ["a", "b", "c"], ids=[100, 29, 5])
            with pytest.raises(GalleryError, match=r"repeat within the batch: \[100\]"):
                g.add(_codes(rng, 3), ["a", "b", "c"], ids=[100, 101, 100])
            assert len(g) == 30 and 100 not in g
            after = g.search(codes[:3], k=4)
            np.testing.assert_array_equal(after.ids, before.ids)
            assert g.add(_codes(rng, 1), ["z"]).tolist() == [30]
        with _raw(path) as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 31

    def test_failure_mid_transaction_rolls_back_file_and_memory(self, filled, rng):
        path, codes, _ = filled
        with _raw(path) as conn:
            conn.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON items WHEN NEW.label_id = "
                "(SELECT id FROM labels WHERE label = 'boom') "
                "BEGIN SELECT RAISE(ABORT, 'boom trigger'); END"
            )
        with Gallery.open(path) as g:
            before = g.search(codes, k=3)
            new = _codes(rng, 10)
            labels = ["fine"] * 10
            labels[6] = "boom"
            with pytest.raises(GalleryError, match="add failed and nothing was changed: boom trigger"):
                g.add(new, labels)
            assert len(g) == 30 and g.ids().tolist() == list(range(30))
            np.testing.assert_array_equal(g.search(codes, k=3).ids, before.ids)
            assert g.search(new[:2], k=1).distances.min() > 0
            assert g.check() == []
            assert g.add(new[:1], ["fine"]).tolist() == [30]
        with _raw(path) as conn:
            assert conn.execute("SELECT count FROM labels WHERE label = 'fine'").fetchone()[0] == 1
            assert conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()[0] == "31"

    def test_remove_unknown_ids_removes_nothing(self, filled):
        path, _, _ = filled
        with Gallery.open(path) as g:
            with pytest.raises(GalleryError, match=r"unknown ids \[30, 999\].*nothing was changed"):
                g.remove([0, 999, 1, 30])
            assert len(g) == 30
            assert g.remove([]) == 0
            assert g.remove(np.array([2, 2, 0])) == 2
            assert g.ids()[:3].tolist() == [1, 3, 4]

    def test_remove_then_search(self, filled):
        path, codes, _ = filled
        with Gallery.open(path) as g:
            g.remove(list(range(0, 30, 2)))
            result = g.search(codes, k=30)
            assert result.counts.tolist() == [15] * 30
            assert set(result.ids.ravel().tolist()) == set(range(1, 30, 2))
            assert result.ids.tolist() == _oracle_search(codes, codes[1::2], range(1, 30, 2), 30)

    def test_remove_label_and_relabel(self, filled):
        path, _, labels = filled
        with Gallery.open(path) as g:
            assert g.label_counts() == {"label0": 10, "label1": 10, "label2": 10}
            assert g.relabel([0, 1, 0], "renamed") == 2
            assert g.labels_of([0, 1, 2]) == ["renamed", "renamed", "label2"]
            assert [it.id for it in g.items(label="renamed")] == [0, 1]
            assert g.remove_label("label1") == 9
            assert g.remove_label("label1") == 0
            assert g.label_counts() == {"label0": 9, "label2": 10, "renamed": 2}
            assert len(g) == 21 and 4 not in g
            with pytest.raises(GalleryError, match=r"unknown ids \[4\]"):
                g.relabel([3, 4], "x")
            with pytest.raises(InvalidInputError, match="label must be non-empty"):
                g.relabel([3], "bad\tlabel")
            with pytest.raises(InvalidInputError, match="label must be a str"):
                g.remove_label(3)
            assert g.labels_of([3]) == ["label0"]
        with Gallery.open(path, readonly=True) as g:
            assert g.label_counts() == {"label0": 9, "label2": 10, "renamed": 2}

    def test_items_paging(self, filled):
        path, codes, labels = filled
        with Gallery.open(path, readonly=True) as g:
            page = g.items(limit=5, offset=10)
            assert [it.id for it in page] == [10, 11, 12, 13, 14]
            assert isinstance(page[0], GalleryItem) and page[0].code == codes[10].tobytes()
            assert page[0].label == labels[10] and page[0].source is None and page[0].added_at > 0
            assert g.items(offset=100) == [] and len(g.items()) == 30
            assert [it.id for it in g.items(label="label1", limit=2)] == [1, 4]
            with pytest.raises(InvalidInputError, match="limit must be an integer >= 0"):
                g.items(limit=-1)

    def test_max_distance_persists(self, filled):
        path, _, _ = filled
        with Gallery.open(path) as g:
            g.set_max_distance(100)
            assert g.max_distance == 100
            with pytest.raises(InvalidInputError, match=r"\[0, 512\]"):
                g.set_max_distance(513)
        with Gallery.open(path) as g:
            assert g.max_distance == 100 and g.info().max_distance == 100
            g.set_max_distance(None)
        with Gallery.open(path) as g:
            assert g.max_distance is None


class TestAccessModes:
    def test_readonly_refuses_writes(self, filled, rng):
        path, codes, _ = filled
        before = path.read_bytes()
        with Gallery.open(path, readonly=True) as g:
            for change in (lambda: g.add(_codes(rng, 1), ["a"]), lambda: g.remove([0]),
                           lambda: g.remove_label("label0"), lambda: g.relabel([0], "b"),
                           lambda: g.set_max_distance(3)):
                with pytest.raises(GalleryError, match="opened read-only"):
                    change()
            assert g.readonly and len(g) == 30 and g.search(codes[:1], k=1).ids[0, 0] == 0
            assert g.check() == []
        assert path.read_bytes() == before

    def test_closed_gallery(self, filled, rng):
        path, _, _ = filled
        g = Gallery.open(path)
        g.close()
        g.close()
        assert g.closed and "closed" in repr(g)
        for op in (lambda: len(g), lambda: g.search(_codes(rng, 1)), lambda: g.add(_codes(rng, 1), ["a"]),
                   lambda: g.remove([0]), lambda: g.items(), lambda: g.info(), lambda: g.check(),
                   lambda: g.labels_of([0]), lambda: g.embeddings([0]), lambda: g.max_distance,
                   lambda: 3 in g, lambda: g.label_counts()):
            with pytest.raises(GalleryError, match="gallery is closed"):
                op()

    def test_changes_by_another_connection_are_seen(self, filled, rng):
        path, codes, _ = filled
        with Gallery.open(path) as a, Gallery.open(path, readonly=True) as b:
            new = _codes(rng, 3)
            ids = a.add(new, ["x", "y", "z"])
            assert len(b) == 33 and b.search(new, k=1).ids[:, 0].tolist() == ids.tolist()
            a.remove([0])
            assert 0 not in b and b.search(codes[:1], k=1).ids[0, 0] != 0
            with Gallery.open(path) as c:
                assert c.add(_codes(rng, 1), ["w"]).tolist() == [33]
            assert a.add(_codes(rng, 1), ["v"]).tolist() == [34]
            assert a.ids().tolist() == list(range(1, 35)) and a.check() == []

    def test_check_reports_damage(self, filled):
        path, _, _ = filled
        with Gallery.open(path) as g:
            assert g.check() == []
            with _raw(path) as conn:
                conn.execute("UPDATE meta SET value = '3' WHERE key = 'next_id'")
                conn.execute("UPDATE labels SET label = '' WHERE label = 'label1'")
                conn.execute("UPDATE labels SET count = count + 1 WHERE label = 'label0'")
                conn.execute("UPDATE items SET label_id = 999 WHERE id = 5")
            problems = g.check()
        assert any("next_id" in p for p in problems)
        assert any("labels are empty or not text" in p for p in problems)
        assert any("refer to a label that does not exist" in p for p in problems)
        assert any("item counts of" in p for p in problems)

    def test_check_reports_bad_codes_added_behind_its_back(self, filled):
        path, _, _ = filled
        with Gallery.open(path) as g:
            with _raw(path) as conn:
                conn.execute("UPDATE items SET code = x'00' WHERE id = 3")
            before = g.search(np.zeros((1, 64), np.uint8), k=30)
            problems = g.check()
            assert any("not 64-byte blobs" in p for p in problems)
            # Readers keep answering from the last whole state and say why they could not reload.
            after = g.search(np.zeros((1, 64), np.uint8), k=30)
            np.testing.assert_array_equal(after.ids, before.ids)
            assert "not 64-byte blobs" in g.stale
            with pytest.raises(GalleryCorruptError, match="not 64-byte blobs"):
                g.add(np.zeros((1, 64), np.uint8), ["x"])
            with _raw(path) as conn:
                conn.execute("UPDATE items SET code = ? WHERE id = 3", (bytes(64),))
            g.search(np.zeros((1, 64), np.uint8))
            assert g.stale is None


def test_real_features_leave_one_out_recall(embeddings_npz):
    """Plain sign-binarised 512-bit Hamming on real PP-ShiTuV2 features: recall@1 ~ 0.960."""
    data = np.load(embeddings_npz)
    features, labels = data["embeddings"], data["labels"]
    codes = binarize(features)
    with Gallery.create(":memory:", fingerprint=FP) as g:
        ids = g.add(codes, labels, embeddings=features, embedding_fingerprint=EMB_FP)
        result = g.search(codes, k=2)
    assert (result.distances[:, 0] == 0).all()
    hits = 0
    for i, row in enumerate(result.ids):
        best = next(int(j) for j in row if j != ids[i])
        hits += labels[best] == labels[i]
    recall = hits / len(labels)
    assert abs(recall - 0.960) <= 0.01
    distances = _slow_distances(codes, codes)
    np.fill_diagonal(distances, 10**6)
    nearest = np.argmin(distances, axis=1)  # the first of equals: ties go to the smaller id
    assert hits == int((labels[nearest] == labels).sum())


# Deterministic content of batch j, shared by the crash-test children and the checks.
_BATCH_SOURCE = """
import numpy as np
EMB_FP = "e1e2e3e4"

def make_batch(j, batch, dim):
    rng = np.random.default_rng(10_000 + j)
    emb = rng.standard_normal((batch, dim)).astype(np.float32)
    codes = np.packbits(emb > 0, axis=1)
    labels = [f"b{j}-{i}" for i in range(batch)]
    return codes, labels, emb
"""
_NS: dict = {}
exec(_BATCH_SOURCE, _NS)
_make_batch = _NS["make_batch"]

_ADD_CHILD = _BATCH_SOURCE + """
import sys
from pathlib import Path
from edge_shitu.gallery import Gallery
path, batch, dim, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
with Gallery.open(path) as g:
    j = len(g) // batch
    while True:
        codes, labels, emb = make_batch(j, batch, dim)
        g.add(codes, labels, embeddings=emb, embedding_fingerprint=EMB_FP)
        marker.write_text(str(j))
        j += 1
"""

_REMOVE_CHILD = """
import sys, time
from pathlib import Path
from edge_shitu.gallery import Gallery
path, groups, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
with Gallery.open(path) as g:
    ids = g.ids()
    for j in range(groups):
        g.remove(ids[ids % groups == j])
        marker.write_text(str(j))
    marker.write_text("done")
    time.sleep(600)
"""


def _run_and_kill(args, marker: Path, delay_s: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=marker.parent)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"child exited early ({proc.returncode}): {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("child made no progress in 60 s")
            time.sleep(0.005)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, proc.returncode


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_crash_while_adding_leaves_whole_batches(tmp_path):
    path = tmp_path / "crash.gallery"
    batch, dim = 400, 512
    Gallery.create(path, fingerprint=FP).close()
    delays = np.random.default_rng(7).uniform(0.0, 0.25, size=3)
    for round_, delay in enumerate(delays):
        marker = tmp_path / f"add-{round_}.txt"
        _run_and_kill([_ADD_CHILD, str(path), str(batch), str(dim), str(marker)], marker, float(delay))
        with Gallery.open(path) as g:
            assert g.check() == []
            n = len(g)
            assert n % batch == 0 and n >= batch * (round_ + 1)
            assert g.ids().tolist() == list(range(n))
            for j in range(n // batch):
                codes, labels, emb = _make_batch(j, batch, dim)
                items = g.items(offset=j * batch, limit=batch)
                assert [it.label for it in items] == labels
                assert b"".join(it.code for it in items) == codes.tobytes()
                np.testing.assert_array_equal(g.embeddings(np.arange(j * batch, (j + 1) * batch)), emb)
            np.testing.assert_array_equal(g.search(codes[:5], k=1).ids[:, 0], np.arange(j * batch, j * batch + 5))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_crash_while_removing_leaves_whole_batches(tmp_path):
    path = tmp_path / "crash.gallery"
    groups, batch, dim = 60, 250, 512
    with Gallery.create(path, fingerprint=FP) as g:
        for j in range(groups):
            codes, labels, emb = _make_batch(j, batch, dim)
            g.add(codes, labels, embeddings=emb, embedding_fingerprint=EMB_FP)
    all_ids = np.arange(groups * batch)
    delays = np.random.default_rng(11).uniform(0.0, 0.15, size=2)
    removed_groups = 0
    for round_, delay in enumerate(delays):
        marker = tmp_path / f"remove-{round_}.txt"
        _run_and_kill([_REMOVE_CHILD, str(path), str(groups), str(marker)], marker, float(delay))
        with Gallery.open(path) as g:
            assert g.check() == []
            ids = g.ids()
            gone = np.setdiff1d(all_ids, ids)
            assert gone.size % batch == 0
            removed_groups = gone.size // batch
            np.testing.assert_array_equal(gone, all_ids[all_ids % groups < removed_groups])
            for j in (0, groups - 1):
                codes, labels, _ = _make_batch(j, batch, dim)
                kept = [it for it in g.items(offset=0, limit=None) if it.id // batch == j]
                for it in kept:
                    assert it.label == labels[it.id % batch] and it.code == codes[it.id % batch].tobytes()
    assert removed_groups >= 1


_BIG_ADD_CHILD = _BATCH_SOURCE + """
import sys
from pathlib import Path
from edge_shitu.gallery import Gallery
path, marker, big = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
with Gallery.open(path) as g:
    for j in range(3):
        codes, labels, _ = make_batch(j, 1000, 512)
        g.add(codes, labels)
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (big, 64), dtype=np.uint8)
    labels = [f"big{i % 997}" for i in range(big)]
    marker.write_text("big add started")
    g.add(codes, labels)
    marker.write_text("big add committed")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_crash_in_the_middle_of_one_large_add(tmp_path):
    """SIGKILL while one 400,000-item transaction is being written: the reopened gallery holds
    exactly the three committed batches, is consistent, and takes new items."""
    path = tmp_path / "big.gallery"
    Gallery.create(path, fingerprint=FP).close()
    marker = tmp_path / "big.txt"
    _run_and_kill([_BIG_ADD_CHILD, str(path), str(marker), "400000"], marker, 0.4)
    assert marker.read_text() == "big add started"  # killed inside the large transaction
    assert check_gallery(path) == []  # rolls the unfinished transaction back, then finds nothing wrong
    with Gallery.open(path) as g:
        assert g.check() == []
        assert len(g) == 3000 and g.ids().tolist() == list(range(3000))
        assert g.label_counts() == {lab: 1 for j in range(3) for lab in _make_batch(j, 1000, 512)[1]}
        for j in range(3):
            codes, labels, _ = _make_batch(j, 1000, 512)
            assert [it.label for it in g.items(offset=j * 1000, limit=1000)] == labels
            np.testing.assert_array_equal(g.codes()[1][j * 1000:(j + 1) * 1000], codes)
        assert g.add(np.zeros((1, 64), np.uint8), ["after"]).tolist() == [3000]


class TestFormat2:
    def test_labels_are_stored_once_with_exact_counts(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add(_codes(rng, 12), [f"l{i % 4}" for i in range(12)])
            assert g.label_counts() == {"l0": 3, "l1": 3, "l2": 3, "l3": 3}
            g.remove(ids[:2])
            g.relabel(ids[2:5], "l0")
            assert g.label_counts() == {"l0": 4, "l1": 2, "l2": 2, "l3": 2}
            assert g.remove_label("l3") == 2
            g.relabel(ids[[5, 9]], "new")
            assert g.label_counts() == {"l0": 4, "l2": 2, "new": 2}
            assert g.info().label_count == 3
            assert g.labels_of([int(ids[5]), int(ids[2]), -1]) == ["new", "l0", None]
            assert g.check() == []
        with _raw(gallery_path) as conn:
            assert conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 3  # emptied labels are gone
            assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'items'"
                                ).fetchone()[0] == 0

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_backends_give_identical_results_through_the_gallery(self, gallery_path, backend, rng):
        base = _codes(rng, 5)
        codes = base[rng.integers(0, 5, 400)]  # many ties
        with Gallery.create(gallery_path, fingerprint=FP, backend=backend) as g:
            assert g.backend == backend
            g.add(codes[:200], ["a"] * 200, ids=np.arange(1000, 1200))
            g.add(codes[200:], ["b"] * 200, ids=np.arange(0, 200))  # below the existing ids
            g.remove(np.arange(1000, 1200, 7))
            ids, stored = g.codes()
            got = g.search(base, k=12)
        assert got.ids.tolist() == _oracle_search(base, stored, ids, 12)
        with Gallery.open(gallery_path, backend="numpy") as a, Gallery.open(gallery_path, backend=backend) as b:
            ra, rb = a.search(codes[:20], k=7, max_distance=40), b.search(codes[:20], k=7, max_distance=40)
            np.testing.assert_array_equal(ra.ids, rb.ids)
            np.testing.assert_array_equal(ra.distances, rb.distances)

    def test_bad_backend_name(self, filled):
        path, _, _ = filled
        with pytest.raises(InvalidInputError, match="unknown Hamming backend"):
            Gallery.open(path, backend="annoy")

    def test_rehash_rewrites_codes_and_fingerprint(self, gallery_path, rng):
        emb = rng.standard_normal((50, 16)).astype(np.float32)
        flip = np.diag(np.where(np.arange(16) % 2 == 0, -1.0, 1.0)).astype(np.float32)
        with Gallery.create(gallery_path, fingerprint=FP, bits=16) as g:
            g.add(np.packbits(emb > 0, axis=1), [f"c{i % 5}" for i in range(50)], embeddings=emb, embedding_fingerprint=EMB_FP)
            g.set_max_distance(3)
            n = g.rehash(lambda e: np.packbits(e @ flip > 0, axis=1), fingerprint=OTHER_FP,
                         embedding_fingerprint=EMB_FP, batch=7)
            assert n == 50 and g.fingerprint == OTHER_FP and g.max_distance is None
            np.testing.assert_array_equal(g.codes()[1], np.packbits(emb @ flip > 0, axis=1))
            assert g.search(np.packbits(emb[:3] @ flip > 0, axis=1), k=1).ids[:, 0].tolist() == [0, 1, 2]
        with pytest.raises(FingerprintMismatchError):
            Gallery.open(gallery_path, fingerprint=FP)
        with Gallery.open(gallery_path, fingerprint=OTHER_FP) as g:
            assert g.check() == []

    def test_rehash_refuses_without_embeddings_and_bad_encoders(self, filled, rng):
        path, _, _ = filled
        with Gallery.open(path) as g:
            with pytest.raises(GalleryError, match="30 of 30 items have no stored float embedding.*--keep-embeddings"):
                g.rehash(lambda e: e, fingerprint=OTHER_FP, embedding_fingerprint=EMB_FP)
            assert g.fingerprint == FP
        emb = rng.standard_normal((4, 64)).astype(np.float32)
        with Gallery.create(":memory:", fingerprint=FP, bits=64) as g:
            g.add(np.packbits(emb > 0, axis=1), ["x"] * 4, embeddings=emb, embedding_fingerprint=EMB_FP)
            with pytest.raises(InvalidInputError, match=r"encode must return uint8 codes of shape \(4, 8\)"):
                g.rehash(lambda e: np.packbits(e > 0, axis=1)[:, :4], fingerprint=OTHER_FP,
                         embedding_fingerprint=EMB_FP)
            assert g.fingerprint == FP

    def test_embeddings_keep_their_extractor(self, gallery_path, rng):
        """Codes and embeddings of one gallery always come from one extractor: adds of another
        extractor's features and re-hashing for another extractor are refused, nothing changes."""
        emb = rng.standard_normal((6, 16)).astype(np.float32)
        codes = np.packbits(emb > 0, axis=1)
        with Gallery.create(gallery_path, fingerprint=FP, bits=16) as g:
            with pytest.raises(InvalidInputError, match="embedding_fingerprint"):
                g.add(codes, ["a"] * 6, embeddings=emb)
            g.add(codes[:3], ["a"] * 3, embeddings=emb[:3], embedding_fingerprint=EMB_FP)
            assert g.info().embedding_fingerprint == EMB_FP
            with pytest.raises(FingerprintMismatchError, match="two models' features"):
                g.add(codes[3:], ["b"] * 3, embeddings=emb[3:], embedding_fingerprint="f00d")
            assert len(g) == 3
            snapshot = bytes(gallery_path.read_bytes())
            with pytest.raises(FingerprintMismatchError, match="made by extractor e1e2e3e4"):
                g.rehash(lambda e: np.packbits(e > 0, axis=1), fingerprint=OTHER_FP, embedding_fingerprint="f00d")
            assert g.fingerprint == FP and gallery_path.read_bytes() == snapshot
            assert g.check_model(lambda e: np.packbits(e > 0, axis=1), fingerprint=FP,
                                 embedding_fingerprint=EMB_FP) == []
            problems = g.check_model(lambda e: np.packbits(-e > 0, axis=1), fingerprint=OTHER_FP,
                                     embedding_fingerprint="f00d")
            assert len(problems) == 3 and "3 of 3 sampled items" in problems[2]

    def test_rehash_of_a_gallery_that_does_not_record_its_extractor(self, gallery_path, rng):
        emb = rng.standard_normal((5, 16)).astype(np.float32)
        with Gallery.create(gallery_path, fingerprint=FP, bits=16) as g:
            g.add(np.packbits(emb > 0, axis=1), ["a"] * 5, embeddings=emb, embedding_fingerprint=EMB_FP)
        with _raw(gallery_path) as conn:  # as written by an edge-shitu that did not record it
            conn.execute("DELETE FROM meta WHERE key = 'embedding_fingerprint'")
        encode = lambda e: np.packbits(e > 0, axis=1)  # noqa: E731
        with Gallery.open(gallery_path) as g:
            assert g.info().embedding_fingerprint is None
            with pytest.raises(FingerprintMismatchError, match="do not record which extractor"):
                g.rehash(encode, fingerprint=OTHER_FP, embedding_fingerprint=EMB_FP, same_extractor=["abcd"])
            assert g.fingerprint == FP
            # Its codes prove the extractor: then it is re-hashed and the extractor recorded.
            g.rehash(encode, fingerprint=OTHER_FP, embedding_fingerprint=EMB_FP, same_extractor=[FP])
            assert g.fingerprint == OTHER_FP and g.info().embedding_fingerprint == EMB_FP

    def test_upgrade_from_format_1(self, tmp_path):
        path = tmp_path / "old.gallery"
        with _raw(path) as conn:
            conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT NOT NULL, code BLOB NOT NULL, "
                         "embedding BLOB NULL, source TEXT NULL, added_at REAL)")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format_version", "1"), ("bits", "64"), ("bit_order", "big"), ("metric", "hamming"),
                ("fingerprint", FP), ("created_by", "edge-shitu 0.0.9"), ("next_id", "12"), ("max_distance", "9"),
                ("embedding_dim", "2")])
            conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", [
                (i, f"drink {i % 2}", bytes([i] * 8), np.array([i, 1], "<f4").tobytes() if i < 3 else None,
                 f"img{i}.jpg", 1700000000.7) for i in (0, 1, 2, 5, 7)])
        with pytest.raises(GalleryError, match="format 1.*edge-shitu gallery upgrade"):
            Gallery.open(path)
        backup = upgrade_gallery(path)
        assert backup.name == "old.gallery.v1.bak" and backup.exists()
        with Gallery.open(path) as g:
            assert g.check() == [] and g.ids().tolist() == [0, 1, 2, 5, 7] and g.max_distance == 9
            assert g.label_counts() == {"drink 0": 2, "drink 1": 3}
            assert [it.source for it in g.items()] == [f"img{i}.jpg" for i in (0, 1, 2, 5, 7)]
            np.testing.assert_array_equal(g.embeddings([2]), [[2.0, 1.0]])
            assert g.add(np.zeros((1, 8), np.uint8), ["x"]).tolist() == [12]
        with pytest.raises(GalleryError, match="not a format-1 gallery"):
            upgrade_gallery(path)


def test_labels_held_in_memory_follow_every_change(tmp_path, rng):
    """The snapshot's label table agrees with the file after adds, removals, relabels and label-id reuse."""
    path = tmp_path / "labels.gallery"
    with Gallery.create(path, fingerprint=FP) as g:
        ids = g.add(_codes(rng, 4), ["a", "b", "c", "可乐"]).tolist()
        g.remove_label("可乐")  # the largest label id goes: a new label takes that id again
        ids += g.add(_codes(rng, 2), ["d", "a"]).tolist()
        g.relabel([ids[0]], "z")
        g.remove([ids[1]])
        expected = {i: lab for i, lab in zip(ids, ["z", None, "c", None, "d", "a"]) if lab is not None}
        kept = list(expected)
        assert g.labels_of(kept) == list(expected.values())
        assert g.labels_of([ids[3], 10**6]) == [None, None]
    with Gallery.open(path, readonly=True) as again:
        assert again.labels_of(kept) == list(expected.values())
        assert {it.id: it.label for it in again.items()} == expected


def test_generation_counts_changes_of_the_items_not_of_the_settings(tmp_path):
    path = tmp_path / "gen.gallery"
    rng = np.random.default_rng(3)
    with Gallery.create(path, fingerprint="ab" * 16) as g:
        assert g.generation == 0
        ids = g.add(rng.integers(0, 256, (3, 64), dtype=np.uint8), ["a", "b", "c"])
        assert g.generation == 1
        g.relabel([int(ids[0])], "z")
        g.remove([int(ids[1])])
        g.remove_label("c")
        assert g.generation == 4
        g.set_max_distance(30)
        g.set_det_threshold(0.4)
        assert g.generation == 4
        with pytest.raises(InvalidInputError):
            g.add(rng.integers(0, 256, (1, 64), dtype=np.uint8), ["bad\tlabel"])
        assert g.generation == 4  # a refused change changes nothing
        with Gallery.open(path, readonly=True) as reader:
            assert reader.generation == 4
            g.add(rng.integers(0, 256, (1, 64), dtype=np.uint8), ["d"])
            assert reader.generation == 5  # another connection's commit is seen
    with Gallery.open(path) as again:
        assert again.generation == 5 and again.check() == []
