"""Calibration of max_distance: the curve against a slow obvious implementation, the real PP-ShiTuV2
codes, storing the threshold for the recogniser, edge cases and the ``gallery calibrate`` command."""

from __future__ import annotations

import io
import json
import re
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import FakeDetectorSession, FakeExtractorSession
from edge_shitu import calibration
from edge_shitu import cli
from edge_shitu.bundle import Bundle
from edge_shitu.calibration import CalibrationOptions, calibrate, calibrate_gallery
from edge_shitu.codes import binarize
from edge_shitu.detector import Detector
from edge_shitu.embedder import Embedder
from edge_shitu.errors import InvalidDtypeError, InvalidInputError
from edge_shitu.gallery import Gallery
from edge_shitu.image import crop
from edge_shitu.options import RecognizerOptions
from edge_shitu.recognizer import Recognizer
from edge_shitu.search import hamming_distances

FINGERPRINT = "ab12" * 8
BOX = (96.0, 96.0, 176.0, 160.0)


# ---------------------------------------------------------------- oracle


def _distances_to(codes: np.ndarray, row: int) -> np.ndarray:
    """Bits that differ between code ``row`` and every code, counted on unpacked bits (no XOR, no popcount)."""
    bits = np.unpackbits(codes, axis=1)
    return (bits != bits[row]).sum(axis=1)


def _slow_curve(ids, codes, labels, query_ids, target):
    """The definitions of edge_shitu.calibration, written out one query at a time."""
    bits = 8 * codes.shape[1]
    size = Counter(labels)
    row_of = {int(i): r for r, i in enumerate(ids)}
    known, unknown = [], []
    for q in query_ids:
        r = row_of[int(q)]
        qlabel = labels[r]
        dist = _distances_to(codes, r)
        ranked = sorted((int(dist[j]), int(ids[j]), labels[j]) for j in range(len(ids)) if j != r)
        if size[qlabel] >= 2:
            d, _, label = ranked[0]
            known.append((d, label == qlabel))
        unknown.append(next(d for d, _, label in ranked if label != qlabel))
    curve = {"precision": [], "recall": [], "accept_rate": [], "unknown_accept_rate": [],
             "correct": [], "wrong": [], "unknown": []}
    for t in range(bits + 1):
        correct = sum(1 for d, ok in known if d <= t and ok)
        wrong = sum(1 for d, ok in known if d <= t and not ok)
        unk = sum(1 for d in unknown if d <= t)
        accepted = correct + wrong + unk
        curve["precision"].append(correct / accepted if accepted else float("nan"))
        curve["recall"].append(correct / len(known))
        curve["accept_rate"].append(accepted / (len(known) + len(unknown)))
        curve["unknown_accept_rate"].append(unk / len(unknown))
        curve["correct"].append(correct)
        curve["wrong"].append(wrong)
        curve["unknown"].append(unk)
    return curve, _slow_choice(curve, target), len(known), len(unknown)


def _slow_choice(curve, target):
    """The largest threshold that accepts something with at least the target precision, or None."""
    good = [t for t, p in enumerate(curve["precision"]) if p == p and p >= target]
    return max(good) if good else None


def _slow_best(curve):
    """The largest threshold of highest precision, as CalibrationResult.best_precision defines it."""
    defined = [(p, t) for t, p in enumerate(curve["precision"]) if p == p]
    return max(defined)


def _slow_sample(ids, max_queries, seed):
    """The documented sample: default_rng(seed) draws positions without replacement from the ascending ids."""
    ordered = np.sort(ids)
    if max_queries is None or max_queries >= len(ids):
        return ordered
    return np.sort(ordered[np.random.default_rng(seed).choice(len(ids), size=max_queries, replace=False)])


def _random_gallery(rng, m, nbytes, n_labels):
    # Few bits and near-copies of a few prototypes: many equal distances, so ties matter.
    protos = rng.integers(0, 256, size=(n_labels, nbytes), dtype=np.uint8)
    label_idx = rng.integers(0, n_labels, size=m)
    noise = np.packbits(rng.random((m, 8 * nbytes)) < 0.2, axis=1)
    codes = protos[label_idx] ^ noise
    codes[rng.random(m) < 0.15] = protos[rng.integers(0, n_labels)]  # some items look like another label
    labels = [f"class-{i}" for i in label_idx]
    labels[0] = "lonely"  # a label with one item: an unknown query only
    ids = rng.choice(10 * m, size=m, replace=False).astype(np.int64)  # unsorted, with gaps
    return ids, codes, labels


