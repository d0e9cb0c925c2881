"""Hash head training (DSHSD, ITQ, whitening start), selection and leave-one-out evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import average_precision
from edge_shitu.codes import binarize
from edge_shitu.errors import HashHeadError, InvalidInputError, MissingFileError
from edge_shitu.search import hamming_distances
from edge_shitu_converters.hash_training import (
    DSHSDOptions,
    ITQOptions,
    LabelledEmbeddings,
    compare_heads,
    dshsd_loss,
    leave_one_out,
    load_embeddings,
    select_dshsd,
    split_classes,
    train_dshsd,
    train_itq,
    within_class_whitening,
)
from edge_shitu.hashing import HashHead
from edge_shitu_converters.hash_heads import head_bytes


def _clusters(seed=0, classes=16, per_class=6, signal=8, noise=56):
    """Classes that differ in ``signal`` dims; every item also varies in ``noise`` nuisance dims.

    Float inner product separates the classes well, but most sign bits of the raw features are
    nuisance; a head that learns to cut through the signal dims does much better, on any classes.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, signal))
    sig = np.repeat(centres, per_class, axis=0) + 0.1 * rng.normal(size=(classes * per_class, signal))
    nui = 0.3 * rng.normal(size=(classes * per_class, noise))
    x = np.concatenate([sig, nui], axis=1).astype(np.float32)
    return LabelledEmbeddings.from_arrays(x, np.arange(classes).repeat(per_class))


def _slow_leave_one_out(x, y, codes=None):
    """Oracle: one query at a time, explicit (score, index) ordering, textbook AP."""
    n = len(y)
    hits, aps = [], []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if not any(y[j] == y[i] for j in others):
            continue
        if codes is None:
            key = lambda j: (-float(np.dot(x[i].astype(np.float64), x[j].astype(np.float64))), j)
        else:
            key = lambda j: (int(np.unpackbits(codes[i] ^ codes[j]).sum()), j)
        ranked = sorted(others, key=key)
        rel = [y[j] == y[i] for j in ranked]
        hits.append(rel[0])
        aps.append(average_precision(rel))
    return float(np.mean(hits)), float(np.mean(aps)), len(hits)


def test_leave_one_out_matches_the_oracle_with_ties_and_singletons(rng):
    x = rng.normal(size=(40, 16)).astype(np.float32)
    y = rng.integers(0, 9, size=40)
    y[0] = 99  # a label with one item: it cannot be answered and is left out
    data = LabelledEmbeddings.from_arrays(x, y)
    codes = np.packbits(data.embeddings[:, :8] > 0, axis=1)  # 8-bit codes: many ties
    assert len(np.unique(hamming_distances(codes, codes))) <= 9
    for c in (None, codes):
        r1, ap, q = _slow_leave_one_out(data.embeddings, data.classes, c)
        got = leave_one_out(data, codes=c)
        assert got.queries == q == 39 and got.items == 40
        assert got.recall_at_1 == pytest.approx(r1, abs=1e-12)
        assert got.mean_ap == pytest.approx(ap, abs=1e-12)


def test_leave_one_out_ties_go_to_the_lower_index():
    # Item 0 queries: items 1 (other label) and 2 (same label) are at the same distance -> 1 wins.
    x = np.array([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0],
                  [0, 0, 0, 1, 0, 0, 0, 0]], np.float32)
    data = LabelledEmbeddings.from_arrays(x, ["a", "b", "a", "b"])
    codes = binarize(data.embeddings)
    # Nearest items: 0 -> 1 (tie with 2, lower index; wrong), 1 -> 0 (wrong), 2 -> 0 (right), 3 -> 0 (wrong).
    assert leave_one_out(data, codes=codes).recall_at_1 == 0.25
    flipped = data.subset(np.array([0, 2, 1, 3]))  # now the same-label item of the tie has the lower index
    assert leave_one_out(flipped, codes=binarize(flipped.embeddings)).recall_at_1 == 0.5


def test_leave_one_out_without_answerable_queries():
    data = LabelledEmbeddings.from_arrays(np.eye(3, 8, dtype=np.float32), ["a", "b", "c"])
    s = leave_one_out(data)
    assert s.queries == 0 and np.isnan(s.recall_at_1) and np.isnan(s.mean_ap)
    with pytest.raises(InvalidInputError, match="one row per item"):
        leave_one_out(data, codes=np.zeros((2, 1), np.uint8))


