"""Galleries with compact features, continued (issue 16): calibrating ``min_similarity`` (against an oracle made of
real gallery searches), adding or dropping compact features of an existing gallery from its stored embeddings (one
transaction, crash-safe), and the commands that do both."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_shitu import gallery as gallery_module
from edge_shitu.calibration import (
    SIMILARITY_STEP,
    CalibrationOptions,
    calibrate,
    calibrate_gallery,
    calibrate_similarity,
    store_threshold,
)
from edge_shitu.cli import main
from edge_shitu.codes import binarize
from edge_shitu.compact import compress
from edge_shitu.errors import GalleryCorruptError, GalleryError, InvalidInputError, MissingEmbeddingsError
from edge_shitu.gallery import Gallery

FP = "ab" * 16
EFP = "cd" * 16


@pytest.fixture(scope="module")
def drink(embeddings_npz):
    data = np.load(embeddings_npz)
    return data["embeddings"].astype(np.float32), [str(v) for v in data["labels"]]


def _small_set(drink, n_labels=8, per_label=5, seed=3):
    """Items of a few real labels, plus an exact duplicate of one item under another label (identical code and
    compact feature: a conflict, and ties in both orders)."""
    feats, labels = drink
    lab = np.array(labels)
    rng = np.random.default_rng(seed)
    names = [n for n in dict.fromkeys(labels) if (lab == n).sum() >= per_label]
    chosen = rng.choice(len(names), n_labels, replace=False)
    rows, out_labels = [], []
    for c in chosen:
        where = np.flatnonzero(lab == names[c])[:per_label]
        rows.extend(where.tolist())
        out_labels.extend([names[c]] * len(where))
    items = feats[rows]
    items = np.concatenate([items, items[:1]])
    out_labels.append(out_labels[-1] if out_labels[-1] != out_labels[0] else out_labels[1])
    return items, out_labels


def _search_oracle(items, labels, ids, shortlist):
    """Slow and obvious: for every item, real gallery searches of the gallery without it (known) and without its
    label (unknown), with its compact feature as the query; returns (best label, similarity) of each."""
    vectors = compress(items, "int8")
    queries = vectors.dequantize()
    codes = binarize(items)
    lab = np.array(labels)
    known, unknown = [], []
    for i in range(len(items)):
        for keep, out in ((np.arange(len(items)) != i, known), (lab != lab[i], unknown)):
            with Gallery.create(":memory:", fingerprint=FP, compact="int8") as g:
                g.add(codes[keep], list(lab[keep]), ids=ids[keep], features=items[keep])
                found = g.search(codes[i], k=1, features=queries[i], shortlist=shortlist)
            out.append((g_label(lab, ids, int(found.ids[0, 0])), float(found.similarities[0, 0])))
    return known, unknown


def g_label(lab, ids, item_id):
    return str(lab[list(ids).index(item_id)])


@pytest.mark.parametrize("shortlist", [1, 4, 16])
def test_similarity_calibration_matches_real_searches(drink, shortlist):
    items, labels = _small_set(drink)
    ids = np.arange(100, 100 + 3 * len(items), 3)
    known, unknown = _search_oracle(items, labels, ids, shortlist)
    result = calibrate_similarity(ids, binarize(items), labels, compress(items, "int8"), shortlist=shortlist,
                                  options=CalibrationOptions(target_precision=0.9))
    lab = np.array(labels)
    has_pair = np.array([(lab == x).sum() >= 2 for x in lab])
    grid = result.thresholds
    assert result.metric == "similarity" and result.shortlist == shortlist
    assert grid[0] == -1.0 and grid[-1] == 1.0 and np.allclose(np.diff(grid), SIMILARITY_STEP)
    for i, s in enumerate(grid):
        correct = sum(1 for j, (b, sim) in enumerate(known) if has_pair[j] and b == lab[j] and sim >= s)
        wrong = sum(1 for j, (b, sim) in enumerate(known) if has_pair[j] and b != lab[j] and sim >= s)
        false = sum(1 for b, sim in unknown if sim >= s)
        assert (result.correct[i], result.wrong[i], result.unknown[i]) == (correct, wrong, false), s
    accepted = result.correct + result.wrong + result.unknown
    good = [s for i, s in enumerate(grid) if accepted[i] and result.correct[i] / accepted[i] >= 0.9]
    assert result.threshold == (min(good) if good else None)
    assert result.known_queries == int(has_pair.sum()) and result.unknown_queries == len(items)
    # The duplicate under another label is found as a conflict (identical codes), both ways.
    assert {tuple(c) for c in result.conflicts.tolist()} >= {(int(ids[0]), int(ids[-1])), (int(ids[-1]), int(ids[0]))}


def test_ids_out_of_order_give_the_same_curve(drink):
    items, labels = _small_set(drink, n_labels=5, per_label=4)
    ids = np.arange(len(items))
    order = np.random.default_rng(0).permutation(len(items))
    vectors = compress(items, "fp16")
    a = calibrate_similarity(ids, binarize(items), labels, vectors)
    b = calibrate_similarity(ids[order], binarize(items)[order], [labels[i] for i in order], vectors.take(order))
    assert a.threshold == b.threshold and (a.correct == b.correct).all() and (a.unknown == b.unknown).all()


def test_similarity_calibration_refuses_bad_input(drink):
    items, labels = _small_set(drink, n_labels=3, per_label=3)
    codes, vectors, ids = binarize(items), compress(items, "int8"), np.arange(len(items))
    with pytest.raises(InvalidInputError, match="shortlist"):
        calibrate_similarity(ids, codes, labels, vectors, shortlist=0)
    with pytest.raises(InvalidInputError, match="one row per code"):
        calibrate_similarity(ids, codes, labels, vectors.take(np.arange(3)))
    with pytest.raises(InvalidInputError, match="CompactVectors"):
        calibrate_similarity(ids, codes, labels, items)
    with pytest.raises(InvalidInputError, match="at least two labels"):
        calibrate_similarity(ids[:3], codes[:3], labels[:3], vectors.take(np.arange(3)))
    result = calibrate_similarity(ids, codes, labels, vectors)
    with pytest.raises(InvalidInputError, match="multiple of"):
        result.point(0.5001)
    assert result.point(0.5).threshold == 0.5


def test_similarity_beats_the_radius_at_the_same_precision_on_the_real_features(drink):
    """On dev.npz, accepting re-ranked matches by similarity keeps 0.95 precision at a higher recall than accepting
    Hamming matches by radius (the figures of docs/benchmarks.md)."""
    feats, labels = drink
    with Gallery.create(":memory:", fingerprint=FP, compact="int8") as g:
        g.add(binarize(feats), labels, features=feats)
        by_similarity = calibrate_gallery(g)
        ids, codes = g.codes()
    by_radius = calibrate(ids, codes, labels)
    assert by_similarity.metric == "similarity" and by_radius.metric == "distance"
    # The radius figure is recomputed by a slow oracle in test_calibration; the similarity curve is checked
    # against real searches above. Here: the claim of docs/benchmarks.md, at the same target precision.
    assert (by_radius.threshold, round(by_radius.chosen.recall, 4)) == (136, 0.7720)
    assert by_similarity.chosen.precision >= 0.95
    assert by_similarity.chosen.recall > by_radius.chosen.recall + 0.05


def test_stored_threshold_follows_the_metric(drink, tmp_path):
    items, labels = _small_set(drink)
    with Gallery.create(tmp_path / "g.db", fingerprint=FP, compact="int8") as g:
        g.add(binarize(items), labels, features=items)
        result = calibrate_gallery(g, options=CalibrationOptions(target_precision=0.5), store=True)
        assert result.threshold is not None and g.min_similarity == result.threshold and g.max_distance is None
        ids, codes = g.codes()
        with pytest.raises(InvalidInputError, match="distance calibration does not apply"):
            store_threshold(g, calibrate(ids, codes, labels))
    with Gallery.create(":memory:", fingerprint=FP) as plain:
        with pytest.raises(InvalidInputError, match="similarity calibration does not apply"):
            store_threshold(plain, result)
    with Gallery.create(":memory:", fingerprint=FP, compact="int8") as empty:
        with pytest.raises(InvalidInputError, match="empty"):
            calibrate_gallery(empty)


# ------------------------------------------------------------------------------------------ set_compact


def _with_embeddings(path, items, labels):
    g = Gallery.create(path, fingerprint=FP)
    g.add(binarize(items), labels, embeddings=items, embedding_fingerprint=EFP)
    return g


def _content(path):
    """Everything a gallery holds, table by table (file bytes may differ after a rolled-back transaction)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_set_compact_equals_a_gallery_built_with_compact(drink, tmp_path, fmt):
    items, labels = _small_set(drink)
    queries = items[::3] + 0.01
    with _with_embeddings(tmp_path / "up.db", items, labels) as up, \
            Gallery.create(tmp_path / "built.db", fingerprint=FP, compact=fmt) as built:
        built.add(binarize(items), labels, features=items)
        generation = up.generation
        assert up.set_compact(fmt) == len(items)
        assert up.compact == fmt and up.generation == generation  # the items did not change: float index stays
        a = up.search(binarize(queries), k=5, features=queries)
        b = built.search(binarize(queries), k=5, features=queries)
        assert (a.ids == b.ids).all() and np.array_equal(a.similarities, b.similarities)
    assert _content(tmp_path / "up.db")["compact"] == _content(tmp_path / "built.db")["compact"]
    # Another handle, and a fresh open, see the same compact features.
    with Gallery.open(tmp_path / "up.db", readonly=True) as again:
        c = again.search(binarize(queries), k=5, features=queries)
        assert (c.ids == a.ids).all() and again.check() == []


