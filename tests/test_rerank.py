"""Galleries that keep compact features and re-rank their Hamming shortlist (issue 16): an oracle against slow
obvious code, recall on the real PP-ShiTuV2 drink features, persistence, crash safety, checks and the recogniser."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from edge_shitu.cli import main
from edge_shitu.codes import binarize
from edge_shitu.compact import compress
from edge_shitu.errors import GalleryCorruptError, InvalidDtypeError, InvalidInputError
from edge_shitu.gallery import DEFAULT_SHORTLIST, Gallery, ItemBatch

FP = "ab" * 16


@pytest.fixture(scope="module")
def drink(embeddings_npz):
    data = np.load(embeddings_npz)
    feats = data["embeddings"].astype(np.float32)
    return feats, [str(v) for v in data["labels"]]


def _oracle(codes, vectors, ids, query_codes, query_feats, k, shortlist):
    """Slow and obvious: Hamming to every item, the first `shortlist` by (distance, id), then by descending inner
    product with the dequantised compact features, ties in that Hamming order."""
    items = vectors.dequantize().astype(np.float64)
    bits = np.unpackbits(codes, axis=1).astype(np.int64)
    out_ids, out_sims = [], []
    for qc, qf in zip(query_codes, query_feats):
        qb = np.unpackbits(qc).astype(np.int64)
        dist = [int(np.sum(row != qb)) for row in bits]
        order = sorted(range(len(ids)), key=lambda j: (dist[j], ids[j]))[:max(shortlist, k)]
        q = qf.astype(np.float64) / np.linalg.norm(qf)
        sims = [float(np.float32(items[j] @ q)) for j in order]
        ranked = sorted(range(len(order)), key=lambda r: -sims[r])  # stable: Hamming order breaks ties
        out_ids.append([ids[order[r]] for r in ranked[:k]])
        out_sims.append([sims[r] for r in ranked[:k]])
    return out_ids, out_sims


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
@pytest.mark.parametrize("k, shortlist", [(1, 1), (3, 5), (5, 16), (20, 4), (50, 16)])
def test_reranked_search_matches_the_oracle(fmt, k, shortlist, drink, tmp_path):
    feats, labels = drink
    rng = np.random.default_rng(7)
    chosen = rng.choice(len(feats), 40, replace=False)
    items, queries = feats[chosen[:30]], feats[chosen[30:]]
    items = np.concatenate([items, items[:3]])  # exact duplicates: equal codes and equal similarities
    codes = binarize(items)
    with Gallery.create(tmp_path / "g.db", fingerprint=FP, compact=fmt) as g:
        ids = g.add(codes, [labels[0]] * len(items), features=items)
        found = g.search(binarize(queries), k=k, features=queries, shortlist=shortlist)
    want_ids, want_sims = _oracle(codes, compress(items, fmt), list(ids), binarize(queries), queries, k, shortlist)
    cols = min(k, len(items))
    assert found.ids.shape == (len(queries), cols)
    assert found.ids.tolist() == want_ids
    np.testing.assert_allclose(found.similarities, np.array(want_sims, dtype=np.float32), rtol=0, atol=1e-6)
    hamming = np.unpackbits(codes[np.searchsorted(ids, found.ids)] ^ binarize(queries)[:, None, :], axis=2).sum(2)
    assert (found.distances == hamming).all() and (found.counts == cols).all()


def test_reranking_reaches_float_recall_on_the_real_features(drink, tmp_path):
    feats, labels = drink
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    with Gallery.create(tmp_path / "all.db", fingerprint=FP, compact="int8") as g:
        g.add(binarize(feats), labels, features=feats)
        found = g.search(binarize(feats), k=2, features=feats)
        plain = g.search(binarize(feats), k=2)
    lab = np.array(labels)
    answerable = np.array([(lab == lab[i]).sum() > 1 for i in range(len(lab))])

    def recall(best_other):
        return float(np.mean(lab[best_other][answerable] == lab[answerable]))

    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    float_r1 = recall(np.argmax(sims, axis=1))  # ties: the first index, as the leave-one-out oracle does
    # The query itself comes first (similarity 1 and Hamming 0); the other column is the leave-one-out answer.
    rows = np.arange(len(lab))
    other = np.where(found.ids[:, 0] == rows, found.ids[:, 1], found.ids[:, 0])
    other_plain = np.where(plain.ids[:, 0] == rows, plain.ids[:, 1], plain.ids[:, 0])
    assert recall(other) == pytest.approx(float_r1) == pytest.approx(0.9713, abs=1e-4)
    assert recall(other_plain) < float_r1


def test_compact_features_persist_and_follow_removals(drink, tmp_path):
    feats, labels = drink
    path = tmp_path / "p.db"
    with Gallery.create(path, fingerprint=FP, compact="int8") as g:
        ids = g.add_batches([ItemBatch(binarize(feats[:50]), labels[:50], features=feats[:50]),
                             ItemBatch(binarize(feats[50:80]), labels[50:80], features=feats[50:80])])
        g.remove([int(ids[3])])
        g.remove_label(labels[60])
        before = g.search(binarize(feats[:10]), k=4, features=feats[:10])
        assert g.check() == [] and g.info().compact == "int8"
    with Gallery.open(path, readonly=True) as again:
        after = again.search(binarize(feats[:10]), k=4, features=feats[:10])
        assert after.ids.tolist() == before.ids.tolist()
        assert int(ids[3]) not in after.ids
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM compact").fetchone()[0] == conn.execute(
            "SELECT count(*) FROM items").fetchone()[0]


def test_a_refused_batch_writes_no_compact_feature(drink, tmp_path):
    feats, labels = drink
    path = tmp_path / "r.db"
    with Gallery.create(path, fingerprint=FP, compact="fp16") as g:
        g.add(binarize(feats[:5]), labels[:5], features=feats[:5])

        def batches():
            yield ItemBatch(binarize(feats[5:10]), labels[5:10], features=feats[5:10])
            yield ItemBatch(binarize(feats[10:12]), ["ok", "bad\tlabel"], features=feats[10:12])

        with pytest.raises(InvalidInputError):
            g.add_batches(batches())
        assert len(g) == 5 and g.check() == []


def test_bad_features_are_refused(drink, tmp_path):
    feats, labels = drink
    with Gallery.create(tmp_path / "c.db", fingerprint=FP, compact="int8") as g, \
            Gallery.create(tmp_path / "plain.db", fingerprint=FP) as plain:
        with pytest.raises(InvalidInputError, match="pass features"):
            g.add(binarize(feats[:2]), labels[:2])
        with pytest.raises(InvalidInputError, match="keeps codes only"):
            plain.add(binarize(feats[:2]), labels[:2], features=feats[:2])
        with pytest.raises(InvalidDtypeError):
            g.add(binarize(feats[:2]), labels[:2], features=np.ones((2, 512), dtype=np.int32))
        bad = feats[:2].copy()
        bad[0, 0] = np.nan
        with pytest.raises(InvalidInputError, match="NaN"):
            g.add(binarize(feats[:2]), labels[:2], features=bad)
        g.add(binarize(feats[:2]), labels[:2], features=feats[:2])
        with pytest.raises(InvalidInputError, match="512 columns"):
            g.add(binarize(feats[2:3]), labels[2:3], features=feats[2:3, :100])
        with pytest.raises(InvalidInputError, match="no compact features"):
            plain.search(binarize(feats[:1]), features=feats[:1])
        with pytest.raises(InvalidInputError, match="one row per query"):
            g.search(binarize(feats[:2]), features=feats[:1])
        with pytest.raises(InvalidInputError, match="shortlist"):
            g.search(binarize(feats[:1]), features=feats[:1], shortlist=0)
        with pytest.raises(InvalidInputError, match="compact must be"):
            Gallery.create(tmp_path / "x.db", fingerprint=FP, compact="int4")


def test_empty_compact_gallery_and_defaults(drink, tmp_path):
    feats, _ = drink
    with Gallery.create(":memory:", fingerprint=FP, compact="int8") as g:
        found = g.search(binarize(feats[:3]), k=5, features=feats[:3])
        assert found.ids.shape == (3, 0) and found.counts.tolist() == [0, 0, 0]
        assert g.min_similarity is None
        g.set_min_similarity(0.42)
        assert g.min_similarity == 0.42
        with pytest.raises(InvalidInputError):
            g.set_min_similarity(1.5)
    assert DEFAULT_SHORTLIST == 16


def test_check_reports_missing_and_stray_compact_features(drink, tmp_path):
    feats, labels = drink
    path = tmp_path / "k.db"
    with Gallery.create(path, fingerprint=FP, compact="int8") as g:
        ids = g.add(binarize(feats[:6]), labels[:6], features=feats[:6])
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM compact WHERE item_id = ?", (int(ids[2]),))
        conn.execute("INSERT INTO compact(item_id, vec) VALUES (999, x'00')")
    problems = " ".join(_check(path))
    assert "1 items have no compact feature" in problems and "belong to no item" in problems
    assert "not 516-byte int8 blobs" in problems
    with pytest.raises(GalleryCorruptError, match="compact features do not match"):
        Gallery.open(path)


def _check(path):
    from edge_shitu.gallery import check_gallery

    return check_gallery(path)


def test_recogniser_reranks_and_accepts_by_similarity(tiny_bundle, drink_dir, tmp_path, capsys):
    labels = (drink_dir / "gallery" / "drink_label.txt").read_text(encoding="utf-8").splitlines()[::60]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    db = tmp_path / "c.db"
    assert main(["gallery", "build", "--bundle", str(tiny_bundle), "--images", str(drink_dir / "gallery"),
                 "--labels", str(tmp_path / "labels.txt"), "--out", str(db), "--compact", "int8"]) == 0
    assert main(["gallery", "info", str(db), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["compact"] == "int8" and info["items"] == len(labels)
    photo = str(drink_dir / "gallery" / labels[0].split("\t")[0])

    from edge_shitu.options import RecognizerOptions, WholeImagePolicy
    from edge_shitu.recognizer import Recognizer

    opts = RecognizerOptions(whole_image=WholeImagePolicy.ALWAYS, include_unknown=True)
    with Recognizer.from_bundle(tiny_bundle, db, options=opts) as rec:
        assert rec.reranks and rec.min_similarity == 0.5
        whole = [r for r in rec.recognize(photo).recognitions if r.whole_image][0]
        assert whole.label == labels[0].split("\t")[1] and whole.similarity == pytest.approx(1.0, abs=1e-3)
        sims = [c.similarity for c in whole.candidates]
        assert sims == sorted(sims, reverse=True)
    # The threshold is where acceptance flips: at the best similarity the region is known, just above it unknown.
    for threshold, known in ((whole.similarity, True), (min(1.0, whole.similarity + 1e-4), False)):
        edge = RecognizerOptions(whole_image=WholeImagePolicy.ALWAYS, include_unknown=True, min_similarity=threshold)
        with Recognizer.from_bundle(tiny_bundle, db, options=edge) as rec:
            again = [r for r in rec.recognize(photo).recognitions if r.whole_image][0]
            assert (again.label is not None) is known, threshold
    with Gallery.open(db) as g:
        g.set_min_similarity(0.99)
    with Recognizer.from_bundle(tiny_bundle, db, options=opts) as rec:
        assert rec.min_similarity == 0.99
    with pytest.raises(InvalidInputError):
        RecognizerOptions(min_similarity=2.0)
    # The command line: the same threshold from --min-similarity; a bad value is refused in one line.
    capsys.readouterr()
    for threshold, known in (("0.99", True), ("1.0", whole.similarity >= 1.0)):
        assert main(["recognize", "--bundle", str(tiny_bundle), "--gallery", str(db), "--json", "--whole-image",
                     "always", "--include-unknown", "--min-similarity", threshold, photo]) == 0
        record = json.loads(capsys.readouterr().out)[0]
        assert ([r for r in record["results"] if r["whole_image"]][0]["label"] is not None) is known, threshold
    assert main(["recognize", "--bundle", str(tiny_bundle), "--gallery", str(db), "--min-similarity", "2",
                 photo]) == 2
    assert "expected a number in [-1, 1]" in capsys.readouterr().err