def test_real_features_give_the_published_figures(embeddings_npz):
    data = load_embeddings(embeddings_npz)
    scores = compare_heads(data, {"identity": HashHead.identity(512)})
    # The figures documented with these features: leave-one-out recall@1 0.971 (float inner product)
    # and 0.960 (plain sign), i.e. 575 and 568 of the 592 queries whose label has another item.
    assert scores["float"].recall_at_1 == pytest.approx(0.971, abs=1e-3)
    assert scores["sign"].recall_at_1 == pytest.approx(0.960, abs=1e-3)
    assert round(scores["float"].recall_at_1 * 592) == 575 and round(scores["sign"].recall_at_1 * 592) == 568
    assert scores["identity"] == scores["sign"]
    assert scores["float"].queries == 592 and scores["float"].items == 594


def test_load_embeddings_str_and_int_labels(tmp_path, rng):
    x = rng.normal(size=(6, 8)).astype(np.float32) * 3
    np.savez(tmp_path / "s.npz", embeddings=x, labels=np.array(["b", "a", "b", "c", "a", "a"]))
    np.savez(tmp_path / "i.npz", embeddings=x, labels=np.array([7, 3, 7, 9, 3, 3]))
    s, i = load_embeddings(tmp_path / "s.npz"), load_embeddings(tmp_path / "i.npz")
    assert s.names == ("a", "b", "c") and i.names == (3, 7, 9)
    np.testing.assert_array_equal(s.classes, [1, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(s.classes, i.classes)
    np.testing.assert_allclose(np.linalg.norm(s.embeddings, axis=1), 1.0, rtol=1e-6)


def test_load_embeddings_errors(tmp_path, rng):
    with pytest.raises(MissingFileError, match="no such embeddings file"):
        load_embeddings(tmp_path / "none.npz")
    cases = {
        "nolabels.npz": ({"embeddings": np.zeros((3, 8), np.float32)}, "expected an .npz with 'embeddings'"),
        "count.npz": ({"embeddings": np.ones((3, 8), np.float32), "labels": np.array(["a", "b"])},
                      "3 embeddings but 2 labels"),
        "ints.npz": ({"embeddings": np.ones((3, 8), np.int32), "labels": np.array([1, 2, 3])},
                     "embeddings has dtype int32, expected float32"),
        "nan.npz": ({"embeddings": np.full((3, 8), np.nan, np.float32), "labels": np.array([1, 2, 3])}, "NaN"),
        "floatlabels.npz": ({"embeddings": np.ones((3, 8), np.float32), "labels": np.array([1.0, 2.0, 3.0])},
                            "strings or integers"),
        "objects.npz": ({"embeddings": np.ones((3, 8), np.float32), "labels": np.array([{}, {}, {}], dtype=object)},
                        "labels has dtype object, expected strings or integers"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(InvalidInputError, match=message) as info:
            load_embeddings(tmp_path / name)
        assert name in str(info.value)
    np.save(tmp_path / "single.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(InvalidInputError, match="single .npy array"):
        load_embeddings(tmp_path / "single.npy")


def test_split_classes_is_disjoint_and_seeded():
    classes = np.arange(20).repeat(3)
    a_train, a_test = split_classes(classes, train_fraction=0.5, seed=4)
    b_train, b_test = split_classes(classes, train_fraction=0.5, seed=4)
    np.testing.assert_array_equal(a_train, b_train)
    assert not set(classes[a_train]) & set(classes[a_test])
    assert len(set(classes[a_train])) == 10 and len(a_train) + len(a_test) == 60
    c_train, _ = split_classes(classes, train_fraction=0.5, seed=5)
    assert not np.array_equal(a_train, c_train)
    assert len(set(classes[split_classes(classes, train_fraction=0.99)[1]])) == 1  # at least one class each side
    with pytest.raises(InvalidInputError, match=r"in \(0, 1\)"):
        split_classes(classes, train_fraction=1.0)
    with pytest.raises(InvalidInputError, match="at least two classes"):
        split_classes(np.zeros(5, np.int64))


def test_dshsd_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    bsz, d, k, c = 7, 6, 8, 3
    x, y = rng.normal(size=(bsz, d)), np.array([0, 1, 1, 2, 0, 2, 2])
    params = [rng.normal(size=(k, d)), rng.normal(size=k), rng.normal(size=(c, k)), rng.normal(size=c)]
    for margin in (2.0 * k, 3.0):  # all dissimilar pairs inside the margin, and some outside
        _, grads = dshsd_loss(x, y, *params, alpha=0.7, margin=margin)
        for p, g in zip(params, grads):
            num = np.zeros_like(p)
            for i in np.ndindex(p.shape):
                old = p[i]
                p[i] = old + 1e-6
                plus, _ = dshsd_loss(x, y, *params, alpha=0.7, margin=margin)
                p[i] = old - 1e-6
                minus, _ = dshsd_loss(x, y, *params, alpha=0.7, margin=margin)
                p[i] = old
                num[i] = (plus - minus) / 2e-6
            np.testing.assert_allclose(g, num, atol=1e-7, rtol=1e-5)


def test_dshsd_loss_value_is_the_reference_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 4)), np.array([0, 0, 1, 1, 2])
    w, b, cw, cb = rng.normal(size=(8, 4)), rng.normal(size=8), rng.normal(size=(3, 8)), rng.normal(size=3)
    loss, _ = dshsd_loss(x, y, w, b, cw, cb, alpha=0.05, margin=16.0)
    u = np.tanh(x @ w.T + b)
    logits = u @ cw.T + cb
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(5), y])
    s = np.array([[float(y[i] != y[j]) for j in range(5)] for i in range(5)])
    dist = np.array([[np.sum((u[i] - u[j]) ** 2) for j in range(5)] for i in range(5)])
    ld = np.mean((1 - s) / 2 * dist + s / 2 * np.maximum(0, 16.0 - dist))
    assert loss == pytest.approx(ce + 0.05 * ld, rel=1e-12)


def test_dshsd_training_is_deterministic():
    data = _clusters()
    opts = DSHSDOptions(bits=64, epochs=5, seed=7)
    a, b = train_dshsd(data, opts), train_dshsd(data, opts)
    assert head_bytes(a.head) == head_bytes(b.head) and a.losses == b.losses
    c = train_dshsd(data, DSHSDOptions(bits=64, epochs=5, seed=8))
    assert head_bytes(c.head) != head_bytes(a.head)
    assert a.info["method"] == "dshsd" and a.info["seed"] == 7 and a.seconds >= 0


def test_zero_epochs_give_the_start():
    data = _clusters()
    # No training: the head is the (scaled) start, so its codes are the plain sign / whitening codes.
    result = train_dshsd(data, DSHSDOptions(bits=64, init="identity", epochs=0))
    assert result.losses == ()
    np.testing.assert_array_equal(result.head.encode(data.embeddings), binarize(data.embeddings))
    start = train_dshsd(data, DSHSDOptions(bits=64, init="whitening", shrinkage=0.5, epochs=0)).head
    # (Rescaling may move outputs within float rounding of zero across, hence agreement, not equality.)
    same = np.unpackbits(start.encode(data.embeddings) ^ within_class_whitening(data, shrinkage=0.5).encode(
        data.embeddings)) == 0
    assert same.mean() > 0.999


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dshsd_learns_what_carries_over_to_unseen_classes(seed):
    # Classes differ in 8 of 64 dims; sign bits of the other 56 (shared nuisance) are coin flips, so
    # plain sign codes are poor. DSHSD on half of the classes must learn hyperplanes through the
    # signal dims, which serve the other half as well.
    data = _clusters(seed=seed, classes=40)
    train_idx, test_idx = split_classes(data.classes, train_fraction=0.5, seed=0)
    train, test = data.subset(train_idx), data.subset(test_idx)
    result = train_dshsd(train, DSHSDOptions(bits=64, init="orthogonal", init_scale=1.0, epochs=100, learning_rate=0.01,
                                             anchor=0.0, seed=0))
    assert result.losses[-1] < 0.2 * result.losses[0]
    sign = leave_one_out(test, codes=binarize(test.embeddings))
    learned = leave_one_out(test, codes=result.head.encode(test.embeddings))
    assert sign.recall_at_1 < 0.35
    assert learned.recall_at_1 > sign.recall_at_1 + 0.4
    assert learned.mean_ap > sign.mean_ap + 0.4


def test_dshsd_option_and_input_errors():
    data = _clusters()
    with pytest.raises(InvalidInputError, match="bits must be a positive multiple of 8"):
        DSHSDOptions(bits=60)
    with pytest.raises(InvalidInputError, match="init must be one of"):
        DSHSDOptions(init="zeros")
    with pytest.raises(InvalidInputError, match="learning_rate must be a finite number > 0"):
        DSHSDOptions(learning_rate=0.0)
    with pytest.raises(InvalidInputError, match="batch_size must be >= 2"):
        DSHSDOptions(batch_size=1)
    with pytest.raises(InvalidInputError, match="needs bits == d = 64"):
        train_dshsd(data, DSHSDOptions(bits=32, init="whitening"))
    with pytest.raises(InvalidInputError, match="at least two classes"):
        train_dshsd(data.subset(np.arange(6)), DSHSDOptions(bits=64))
    with pytest.raises(HashHeadError, match=r"start head is \[8, 64\], expected \[64, 64\]"):
        train_dshsd(data, DSHSDOptions(bits=64), start=HashHead.from_arrays(np.ones((8, 64), np.float32),
                                                                            np.zeros(8, np.float32)))
    with pytest.raises(HashHeadError, match="diverged"):
        train_dshsd(data, DSHSDOptions(bits=64, epochs=2, learning_rate=1e300))


def test_other_starts_and_bit_lengths():
    data = _clusters()
    for init, bits in (("orthogonal", 128), ("orthogonal", 32), ("itq", 32), ("whitening", 64)):
        head = train_dshsd(data, DSHSDOptions(bits=bits, init=init, epochs=2)).head
        assert (head.bits, head.dim) == (bits, 64), init


def test_within_class_whitening_equalises_within_class_spread():
    data = _clusters(classes=24)
    head = within_class_whitening(data, shrinkage=1e-6)
    z = data.embeddings.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias
    assert np.sqrt(np.mean(z ** 2)) == pytest.approx(1.0, rel=1e-4)  # unit RMS on the data
    centred = z.copy()
    for c in np.unique(data.classes):
        centred[data.classes == c] -= z[data.classes == c].mean(axis=0)
    evals = np.linalg.eigvalsh(centred.T @ centred / len(z))
    assert evals.max() / evals.min() < 1.01  # within-class covariance is isotropic after whitening
    with pytest.raises(InvalidInputError, match="shrinkage"):
        within_class_whitening(data, shrinkage=0.0)


def test_itq_is_a_centred_rotation_with_falling_quantisation_error():
    data = _clusters()
    result = train_itq(data, ITQOptions(bits=64, iterations=15, seed=1))
    w = result.head.weight.astype(np.float64)
    np.testing.assert_allclose(w @ w.T, np.eye(64), atol=1e-5)
    mean = data.embeddings.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(result.head.bias, -(w @ mean), atol=1e-6)
    errors = np.array(result.losses)
    assert np.all(np.diff(errors) <= 1e-9) and errors[-1] < errors[0]
    again = train_itq(data, ITQOptions(bits=64, iterations=15, seed=1))
    assert head_bytes(again.head) == head_bytes(result.head)


def test_itq_with_pca_and_identity_start():
    data = _clusters()
    head = train_itq(data, ITQOptions(bits=16, iterations=3)).head
    assert (head.bits, head.dim) == (16, 64)
    w = head.weight.astype(np.float64)
    np.testing.assert_allclose(w @ w.T, np.eye(16), atol=1e-5)  # orthonormal PCA basis times a rotation
    start = train_itq(data, ITQOptions(bits=64, iterations=0, init="identity")).head
    centred = data.embeddings - data.embeddings.mean(axis=0)
    assert np.mean(start.encode(data.embeddings) == np.packbits(centred > 0, axis=1)) > 0.99
    with pytest.raises(InvalidInputError, match="at most d = 64 bits"):
        train_itq(data, ITQOptions(bits=128))
    with pytest.raises(InvalidInputError, match="'identity' or 'random'"):
        ITQOptions(init="pca")


def test_selection_uses_only_the_given_classes_and_picks_the_best_map():
    data = _clusters(classes=20)
    cands = [DSHSDOptions(bits=64, init="identity", epochs=0),
             DSHSDOptions(bits=64, epochs=100, init="orthogonal", init_scale=1.0, learning_rate=0.01, anchor=0.0)]
    seen = []
    sel = select_dshsd(data, cands, folds=2, seed=3, on_result=lambda o, r, a: seen.append((o, r, a)))
    assert [row[0] for row in sel.table] == cands and seen == list(sel.table) and sel.folds == 2
    # The untrained candidate is plain sign; training on these clusters helps a lot, so it must win.
    assert sel.table[1][2] > sel.table[0][2] and sel.best == cands[1]
    with pytest.raises(InvalidInputError, match="at least one candidate"):
        select_dshsd(data, [])


@pytest.mark.slow
def test_real_features_held_out_classes(embeddings_npz):
    # Held-out classes on the real PP-ShiTuV2 features: train on half of the classes (split seed 0),
    # evaluate on the other half. The default DSHSD head must beat plain sign clearly there (figures in
    # docs/benchmarks.md, "converters/hash_training.py: held-out classes").
    data = load_embeddings(embeddings_npz)
    train_idx, test_idx = split_classes(data.classes, train_fraction=0.5, seed=0)
    train, test = data.subset(train_idx), data.subset(test_idx)
    assert not set(np.asarray(train.names)) & set(np.asarray(test.names))
    scores = compare_heads(test, {"itq": train_itq(train, ITQOptions(iterations=20)).head,
                                  "dshsd": train_dshsd(train).head})
    assert scores["dshsd"].recall_at_1 > scores["sign"].recall_at_1 + 0.01
    assert scores["dshsd"].mean_ap > scores["sign"].mean_ap + 0.01
    assert scores["itq"].mean_ap > scores["sign"].mean_ap