def test_set_compact_changes_and_drops_the_form_and_clears_the_threshold(drink, tmp_path):
    items, labels = _small_set(drink)
    path = tmp_path / "g.db"
    with _with_embeddings(path, items, labels) as g:
        g.set_compact("int8")
        g.set_min_similarity(0.7)
        g.set_compact("int8")  # the same form again: the threshold still holds
        assert g.min_similarity == 0.7
        g.set_compact("fp16")
        assert g.compact == "fp16" and g.min_similarity is None
        assert g.set_compact(None) == 0
        assert g.compact is None and g.info().compact is None
        with pytest.raises(InvalidInputError, match="no compact features"):
            g.search(binarize(items[:1]), features=items[:1])
        with pytest.raises(InvalidInputError, match="compact must be one of"):
            g.set_compact("int4")
    assert "compact" not in _content(path) and Gallery.open(path).check() == []


def test_set_compact_on_an_empty_gallery_then_add(drink, tmp_path):
    items, labels = _small_set(drink, n_labels=2, per_label=2)
    items, labels = items[:-1], labels[:-1]  # without the duplicate: every item finds itself first
    with Gallery.create(tmp_path / "g.db", fingerprint=FP) as g:
        assert g.set_compact("int8") == 0 and g.compact == "int8"
        g.add(binarize(items), labels, features=items)
        assert g.search(binarize(items), k=1, features=items).ids[:, 0].tolist() == g.ids().tolist()[:len(items)]
        assert g.check() == []