@pytest.mark.parametrize("m, nbytes, n_labels, max_queries, blocks", [
    (60, 2, 6, None, None),
    (90, 8, 10, None, (7, 5)),     # 64-bit codes; tiny blocks so minima are merged across blocks
    (120, 3, 8, 37, (16, 11)),     # a sample of the queries
])
def test_curve_matches_slow_oracle(rng, monkeypatch, m, nbytes, n_labels, max_queries, blocks):
    if blocks:
        monkeypatch.setattr(calibration, "_BLOCK_ROWS", blocks[0])
        monkeypatch.setattr(calibration, "_BLOCK_COLUMNS", blocks[1])
    ids, codes, labels = _random_gallery(rng, m, nbytes, n_labels)
    for target in (0.5, 0.8, 0.95, 1.0):
        res = calibrate(ids, codes, labels, options=CalibrationOptions(target_precision=target, max_queries=max_queries))
        expected_queries = _slow_sample(ids, max_queries, seed=0)
        assert expected_queries.shape[0] == (m if max_queries is None else max_queries)
        assert res.sampled == (max_queries is not None)
        np.testing.assert_array_equal(res.query_ids, expected_queries)
        curve, chosen, n_known, n_unknown = _slow_curve(ids, codes, labels, expected_queries, target)
        assert (res.known_queries, res.unknown_queries) == (n_known, n_unknown)
        for name, values in curve.items():
            np.testing.assert_allclose(getattr(res, name), values, rtol=0, atol=1e-12, equal_nan=True, err_msg=name)
        assert res.threshold == chosen
        assert res.bits == 8 * nbytes and res.items == m and res.labels == len(set(labels))


def test_ties_are_broken_by_ascending_id():
    # Query q (label A) has a same-label item and an other-label item at the same distance:
    # whichever has the smaller id is its leave-one-out neighbour.
    q = np.array([0b00000000], dtype=np.uint8)
    near = np.array([0b00000001], dtype=np.uint8)
    far = np.array([0b11111111], dtype=np.uint8)
    codes = np.stack([q, near, near, far, far])
    labels = ["A", "A", "B", "B", "C"]
    for same_id, other_id, right in [(5, 9, True), (9, 5, False)]:
        ids = np.array([1, same_id, other_id, 20, 30], dtype=np.int64)
        res = calibrate(ids, codes, labels, options=CalibrationOptions(target_precision=0.1))
        # Every other known query finds an other-label twin at distance 0; item 1's is right at
        # distance 1 exactly when the same-label item wins the tie.
        assert (res.correct[0], res.wrong[0]) == (0, 3)
        assert (res.correct[1], res.wrong[1]) == ((1, 3) if right else (0, 4))
        assert res.known_queries == 4


