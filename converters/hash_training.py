"""Training and evaluating hash heads (numpy only): DSHSD, ITQ, and leave-one-out retrieval scores.

**DSHSD** (PaddleClas ``ppcls/loss/deephashloss.py::DSHSDLoss``): a linear hash layer with a tanh
relaxation ``u = tanh(x W^T + b)`` (``x`` the L2-normalised feature), a linear classifier on ``u``
and the loss ``Lc + alpha * Ld`` where ``Lc`` is the softmax cross-entropy of the classifier and
``Ld = mean_ij((1 - s_ij) / 2 * D_ij + s_ij / 2 * max(0, m - D_ij))`` over all ``B x B`` pairs
of a minibatch, ``D_ij = ||u_i - u_j||^2``, ``s_ij = 1`` for pairs of *different* labels and
``m = 2 * bits``. Forward and backward passes are written out by hand, optimised with Adam on
minibatches; the same seed gives a byte-identical head. At inference only the hash layer is kept:
the code is ``x W^T + b > 0``.

Two additions, both chosen on validation splits of the *training* classes (:func:`select_dshsd`),
never on the classes a head is evaluated on:

- the start of the hash layer: plain sign (``W = s * I`` when ``bits == d``: the first codes are
  exactly the sign codes), within-class whitening (:func:`within_class_whitening`, supervised,
  closed form), ITQ, or a seeded random rotation. The default is whitening: a linear map fitted on
  a few hundred images that carries over to unseen classes, where 512x512 weights trained from
  plain sign on so few images mostly learn the training classes;
- an optional anchor ``anchor / 2 * ||W - W0||^2`` towards that start, a regulariser added to the
  DSHSD loss (which is otherwise unchanged) that limits how far the layer bends towards the
  training classes.

**ITQ** (Gong & Lazebnik, "Iterative quantization", CVPR 2011): centre, PCA to ``bits`` dimensions
(none when ``bits == d``), then alternate ``B = sign(V R)`` and the orthogonal Procrustes rotation
``R`` that best maps ``V`` onto ``B``. As a head: ``W = (P R)^T``, ``b = -mean @ W^T``.

**Evaluation** (:func:`leave_one_out`): every item queries all the others. Items are ranked by
descending inner product (floats) or ascending Hamming distance (codes); **ties are broken by
ascending item index**, the rule :meth:`edge_shitu.gallery.Gallery.search` applies to ids, so a
score is the one the runtime's ranking would give. recall@1 is the share of queries whose first
item has the query's label; AP is the average precision of that single ranking of all the others
(tied items are *not* averaged over their possible orders: a tie between a right and a wrong item
counts in index order). Queries whose label has no other item cannot be answered and are left out
of both figures.

:func:`leave_one_out_reranked` scores the search the runtime can do with compact stored features
(:mod:`edge_shitu.compact`): the Hamming top N re-ranked by inner product, then the rest in Hamming
order. :func:`paired_difference` and :func:`t_interval` compare methods over several class splits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.codes import binarize, l2_normalize
from edge_shitu.compact import CompactVectors, rerank_shortlist
from edge_shitu.errors import HashHeadError, InvalidInputError, MissingFileError
from edge_shitu.hashing import MAX_DIM, HashHead
from edge_shitu.npz import ArraySpec, read_npz
from edge_shitu.search import hamming_distances

__all__ = [
    "LabelledEmbeddings",
    "RetrievalScores",
    "DSHSDOptions",
    "ITQOptions",
    "TrainingResult",
    "load_embeddings",
    "leave_one_out",
    "leave_one_out_reranked",
    "PairedDifference",
    "paired_difference",
    "t_interval",
    "split_classes",
    "train_itq",
    "train_dshsd",
    "dshsd_loss",
    "select_dshsd",
    "selection_grid",
    "Selection",
    "within_class_whitening",
    "compare_heads",
    "INITS",
    "MAX_ITEMS",
    "MAX_EMBEDDINGS_BYTES",
]

INITS = ("identity", "whitening", "itq", "orthogonal")
"""Starts of the DSHSD hash layer: plain sign or within-class whitening (both need bits == d), ITQ,
or a seeded random rotation."""

# Rows of queries scored at once in leave_one_out: bounds the (rows, n) temporaries.
_EVAL_ROWS = 256

MAX_ITEMS = 10_000_000
"""Most items an embeddings file may hold."""
MAX_EMBEDDINGS_BYTES = 1 << 30
"""Largest feature array read from a file (500 000 512-d float32 features take 1 GB); training and
evaluation hold a few copies of it and pairwise blocks besides."""


@dataclass(frozen=True, eq=False)
class LabelledEmbeddings:
    """Features and their labels.

    Attributes:
      embeddings: float32 ``(n, d)``, L2-normalised (as the runtime feeds the head).
      classes: int64 ``(n,)``, index of each item's label in ``names``.
      names: the distinct labels, sorted (strings, or ints when the file's labels are integers).
      source: where they came from (a file name), for messages.
    """

    embeddings: np.ndarray
    classes: np.ndarray
    names: Tuple
    source: str = "embeddings"

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def subset(self, index: np.ndarray) -> "LabelledEmbeddings":
        """The items at ``index`` (int array), with their labels renumbered among themselves."""
        names = np.asarray(self.names, dtype=object)
        used, classes = np.unique(self.classes[index], return_inverse=True)
        return LabelledEmbeddings(self.embeddings[index], classes.astype(np.int64), tuple(names[used]), self.source)

    @classmethod
    def from_arrays(cls, embeddings: np.ndarray, labels: Sequence, *,
                    source: str = "embeddings") -> "LabelledEmbeddings":
        """Validate features and labels and L2-normalise the features.

        Args:
          embeddings: floating-point ``(n, d)``, finite, n >= 2.
          labels: ``n`` labels, strings or integers.
          source: what to call the data in error messages.

        Raises:
          InvalidInputError: wrong shapes, non-finite values, fewer than two items, or labels that
            are neither all strings nor all integers.
        """
        emb = np.asarray(embeddings)
        if not np.issubdtype(emb.dtype, np.floating):
            raise InvalidInputError(f"{source}: embeddings must be float32 [n, d], got dtype {emb.dtype}")
        if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
            raise InvalidInputError(f"{source}: embeddings must be float32 [n, d] with n >= 2, got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise InvalidInputError(f"{source}: embeddings hold NaN or infinite values")
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iuUS" or lab.ndim != 1:
            raise InvalidInputError(f"{source}: labels must be [n] strings or integers, got dtype {lab.dtype}, "
                                    f"shape {lab.shape}")
        if lab.shape[0] != emb.shape[0]:
            raise InvalidInputError(f"{source}: {emb.shape[0]} embeddings but {lab.shape[0]} labels")
        if lab.dtype.kind == "S":
            lab = lab.astype(str)
        names, classes = np.unique(lab, return_inverse=True)
        names = tuple(int(v) for v in names) if lab.dtype.kind in "iu" else tuple(str(v) for v in names)
        return cls(l2_normalize(emb.astype(np.float32, copy=False)), classes.astype(np.int64), names, source)


@dataclass(frozen=True)
class RetrievalScores:
    """Leave-one-out retrieval figures.

    Attributes:
      recall_at_1: share of answerable queries whose nearest other item has their label.
      mean_ap: mean average precision over those queries (ranking of all other items).
      queries: answerable queries (their label has at least one other item).
      items: items in the set.
    """

    recall_at_1: float
    mean_ap: float
    queries: int
    items: int


@dataclass(frozen=True)
class ITQOptions:
    """Iterative quantisation.

    Attributes:
      bits: code length, a positive multiple of 8, at most the feature dimension.
      iterations: alternations of binarisation and rotation.
      init: starting rotation: "identity" (the plain-sign start: the first codes are the sign bits of the
        centred (projected) features) or "random" (a seeded random rotation, as in the paper).
      seed: seed of the random rotation.
    """

    bits: int = 512
    iterations: int = 50
    init: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_positive("iterations", self.iterations, allow_zero=True)
        if self.init not in ("identity", "random"):
            raise InvalidInputError(f"ITQ init must be 'identity' or 'random', got {self.init!r}")


@dataclass(frozen=True)
class DSHSDOptions:
    """DSHSD training of a linear hash layer.

    The defaults are the choice of :func:`select_dshsd` over :func:`selection_grid` on the training
    classes of the PP-ShiTuV2 drink features (``dev.npz``, class split seed 0, half of the classes;
    4 validation splits of those classes): a within-class whitening start, 10 epochs at 1e-2 with a
    light anchor. No held-out class took part in the choice.

    Attributes:
      bits: code length, a positive multiple of 8.
      alpha: weight of the pairwise term (0.05, the reference's).
      epochs: passes over the training set; 0 returns the (scaled) start itself.
      batch_size: items per minibatch (the pairwise term uses all pairs of a minibatch).
      learning_rate: Adam step size of the hash layer.
      classifier_learning_rate: Adam step size of the classifier on the relaxed codes.
      init: start of the hash layer, one of :data:`INITS`.
      init_scale: RMS of the start's outputs on the training features (the start is scaled to it, which
        does not change its codes), i.e. where on ``tanh`` training starts.
      shrinkage: init "whitening" only: shrinkage of the within-class covariance towards the identity.
      anchor: strength of the pull ``anchor / 2 * ||W - W0||^2`` towards the start (0 = none).
      seed: seed of the classifier's initial weights, the minibatch order and any random start.
    """

    bits: int = 512
    alpha: float = 0.05
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-2
    classifier_learning_rate: float = 1e-2
    init: str = "whitening"
    init_scale: float = 0.3
    shrinkage: float = 1.0
    anchor: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_positive("epochs", self.epochs, allow_zero=True)
        _check_positive("batch_size", self.batch_size)
        if self.batch_size < 2:
            raise InvalidInputError(f"batch_size must be >= 2 (pairs), got {self.batch_size}")
        for name in ("alpha", "anchor"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise InvalidInputError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("learning_rate", "classifier_learning_rate", "init_scale", "shrinkage"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InvalidInputError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise InvalidInputError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """A trained head and how it was made.

    Attributes:
      head: the hash head.
      method: "dshsd" or "itq".
      options: the options used (:class:`DSHSDOptions` or :class:`ITQOptions`).
      seconds: wall time of the training.
      losses: mean loss of each epoch (DSHSD) or quantisation error of each iteration (ITQ).
      info: JSON-able provenance (method, options, data size) to record with the head.
    """

    head: HashHead
    method: str
    options: Union[DSHSDOptions, ITQOptions]
    seconds: float
    losses: Tuple[float, ...] = ()
    info: Dict = field(default_factory=dict)


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise InvalidInputError(f"bits must be a positive multiple of 8, got {bits!r}")


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


def load_embeddings(path: Union[str, Path]) -> LabelledEmbeddings:
    """Read an ``.npz`` with ``embeddings`` float [n, d] and ``labels`` [n] (strings or integers).

    Other arrays (e.g. ``paths``) are ignored and never read; nothing is unpickled. Sizes are checked
    from the archive's headers before any data is read (:func:`edge_shitu.npz.read_npz`): n at most
    :data:`MAX_ITEMS`, d at most :data:`edge_shitu.hashing.MAX_DIM`, the features at most
    :data:`MAX_EMBEDDINGS_BYTES`, labels at most 1024 characters. The features are L2-normalised.

    Raises:
      MissingFileError: ``path`` does not exist.
      InvalidInputError: the file is not such an archive, or exceeds those sizes (the message names it
        and what was expected).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such embeddings file")
    expected = "an .npz with 'embeddings' float32 [n, d] and 'labels' [n] (strings or integers)"
    specs = {
        "embeddings": ArraySpec(shape=(MAX_ITEMS, MAX_DIM), kinds="f", itemsize=(2, 8),
                                max_bytes=MAX_EMBEDDINGS_BYTES, dtype="float32"),
        "labels": ArraySpec(shape=(MAX_ITEMS,), kinds="iuUS", itemsize=(1, 4096), max_bytes=MAX_EMBEDDINGS_BYTES,
                            dtype="strings or integers"),
    }
    arrays = read_npz(path, specs, where=str(path), expected=expected, what="embeddings archive", others=True)
    return LabelledEmbeddings.from_arrays(arrays["embeddings"], arrays["labels"], source=str(path))


def split_classes(classes: np.ndarray, *, train_fraction: float = 0.5, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split items by class: a seeded share of the classes for training, the rest held out.

    Args:
      classes: int ``(n,)`` class index of each item.
      train_fraction: share of the classes used for training, in (0, 1); rounded, at least one
        class on each side.
      seed: seed of the class permutation.

    Returns:
      ``(train_index, test_index)``: ascending int64 item indices.

    Raises:
      InvalidInputError: ``train_fraction`` outside (0, 1), or fewer than two classes.
    """
    if not 0.0 < train_fraction < 1.0:
        raise InvalidInputError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    distinct = np.unique(classes)
    if distinct.size < 2:
        raise InvalidInputError(f"a class split needs at least two classes, got {distinct.size}")
    perm = np.random.default_rng(seed).permutation(distinct)
    n_train = min(max(int(round(train_fraction * distinct.size)), 1), distinct.size - 1)
    train = np.isin(classes, perm[:n_train])
    return np.flatnonzero(train).astype(np.int64), np.flatnonzero(~train).astype(np.int64)


def leave_one_out(data: LabelledEmbeddings, *, codes: Optional[np.ndarray] = None) -> RetrievalScores:
    """Leave-one-out recall@1 and mAP (see the module docstring for ranking and ties).

    Args:
      data: the items and labels.
      codes: uint8 ``(n, B)`` codes of the items to rank by Hamming distance; ``None`` ranks by the
        inner product of the (L2-normalised) features.

    Returns:
      The scores; NaN figures when no query is answerable.

    Raises:
      InvalidInputError: ``codes`` does not have one row per item.
    """
    n = len(data)
    if codes is not None and (codes.ndim != 2 or codes.shape[0] != n):
        raise InvalidInputError(f"codes must have one row per item ({n}), got shape {codes.shape}")
    tally = _Tally(data)
    for rows in _row_blocks(n):
        tally.add(rows, _ranking(data, rows, codes))
    return tally.scores()


def leave_one_out_reranked(data: LabelledEmbeddings, *, codes: np.ndarray, vectors: CompactVectors,
                           shortlist: int) -> RetrievalScores:
    """Leave-one-out scores of a Hamming search re-ranked by compact inner products.

    Each query's ranking of the other items is: its ``shortlist`` nearest by Hamming distance (ties
    by ascending index), ordered by :func:`edge_shitu.compact.rerank_shortlist` (descending inner
    product of the query's float feature with the items' compact vectors, ties in Hamming order),
    followed by all the other items in Hamming order. recall@1 and AP as :func:`leave_one_out`.

    Args:
      data: the items and labels; the queries' float features are ``data.embeddings``.
      codes: uint8 ``(n, B)`` codes of the items.
      vectors: the items' compact vectors, ``n`` of dimension ``data.dim``.
      shortlist: candidates re-ranked per query, >= 1 (more than ``n - 1`` re-ranks them all).

    Raises:
      InvalidInputError: ``codes`` or ``vectors`` do not have one row per item, ``vectors`` another
        dimension, or ``shortlist`` < 1.
    """
    n = len(data)
    _check_positive("shortlist", shortlist)
    if codes.ndim != 2 or codes.shape[0] != n:
        raise InvalidInputError(f"codes must have one row per item ({n}), got shape {codes.shape}")
    if len(vectors) != n or vectors.dim != data.dim:
        raise InvalidInputError(f"vectors must be ({n}, {data.dim}), got ({len(vectors)}, {vectors.dim})")
    m = min(int(shortlist), n - 1)
    tally = _Tally(data)
    for rows in _row_blocks(n):
        order = _ranking(data, rows, codes)
        if m:
            top, _ = rerank_shortlist(np.ascontiguousarray(order[:, :m]).astype(np.int64), data.embeddings[rows],
                                      vectors, m)
            order = np.concatenate([top, order[:, m:]], axis=1)
        tally.add(rows, order)
    return tally.scores()


def _row_blocks(n: int):
    for r0 in range(0, n, _EVAL_ROWS):
        yield np.arange(r0, min(n, r0 + _EVAL_ROWS))


def _ranking(data: LabelledEmbeddings, rows: np.ndarray, codes: Optional[np.ndarray]) -> np.ndarray:
    """int ``(len(rows), n - 1)``: the other items, best first (ties by ascending index)."""
    n = len(data)
    if codes is None:
        cost = -(data.embeddings[rows] @ data.embeddings.T).astype(np.float64)
        cost[np.arange(rows.size), rows] = np.inf
    else:
        cost = hamming_distances(codes[rows], codes).astype(np.int64)
        cost[np.arange(rows.size), rows] = np.iinfo(np.int64).max
    # Stable sort: equal costs keep ascending index order; the query itself sorts last.
    return np.argsort(cost, axis=1, kind="stable")[:, : n - 1]


class _Tally:
    """recall@1 and AP of rankings, over the answerable queries."""

    def __init__(self, data: LabelledEmbeddings) -> None:
        self.y = data.classes
        self.n = len(data)
        self.answerable = np.bincount(self.y)[self.y] > 1
        self.hits: List[np.ndarray] = []
        self.aps: List[np.ndarray] = []

    def add(self, rows: np.ndarray, order: np.ndarray) -> None:
        rel = (self.y[order] == self.y[rows, None])[self.answerable[rows]]
        self.hits.append(rel[:, 0])
        prec = np.cumsum(rel, axis=1) / np.arange(1, self.n, dtype=np.float64)
        self.aps.append((prec * rel).sum(axis=1) / rel.sum(axis=1))

    def scores(self) -> RetrievalScores:
        hit = np.concatenate(self.hits) if self.hits else np.zeros(0, bool)
        ap = np.concatenate(self.aps) if self.aps else np.zeros(0)
        if hit.size == 0:
            return RetrievalScores(float("nan"), float("nan"), 0, self.n)
        return RetrievalScores(float(hit.mean()), float(ap.mean()), int(hit.size), self.n)


def _t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (exact finite series, A&S 26.7.3-4)."""
    theta = np.arctan(t / np.sqrt(df))
    c2, term = np.cos(theta) ** 2, 1.0
    if df % 2:
        total = 0.0
        if df > 1:
            total = term = np.cos(theta)
            for j in range(3, df - 1, 2):
                term *= c2 * (j - 1) / j
                total += term
        return float(2.0 / np.pi * (theta + np.sin(theta) * total))
    total = 1.0
    for j in range(2, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return float(np.sin(theta) * total)


def t_interval(values: Sequence[float], *, level: float = 0.95) -> Optional[Tuple[float, float]]:
    """Two-sided Student t confidence interval of the mean of ``values``.

    ``mean -/+ t_{(1 + level) / 2, K - 1} * s / sqrt(K)`` with ``s`` the sample standard deviation
    (``ddof = 1``) of the ``K`` values; the quantile is solved from the exact t distribution.

    Returns:
      ``(low, high)``, or None when ``K < 2`` (no spread to estimate) or a value is NaN.

    Raises:
      InvalidInputError: ``level`` outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise InvalidInputError(f"level must be in (0, 1), got {level!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2 or not np.isfinite(x).all():
        return None
    df = x.size - 1
    lo, hi = 0.0, 1.0
    while _t_coverage(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_coverage(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * hi:
            break
    half = 0.5 * (lo + hi) * float(x.std(ddof=1)) / np.sqrt(x.size)
    mean = float(x.mean())
    return float(mean - half), float(mean + half)


@dataclass(frozen=True)
class PairedDifference:
    """A method's paired difference to a baseline over splits.

    Attributes:
      diffs: per-split ``method - baseline``.
      mean: their mean.
      ci95: the 95% t interval of the mean (:func:`t_interval`), None with fewer than two splits.
    """

    diffs: Tuple[float, ...]
    mean: float
    ci95: Optional[Tuple[float, float]]

    @property
    def excludes_zero(self) -> Optional[bool]:
        """Whether the interval lies entirely above or below zero (None without an interval)."""
        return None if self.ci95 is None else bool(self.ci95[0] > 0 or self.ci95[1] < 0)


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """Per-split differences ``values - baseline``, their mean and 95% t interval.

    Raises:
      InvalidInputError: the two have different lengths or are empty.
    """
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise InvalidInputError(f"paired values must be two equal non-empty lists, got {a.shape} and {b.shape}")
    d = a - b
    return PairedDifference(tuple(float(v) for v in d), float(d.mean()), t_interval(d))


def train_itq(data: LabelledEmbeddings, options: Optional[ITQOptions] = None) -> TrainingResult:
    """Fit an ITQ head (unsupervised: the labels are not used).

    Args:
      data: training features.
      options: bits, iterations, start and seed.

    Returns:
      The head (``W = (P R)^T``, ``b = -mean @ W^T``) and the quantisation error per iteration.

    Raises:
      InvalidInputError: ``bits`` exceeds the feature dimension.
    """
    opts = options or ITQOptions()
    start = time.perf_counter()
    x = data.embeddings.astype(np.float64)
    n, d = x.shape
    if opts.bits > d:
        raise InvalidInputError(f"ITQ gives at most d = {d} bits, got bits = {opts.bits}")
    mean = x.mean(axis=0)
    v = x - mean
    if opts.bits < d:
        # PCA: leading eigenvectors of the covariance, signs fixed so that the result is reproducible.
        evals, evecs = np.linalg.eigh(v.T @ v)
        proj = evecs[:, np.argsort(evals, kind="stable")[::-1][: opts.bits]]
        proj *= np.where(proj[np.argmax(np.abs(proj), axis=0), np.arange(opts.bits)] < 0, -1.0, 1.0)
    else:
        proj = np.eye(d)
    vp = v @ proj
    if opts.init == "identity":
        rot = np.eye(opts.bits)
    else:
        rot, _ = np.linalg.qr(np.random.default_rng(opts.seed).standard_normal((opts.bits, opts.bits)))
    errors = []
    for _ in range(opts.iterations):
        b = np.where(vp @ rot >= 0, 1.0, -1.0)
        errors.append(float(np.square(b - vp @ rot).sum() / n))
        u, _, vt = np.linalg.svd(vp.T @ b)
        rot = u @ vt
    weight = (proj @ rot).T.astype(np.float32)
    bias = (-(mean.astype(np.float32) @ weight.T)).astype(np.float32)
    head = HashHead.from_arrays(np.ascontiguousarray(weight), bias, where="ITQ head")
    seconds = time.perf_counter() - start
    info = {"method": "itq", "bits": opts.bits, "iterations": opts.iterations, "init": opts.init, "seed": opts.seed,
            "items": n, "classes": len(data.names)}
    return TrainingResult(head, "itq", opts, seconds, tuple(errors), info)


class _Adam:
    """Adam (beta1 0.9, beta2 0.999, eps 1e-8) over a list of float64 arrays, updated in place."""

    def __init__(self, params: List[np.ndarray], lrs: List[float]) -> None:
        self.params, self.lrs = params, lrs
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: List[np.ndarray]) -> None:
        self.t += 1
        c1, c2 = 1 - 0.9 ** self.t, 1 - 0.999 ** self.t
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + 1e-8)


def dshsd_loss(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, cls_weight: np.ndarray,
               cls_bias: np.ndarray, *, alpha: float, margin: float) -> Tuple[float, Tuple[np.ndarray, ...]]:
    """The DSHSD loss of one minibatch and its gradients (float64).

    Args:
      x: ``(B, d)`` features; y: ``(B,)`` class indices.
      weight, bias: hash layer ``(K, d)``, ``(K,)``; ``u = tanh(x @ weight.T + bias)``.
      cls_weight, cls_bias: classifier ``(C, K)``, ``(C,)`` on ``u``.
      alpha: weight of the pairwise term; margin: ``m`` of the pairwise term (``2 K``).

    Returns:
      ``(loss, (d_weight, d_bias, d_cls_weight, d_cls_bias))``.
    """
    bsz = x.shape[0]
    u = np.tanh(x @ weight.T + bias)
    logits = u @ cls_weight.T + cls_bias
    logits -= logits.max(axis=1, keepdims=True)
    expl = np.exp(logits)
    prob = expl / expl.sum(axis=1, keepdims=True)
    rows = np.arange(bsz)
    ce = float(-np.log(np.maximum(prob[rows, y], 1e-300)).mean())

    sq = np.einsum("ij,ij->i", u, u)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (u @ u.T), 0.0)
    dissimilar = (y[:, None] != y[None, :]).astype(np.float64)
    hinge = np.maximum(margin - dist, 0.0)
    pair = float(((1.0 - dissimilar) / 2.0 * dist + dissimilar / 2.0 * hinge).mean())

    # dL/dD_ij, symmetric; D_ij = |u_i|^2 + |u_j|^2 - 2 u_i.u_j  =>  dL/du = 4 (diag(G 1) - G) u.
    g = alpha * ((1.0 - dissimilar) / 2.0 - dissimilar / 2.0 * (hinge > 0)) / (bsz * bsz)
    du = 4.0 * (g.sum(axis=1)[:, None] * u - g @ u)
    dlogits = prob
    dlogits[rows, y] -= 1.0
    dlogits /= bsz
    d_cls_weight = dlogits.T @ u
    d_cls_bias = dlogits.sum(axis=0)
    du += dlogits @ cls_weight
    dz = du * (1.0 - u * u)
    return ce + alpha * pair, (dz.T @ x, dz.sum(axis=0), d_cls_weight, d_cls_bias)


def within_class_whitening(data: LabelledEmbeddings, *, shrinkage: float = 0.3) -> HashHead:
    """The within-class whitening head (supervised; ``bits == d``).

    ``W = (S_w + shrinkage * tr(S_w) / d * I)^(-1/2)``, ``b = -W mean``, with ``S_w`` the pooled
    within-class covariance of ``data``: directions along which images of one product vary are shrunk,
    the others stretched. Learned whitening of this kind is known to carry over to classes it was not
    fitted on (Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation", TPAMI
    2018); the shrinkage towards the identity keeps the directions that the few training images do
    not span. The weight is scaled so that the outputs on ``data`` have unit RMS.

    Raises:
      InvalidInputError: ``shrinkage`` is not > 0.
    """
    if not (np.isfinite(shrinkage) and shrinkage > 0):
        raise InvalidInputError(f"shrinkage must be a finite number > 0, got {shrinkage!r}")
    x = data.embeddings.astype(np.float64)
    n, d = x.shape
    centred = x.copy()
    for c in np.unique(data.classes):
        rows = data.classes == c
        centred[rows] -= x[rows].mean(axis=0)
    within = centred.T @ centred / n
    within += shrinkage * max(np.trace(within) / d, 1e-12) * np.eye(d)
    evals, evecs = np.linalg.eigh(within)
    weight = (evecs * evals ** -0.5) @ evecs.T
    mean = x.mean(axis=0)
    weight, bias = _unit_rms(x, weight, -(weight @ mean))
    return HashHead.from_arrays(weight.astype(np.float32), bias.astype(np.float32), where="whitening head")


def _unit_rms(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Scale a linear layer so that its outputs on ``x`` have unit root-mean-square (codes unchanged)."""
    rms = float(np.sqrt(np.mean(np.square(x @ weight.T + bias))))
    scale = 1.0 / rms if rms > 0 else 1.0
    return weight * scale, bias * scale


def _initial_layer(data: LabelledEmbeddings, opts: DSHSDOptions,
                   start: Optional[HashHead]) -> Tuple[np.ndarray, np.ndarray]:
    d = data.dim
    if start is not None:
        if (start.bits, start.dim) != (opts.bits, d):
            raise HashHeadError(f"start head is [{start.bits}, {start.dim}], expected [{opts.bits}, {d}]")
        weight, bias = start.weight.astype(np.float64), start.bias.astype(np.float64)
    elif opts.init in ("identity", "whitening"):
        if opts.bits != d:
            raise InvalidInputError(f"init {opts.init!r} needs bits == d = {d}, got bits = {opts.bits}; "
                                    "use init 'itq' or 'orthogonal'")
        if opts.init == "identity":
            weight, bias = np.eye(d), np.zeros(d)
        else:
            head = within_class_whitening(data, shrinkage=opts.shrinkage)
            weight, bias = head.weight.astype(np.float64), head.bias.astype(np.float64)
    elif opts.init == "itq":
        if opts.bits > d:
            raise InvalidInputError(f"init 'itq' gives at most d = {d} bits, got bits = {opts.bits}")
        head = train_itq(data, ITQOptions(bits=opts.bits, seed=opts.seed)).head
        weight, bias = head.weight.astype(np.float64), head.bias.astype(np.float64)
    else:
        size = max(opts.bits, d)
        q, _ = np.linalg.qr(np.random.default_rng([opts.seed, 1]).standard_normal((size, size)))
        weight, bias = q[: opts.bits, :d].copy(), np.zeros(opts.bits)
    weight, bias = _unit_rms(data.embeddings.astype(np.float64), weight, bias)
    return weight * opts.init_scale, bias * opts.init_scale


def train_dshsd(data: LabelledEmbeddings, options: Optional[DSHSDOptions] = None, *,
                start: Optional[HashHead] = None) -> TrainingResult:
    """Train a linear hash layer with the DSHSD loss (plus the optional anchor, see the module docstring).

    Deterministic: the same data, options and seed give a byte-identical head (on the same numpy build).

    Args:
      data: training features and labels (at least two classes).
      options: hyper-parameters.
      start: the head to start from (e.g. an ITQ head already trained on ``data``), instead of
        computing the start ``options.init`` names; it is scaled to ``options.init_scale`` all the same.

    Returns:
      The head and the mean loss of each epoch.

    Raises:
      InvalidInputError: fewer than two classes, or a start that does not fit ``bits``.
      HashHeadError: ``start`` has another shape than ``[bits, d]``.
      HashHeadError: training diverged (non-finite weights).
    """
    opts = options or DSHSDOptions()
    n_classes = len(data.names)
    if n_classes < 2:
        raise InvalidInputError(f"DSHSD needs at least two classes, got {n_classes}")
    started = time.perf_counter()
    rng = np.random.default_rng(opts.seed)
    x = data.embeddings.astype(np.float64)
    y = data.classes
    n = x.shape[0]
    weight, bias = _initial_layer(data, opts, start)
    anchor_w = weight.copy()
    cls_weight = rng.normal(0.0, 0.01, size=(n_classes, opts.bits))
    cls_bias = np.zeros(n_classes)
    adam = _Adam([weight, bias, cls_weight, cls_bias],
                 [opts.learning_rate, opts.learning_rate, opts.classifier_learning_rate, opts.classifier_learning_rate])
    margin = 2.0 * opts.bits
    losses = []
    # Overflow can only come from a diverging run, which is detected below and reported as such.
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(opts.epochs):
            order = rng.permutation(n)
            total, batches = 0.0, 0
            for b0 in range(0, n, opts.batch_size):
                idx = order[b0:b0 + opts.batch_size]
                if idx.size < 2:
                    continue
                loss, (gw, gb, gcw, gcb) = dshsd_loss(x[idx], y[idx], weight, bias, cls_weight, cls_bias,
                                                      alpha=opts.alpha, margin=margin)
                if opts.anchor:
                    diff = weight - anchor_w
                    loss += 0.5 * opts.anchor * float(np.square(diff).sum())
                    gw = gw + opts.anchor * diff
                adam.step([gw, gb, gcw, gcb])
                total += loss
                batches += 1
            losses.append(total / max(batches, 1))
            if not np.isfinite(losses[-1]):
                break
        weight32, bias32 = weight.astype(np.float32), bias.astype(np.float32)
    if not ((not losses or np.isfinite(losses[-1])) and np.isfinite(weight32).all() and np.isfinite(bias32).all()):
        raise HashHeadError(f"DSHSD training diverged (non-finite loss or weights after {len(losses)} epoch(s)); "
                            f"lower the learning rate ({opts.learning_rate})")
    head = HashHead.from_arrays(weight32, bias32, where="DSHSD head")
    seconds = time.perf_counter() - started
    info = {"method": "dshsd", "bits": opts.bits, "alpha": opts.alpha, "epochs": opts.epochs,
            "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
            "classifier_learning_rate": opts.classifier_learning_rate, "init": opts.init,
            "init_scale": opts.init_scale, "shrinkage": opts.shrinkage, "anchor": opts.anchor, "seed": opts.seed,
            "items": n, "classes": n_classes}
    return TrainingResult(head, "dshsd", opts, seconds, tuple(losses), info)


def compare_heads(data: LabelledEmbeddings, heads: Mapping[str, HashHead]) -> Dict[str, RetrievalScores]:
    """Leave-one-out scores of float inner product, plain sign and each head on the same items.

    Args:
      data: the items to evaluate on.
      heads: name -> head.

    Returns:
      ``{"float": ..., "sign": ..., **{name: ...}}`` in that order.

    Raises:
      HashHeadError: a head does not take ``data.dim``-d features.
      InvalidInputError: ``data.dim`` is not a multiple of 8 (plain sign needs it).
    """
    out = {"float": leave_one_out(data), "sign": leave_one_out(data, codes=binarize(data.embeddings))}
    for name, head in heads.items():
        out[name] = leave_one_out(data, codes=head.encode(data.embeddings))
    return out


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`select_dshsd`.

    Attributes:
      best: the options with the best mean validation mAP (ties: higher recall@1, then grid order).
      table: ``(options, mean recall@1, mean mAP)`` of every candidate, in grid order.
      folds: class splits the means are over.
    """

    best: DSHSDOptions
    table: Tuple[Tuple[DSHSDOptions, float, float], ...]
    folds: int


def selection_grid(base: Optional[DSHSDOptions] = None) -> Tuple[DSHSDOptions, ...]:
    """The candidates :func:`select_dshsd` tries by default (120): start (plain sign, a random
    rotation, or within-class whitening with shrinkage 0.1 / 0.3 / 1), start scale (0.3 / 1 / 3),
    learning rate (1e-3 / 1e-2), epochs (10 / 30) and anchor (0 / 0.01); the other fields come from
    ``base``."""
    base = base or DSHSDOptions()
    starts = [("identity", base.shrinkage), ("orthogonal", base.shrinkage)]
    starts += [("whitening", v) for v in (0.1, 0.3, 1.0)]
    return tuple(replace(base, init=init, shrinkage=shrink, init_scale=scale, learning_rate=lr, epochs=epochs,
                         anchor=anchor)
                 for init, shrink in starts for scale in (0.3, 1.0, 3.0) for lr in (1e-3, 1e-2)
                 for epochs in (10, 30) for anchor in (0.0, 0.01))


def select_dshsd(data: LabelledEmbeddings, candidates: Optional[Sequence[DSHSDOptions]] = None, *, folds: int = 4,
                 train_fraction: float = 0.5, seed: int = 0, on_result=None) -> Selection:
    """Choose DSHSD hyper-parameters on validation splits of ``data``'s classes only.

    For each of ``folds`` class splits (seeds ``seed + 1 ... seed + folds``), every candidate is
    trained on one part of the classes and scored (leave-one-out) on the other; the candidate with
    the best mean mAP wins. mAP rather than recall@1 decides because recall@1 saturates on a few
    dozen classes (one query is worth 0.7 points), while mAP moves with the whole ranking.

    Args:
      data: the training items (never the classes a head is to be evaluated on).
      candidates: options to try (default :func:`selection_grid`).
      folds: number of class splits.
      train_fraction: share of ``data``'s classes trained on in each split.
      seed: base seed of the splits.
      on_result: called with ``(options, recall@1, mAP)`` after each candidate (progress).

    Raises:
      InvalidInputError: no candidates, ``folds < 1``, or too few classes to split.
    """
    cands = tuple(candidates) if candidates is not None else selection_grid()
    if not cands:
        raise InvalidInputError("select_dshsd needs at least one candidate")
    _check_positive("folds", folds)
    splits = []
    for f in range(folds):
        fit_idx, val_idx = split_classes(data.classes, train_fraction=train_fraction, seed=seed + 1 + f)
        splits.append((data.subset(fit_idx), data.subset(val_idx)))
    table = []
    for opts in cands:
        scores = [leave_one_out(val, codes=train_dshsd(fit, opts).head.encode(val.embeddings)) for fit, val in splits]
        r1 = float(np.mean([s.recall_at_1 for s in scores]))
        ap = float(np.mean([s.mean_ap for s in scores]))
        table.append((opts, r1, ap))
        if on_result is not None:
            on_result(opts, r1, ap)
    best = max(range(len(table)), key=lambda i: (table[i][2], table[i][1], -i))
    return Selection(table[best][0], tuple(table), folds)