def test_set_compact_refuses_what_it_cannot_do_and_changes_nothing(drink, tmp_path):
    items, labels = _small_set(drink, n_labels=3, per_label=3)
    path = tmp_path / "codes.db"
    with Gallery.create(path, fingerprint=FP) as g:
        g.add(binarize(items), labels)
    before = _content(path)
    with Gallery.open(path) as g, pytest.raises(MissingEmbeddingsError, match="no stored float embedding"):
        g.set_compact("int8")
    with Gallery.open(path, readonly=True) as g, pytest.raises(GalleryError, match="read-only"):
        g.set_compact("int8")
    assert _content(path) == before

    damaged = tmp_path / "damaged.db"
    _with_embeddings(damaged, items, labels).close()
    with sqlite3.connect(damaged) as conn:
        conn.execute("UPDATE items SET embedding = ? WHERE id = (SELECT max(id) FROM items)",
                     (np.full(512, np.nan, "<f4").tobytes(),))
    before = _content(damaged)
    with Gallery.open(damaged) as g, pytest.raises(GalleryCorruptError, match="NaN"):
        g.set_compact("int8")
    assert _content(damaged) == before


def test_a_failure_in_the_middle_leaves_the_gallery_as_it_was(drink, tmp_path, monkeypatch):
    items, labels = _small_set(drink)
    path = tmp_path / "g.db"
    _with_embeddings(path, items, labels).close()
    before = _content(path)
    calls = []
    real = gallery_module.compress

    def failing(emb, fmt):
        calls.append(len(emb))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(emb, fmt)

    monkeypatch.setattr(gallery_module, "_VECTOR_CHUNK", 5)
    monkeypatch.setattr(gallery_module, "compress", failing)
    with Gallery.open(path) as g, pytest.raises(OSError, match="No space"):
        g.set_compact("int8")
    assert len(calls) == 3 and _content(path) == before
    with Gallery.open(path) as g:
        assert g.compact is None and g.check() == []