def test_result_does_not_depend_on_row_order(rng):
    ids, codes, labels = _random_gallery(rng, 80, 4, 7)
    opts = CalibrationOptions(max_queries=30, seed=5)
    a = calibrate(ids, codes, labels, options=opts)
    perm = rng.permutation(80)
    b = calibrate(ids[perm], codes[perm], [labels[i] for i in perm], options=opts)
    np.testing.assert_array_equal(a.query_ids, b.query_ids)
    for name in ("precision", "recall", "correct", "wrong", "unknown"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.threshold == b.threshold
    c = calibrate(ids, codes, labels, options=CalibrationOptions(max_queries=30, seed=6))
    assert not np.array_equal(a.query_ids, c.query_ids), "another seed draws another sample"


def test_conflicts_are_identical_codes_under_two_labels():
    codes = np.array([[1], [1], [2], [2], [200], [200]], dtype=np.uint8)
    labels = ["A", "A", "B", "B", "C", "D"]
    res = calibrate(np.arange(6), codes, labels)
    assert res.conflicts.tolist() == [[4, 5], [5, 4]]
    # C and D have one item each, so they are unknown queries only, and both are accepted at
    # distance 0 beside the four correct A/B queries: precision 1 is impossible.
    assert (res.correct[0], res.wrong[0], res.unknown[0]) == (4, 0, 2)
    assert res.precision[0] == 4 / 6
    assert calibrate(np.arange(6), codes, labels, options=CalibrationOptions(target_precision=1.0)).threshold is None


# ---------------------------------------------------------------- edge cases


def test_too_small_galleries_are_refused():
    with pytest.raises(InvalidInputError, match="0 items with 0 labels.*at least two labels"):
        calibrate(np.zeros(0, np.int64), np.zeros((0, 64), np.uint8), [])
    with pytest.raises(InvalidInputError, match="5 items with 1 labels, of which 1 have two"):
        calibrate(np.arange(5), np.zeros((5, 64), np.uint8), ["a"] * 5)
    with pytest.raises(InvalidInputError, match="of which 1 have two or more"):
        calibrate(np.arange(4), np.zeros((4, 64), np.uint8), ["a", "a", "b", "c"])
    # Two labels with two items each is enough.
    assert calibrate(np.arange(4), np.arange(4, dtype=np.uint8)[:, None], ["a", "a", "b", "b"]).items == 4


@pytest.mark.parametrize("target", [0, -0.1, 1.0001, 2, float("nan"), True, "0.9", None])
def test_target_precision_outside_unit_interval(target):
    with pytest.raises(InvalidInputError, match="target_precision must be a number in \\(0, 1\\]"):
        CalibrationOptions(target_precision=target)


def test_bad_options_and_arguments():
    with pytest.raises(InvalidInputError, match="max_queries must be an integer >= 1"):
        CalibrationOptions(max_queries=0)
    with pytest.raises(InvalidInputError, match="seed must be an integer >= 0"):
        CalibrationOptions(seed=-1)
    codes = np.zeros((4, 8), np.uint8)
    labels = ["a", "a", "b", "b"]
    with pytest.raises(InvalidDtypeError, match="codes must have dtype uint8"):
        calibrate(np.arange(4), codes.astype(np.int32), labels)
    with pytest.raises(InvalidInputError, match="codes must have shape \\(n, bytes\\)"):
        calibrate(np.arange(4), codes.ravel(), labels)
    with pytest.raises(InvalidInputError, match="with bytes >= 1"):
        calibrate(np.arange(4), codes[:, :0], labels)
    with pytest.raises(InvalidInputError, match="ids must be unique"):
        calibrate(np.array([1, 1, 2, 3]), codes, labels)
    with pytest.raises(InvalidDtypeError, match="ids must be integers"):
        calibrate(np.arange(4.0), codes, labels)
    with pytest.raises(InvalidInputError, match="one entry per code \\(4\\), got 3"):
        calibrate(np.arange(4), codes, labels[:3])
    with pytest.raises(InvalidInputError, match="labels must be str, got NoneType at position 2"):
        calibrate(np.arange(4), codes, ["a", "a", None, "b"])
    res = calibrate(np.arange(4), codes, labels)
    with pytest.raises(InvalidInputError, match="threshold must be an integer in \\[0, 64\\]"):
        res.point(65)


def test_unreachable_target_chooses_nothing_and_keeps_the_gallery():
    codes = np.array([[0], [0], [0], [0]], dtype=np.uint8)  # all identical: half the accepts are wrong
    with Gallery.create(":memory:", fingerprint=FINGERPRINT, bits=8) as g:
        g.add(codes, ["a", "a", "b", "b"])
        g.set_max_distance(7)
        res = calibrate_gallery(g, options=CalibrationOptions(target_precision=0.9), store=True)
        assert res.threshold is None and not res.reached and res.chosen is None
        assert res.best_precision().precision < 0.9
        assert g.max_distance == 7


# ---------------------------------------------------------------- real PP-ShiTuV2 codes


@pytest.fixture(scope="module")
def real_codes(embeddings_npz):
    data = np.load(embeddings_npz, allow_pickle=False)
    return binarize(data["embeddings"]), [str(x) for x in data["labels"]]


@pytest.fixture(scope="module")
def real_oracle(real_codes):
    """The slow curve of the drink codes, every item a query (ids 0 .. 593)."""
    codes, labels = real_codes
    ids = np.arange(codes.shape[0])
    curve, _, n_known, n_unknown = _slow_curve(ids, codes, labels, ids, 1.0)
    # [item, smallest id of another label with the very same code], for every item that has one.
    key = [code.tobytes() for code in codes]
    conflicts = []
    for i in ids:
        twins = [j for j in ids if key[j] == key[i] and labels[j] != labels[i]]
        if twins:
            conflicts.append([int(i), int(min(twins))])
    return curve, n_known, n_unknown, conflicts


def test_real_codes_match_the_slow_oracle(real_codes, real_oracle):
    codes, labels = real_codes
    curve, n_known, n_unknown, conflicts = real_oracle
    ids = np.arange(codes.shape[0])
    res = calibrate(ids, codes, labels, options=CalibrationOptions(target_precision=0.95))
    assert not res.sampled and res.items == len(labels) and res.labels == len(set(labels))
    assert (res.known_queries, res.unknown_queries) == (n_known, n_unknown)
    for name, values in curve.items():
        np.testing.assert_allclose(getattr(res, name), values, rtol=0, atol=1e-12, equal_nan=True, err_msg=name)
    assert res.threshold is not None and res.threshold == _slow_choice(curve, 0.95)
    assert res.chosen.precision >= 0.95
    best_precision, best_t = _slow_best(curve)
    assert (res.best_precision().precision, res.best_precision().threshold) == (best_precision, best_t)
    strict = calibrate(ids, codes, labels, options=CalibrationOptions(target_precision=0.99))
    assert strict.threshold == _slow_choice(curve, 0.99)
    assert conflicts and res.conflicts.tolist() == conflicts


def test_real_codes_sampled_queries(real_codes):
    codes, labels = real_codes
    ids = np.arange(codes.shape[0]) * 7 + 3
    res = calibrate(ids, codes, labels, options=CalibrationOptions(max_queries=200, seed=1))
    assert res.sampled and res.query_ids.shape == (200,) and res.unknown_queries == 200
    if res.threshold is not None:
        assert res.chosen.precision >= 0.95


def _recognizer(bundle_dir, gallery, **opts):
    bundle = Bundle.load(bundle_dir)
    det = Detector.from_bundle(bundle, session=FakeDetectorSession([(BOX, 0.9)]))
    emb = Embedder.from_bundle(bundle, session=FakeExtractorSession())
    return Recognizer(bundle, det, emb, gallery, RecognizerOptions(**opts))


def _flip(code: np.ndarray, n: int) -> np.ndarray:
    bits = np.unpackbits(code, axis=-1, bitorder="big")
    bits[..., :n] ^= 1
    return np.packbits(bits, axis=-1, bitorder="big")


def test_stored_threshold_is_the_recognisers_default(real_codes, fake_bundle, tmp_path):
    codes, labels = real_codes
    bundle = Bundle.load(fake_bundle)
    path = tmp_path / "drinks.gallery"
    with Gallery.create(path, fingerprint=bundle.code_fingerprint) as g:
        g.add(codes, labels)
        res = calibrate_gallery(g, options=CalibrationOptions(target_precision=0.95), store=True)
    t = res.threshold
    assert t is not None and t != bundle.recognition.max_distance

    image = np.random.default_rng(7).integers(0, 255, size=(640, 640, 3), dtype=np.uint8)
    with Gallery.open(path) as g:
        assert g.max_distance == t
        rec = _recognizer(fake_bundle, g)
        assert rec.max_distance == t
        query = rec.embedder.embed([crop(image, BOX)])
        assert hamming_distances(query, codes).min() > t + 1, "the drinks must not match the fake crop"
        # An item exactly t bits away is accepted, one t + 1 bits away is not: the stored value decides.
        [inside] = g.add(_flip(query, t), ["inside"])
        assert [(r.label, r.distance) for r in rec.recognize(image).recognitions] == [("inside", t)]
        g.remove([inside])
        g.add(_flip(query, t + 1), ["outside"])
        assert rec.recognize(image).recognitions == ()
        # An explicit option still wins over the calibrated value.
        assert [r.label for r in _recognizer(fake_bundle, g, max_distance=t + 1).recognize(image).recognitions] == ["outside"]


# ---------------------------------------------------------------- command line


@pytest.fixture
def cli_calibrate():
    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["gallery", "calibrate", *map(str, argv)], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def drink_gallery(real_codes, tmp_path):
    codes, labels = real_codes
    path = tmp_path / "drinks.gallery"
    with Gallery.create(path, fingerprint=FINGERPRINT) as g:
        g.add(codes, labels)
    return path


def _stored(path):
    with Gallery.open(path, readonly=True) as g:
        return g.max_distance


def test_cli_stores_the_threshold(cli_calibrate, drink_gallery, real_oracle):
    curve, n_known, n_unknown, conflicts = real_oracle
    code, out, err = cli_calibrate(drink_gallery)
    assert code == 0, err
    t = _slow_choice(curve, 0.95)
    precision, recall = curve["precision"][t], curve["recall"][t]
    assert f"max_distance {t} (precision {precision:.4f}, recall {recall:.4f}" in out
    assert f"all {n_unknown} items used as queries: {n_known} known (leave-one-out), {n_unknown} unknown" in out
    assert f"stored in {drink_gallery} (was None)" in out
    rows = [line.split() for line in out.splitlines() if re.fullmatch(r"\d+\*?", line.split()[0])]
    assert [int(r[0].rstrip("*")) for r in rows] == list(range(t - 20, t + 21, 4))
    assert [r[0] for r in rows if r[0].endswith("*")] == [f"{t}*"]
    assert float(rows[5][1]) == round(precision, 4)
    assert f"warning: {len(conflicts)} sampled item(s) have the very same code" in err
    assert _stored(drink_gallery) == t


def test_cli_dry_run_and_json(cli_calibrate, drink_gallery):
    code, out, _ = cli_calibrate(drink_gallery, "--dry-run", "--json", "--precision", "0.9", "--max-queries", "300")
    assert code == 0
    record = json.loads(out)
    assert record["reached"] and not record["stored"] and record["max_distance"] is None
    assert record["queries"] == {"sampled": True, "count": 300, "seed": 0, "known": record["queries"]["known"],
                                 "unknown": 300}
    assert len(record["curve"]) == 513 and record["curve"][0]["max_distance"] == 0
    chosen = record["chosen"]
    assert chosen["precision"] >= 0.9 and record["curve"][chosen["max_distance"]] == chosen
    assert len(record["conflicts"]) <= 10
    assert _stored(drink_gallery) is None


def test_cli_unreachable_target_exits_non_zero_and_changes_nothing(cli_calibrate, drink_gallery, real_oracle):
    curve = real_oracle[0]
    best_precision, best_t = _slow_best(curve)
    assert best_precision < 1.0 and _slow_choice(curve, 1.0) is None
    with Gallery.open(drink_gallery) as g:
        g.set_max_distance(99)
    code, out, _ = cli_calibrate(drink_gallery, "--precision", "1")
    assert code == 1
    assert f"target precision 1 cannot be reached: the best is {best_precision:.4f} at max_distance {best_t}" in out
    assert "nothing stored" in out and "keeps max_distance 99" in out
    assert _stored(drink_gallery) == 99


def test_cli_bad_input(cli_calibrate, drink_gallery, tmp_path):
    code, _, err = cli_calibrate(drink_gallery, "--precision", "1.5")
    assert code == 2 and "--precision" in err and "(0, 1]" in err and "'1.5'" in err
    small = tmp_path / "small.gallery"
    with Gallery.create(small, fingerprint=FINGERPRINT) as g:
        g.add(np.zeros((3, 64), np.uint8), ["a", "a", "b"])
    code, _, err = cli_calibrate(small)
    assert code == 2 and "at least two labels need two or more items" in err
    code, _, err = cli_calibrate(tmp_path / "missing.gallery")
    assert code == 2
    code, _, err = cli_calibrate(drink_gallery, "--plot", tmp_path / "curve.svg")
    assert code == 2 and "ending in .png" in err
    assert _stored(drink_gallery) is None and _stored(small) is None


def test_cli_plot_writes_a_png(cli_calibrate, drink_gallery, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'bench' extra) is not installed")
    png = tmp_path / "curve.png"
    code, out, err = cli_calibrate(drink_gallery, "--plot", png)
    assert code == 0, err
    assert f"curve drawn in {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_plot_without_matplotlib_names_the_extra(cli_calibrate, drink_gallery, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, _, err = cli_calibrate(drink_gallery, "--plot", tmp_path / "curve.png")
    assert code == 1 and "'bench' extra" in err and 'pip install "edge-shitu[bench]"' in err
    assert not (tmp_path / "curve.png").exists() and _stored(drink_gallery) is None


def test_calibrating_without_plot_never_imports_matplotlib(drink_gallery):
    import subprocess

    probe = (
        "import sys\n"
        "from edge_shitu import cli\n"
        f"code = cli.main(['gallery', 'calibrate', {str(drink_gallery)!r}, '--dry-run', '--json'])\n"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'onnxruntime', 'paddle', 'cv2')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == "0 []"