def test_sigkill_in_the_middle_leaves_the_gallery_as_it_was(drink, tmp_path):
    items, labels = _small_set(drink)
    path = tmp_path / "g.db"
    _with_embeddings(path, items, labels).close()
    before = _content(path)
    child = textwrap.dedent(f"""
        import os, signal
        from edge_shitu import gallery as m
        from edge_shitu.gallery import Gallery
        real, calls = m.compress, []
        def dying(emb, fmt):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(emb, fmt)
        m._VECTOR_CHUNK, m.compress = 5, dying
        g = Gallery.open({str(path)!r})
        g._conn.execute("PRAGMA cache_size = 1")  # spill pages into the file before the commit
        g.set_compact("int8")
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with Gallery.open(path) as g:  # a writable open rolls the journal back
        assert g.compact is None and g.check() == [] and len(g) == len(items)
    assert _content(path) == before


# ------------------------------------------------------------------------------------------ commands


def test_compact_and_calibrate_commands(drink, tmp_path, capsys):
    feats, labels = drink
    path = tmp_path / "g.db"
    _with_embeddings(path, feats, labels).close()
    assert main(["gallery", "compact", str(path), "int8"]) == 0
    out = capsys.readouterr().out
    assert f"{len(feats)} item(s) now keep int8 compact features (516 B each)" in out
    assert main(["gallery", "compact", str(path), "int8"]) == 0
    assert "already keeps int8" in capsys.readouterr().out

    # What the command prints and stores is the API's calibration of the same items.
    ids, codes, vectors = Gallery.open(path, readonly=True).compact_features()
    want = calibrate_similarity(ids, codes, labels, vectors).chosen
    assert main(["gallery", "calibrate", str(path), "--json", "--dry-run"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metric"] == "similarity" and record["shortlist"] == 16 and record["stored"] is False
    assert record["chosen"]["min_similarity"] == want.threshold and record["min_similarity"] is None
    assert len(record["curve"]) == 401 and record["curve"][0]["min_similarity"] == -1.0
    assert main(["gallery", "calibrate", str(path)]) == 0
    text = capsys.readouterr().out
    assert "re-ranked search (Hamming top-16 by compact features)" in text
    assert (f"target precision 0.95: min_similarity {want.threshold:.3f} (precision {want.precision:.4f}, "
            f"recall {want.recall:.4f}") in text
    assert f"the recogniser uses min_similarity {want.threshold:.3f} unless --min-similarity is given" in text
    assert "  min_similarity  precision" in text and f"           {want.threshold:.3f}* " in text
    with Gallery.open(path, readonly=True) as g:
        assert g.min_similarity == want.threshold

    assert main(["gallery", "compact", str(path), "none"]) == 0
    assert "accepts by max_distance again" in capsys.readouterr().out
    assert main(["gallery", "calibrate", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metric"] == "distance" and record["max_distance"] == 136 and len(record["curve"]) == 513


def test_compact_command_errors_are_one_line(drink, tmp_path, capsys):
    items, labels = _small_set(drink, n_labels=2, per_label=2)
    path = tmp_path / "codes.db"
    with Gallery.create(path, fingerprint=FP) as g:
        g.add(binarize(items), labels)
    assert main(["gallery", "compact", str(path), "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no stored float embedding" in err and str(path) in err
    assert main(["gallery", "compact", str(tmp_path / "nosuch.db"), "int8"]) == 2
    assert "nosuch.db" in capsys.readouterr().err
    assert main(["gallery", "compact", str(path), "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
