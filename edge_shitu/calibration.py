"""Calibrated rejection of unknown objects: choose the gallery's ``max_distance`` from its own codes.

The recogniser accepts a match when its Hamming distance is at most ``max_distance`` bits (the
reference's ``hamming_radius``, 100 by default, "tune to taste"). This module measures, on the
gallery itself, how precision and recall change with that threshold and picks the threshold
that reaches a target precision.

Queries. Every gallery item ``i`` (or a sample of them, see below) is used as a query twice:

- *known* query (leave-one-out): ``i`` searches the gallery without ``i`` itself. Its nearest
  neighbour (smallest distance, ties broken by ascending id as :meth:`Gallery.search` does) has
  either ``i``'s label (a correct match) or another one (a wrong match). Only items whose label
  has at least two items make a known query: a label's only item cannot be found by leave-one-out.
- *unknown* query (leave-one-class-out): ``i`` searches the gallery without every item of its own
  label, as if its product had never been enrolled. Its nearest neighbour always has another
  label, so accepting it is a false accept. Every sampled item makes an unknown query, so items
  whose label is unique are "unknowns" only.

So the mix of queries is about one unknown per known query: calibration assumes that objects
which are not in the gallery are about as frequent as objects which are. With fewer unknowns in
practice, the real precision at the chosen threshold is higher than the figure reported.

Curve. For every threshold ``t`` in ``0 .. bits`` a query is *accepted* when its nearest
distance is ``<= t`` (the recogniser's rule). Over the union of known and unknown queries:

- ``correct(t)``: known queries accepted with the right label;
- ``wrong(t)``: known queries accepted with a wrong label (misidentifications);
- ``unknown(t)``: unknown queries accepted (false accepts of objects not in the gallery);
- ``precision(t) = correct / (correct + wrong + unknown)``, NaN when nothing is accepted;
- ``recall(t) = correct / known queries``;
- ``accept_rate(t) = (correct + wrong + unknown) / (known + unknown queries)``;
- ``unknown_accept_rate(t) = unknown / unknown queries``.

Choice. The threshold is the largest ``t`` whose precision is at least the target (recall never
decreases with ``t``, so this is the threshold of highest recall that keeps the target). When no
threshold reaches the target, none is chosen (:attr:`CalibrationResult.threshold` is None) and
:func:`calibrate_gallery` leaves the gallery unchanged. A gallery needs at least two labels with
two or more items each to be calibrated at all.

Scale. Leave-one-out over a million items would take a million exhaustive searches, so at most
``max_queries`` items (2,000 by default) are used as queries, drawn uniformly without replacement
by ``numpy.random.default_rng(seed)`` from the items in ascending id order; each sampled query
still searches the *whole* gallery. The sample depends only on the ids, ``max_queries`` and
``seed``, so a calibration is reproducible, and the output says when it is a sample. A precision
near 0.95 measured on ``n`` accepted queries has a standard error of ``sqrt(0.95 * 0.05 / n)``,
about 0.006 for the ~1,500 accepted queries of a 2,000-item sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from edge_shitu.errors import InvalidDtypeError, InvalidInputError
from edge_shitu.search import check_codes, hamming_distances

__all__ = [
    "CalibrationOptions",
    "CurvePoint",
    "CalibrationResult",
    "calibrate",
    "calibrate_gallery",
]

# Query rows x gallery columns of one distance block: 4M int32 distances (16 MiB) plus three
# temporaries of the same size keep peak memory under ~60 MiB even for a million-item gallery.
_BLOCK_ROWS = 256
_BLOCK_COLUMNS = 16384


@dataclass(frozen=True)
class CalibrationOptions:
    """How a gallery is calibrated.

    Attributes:
      target_precision: precision the chosen threshold must reach, in ``(0, 1]``.
      max_queries: at most this many items are used as queries (sampled when the gallery is
        larger); None uses every item. Must be >= 1.
      seed: seed of the deterministic query sample.

    Raises:
      InvalidInputError: a value is out of range or of the wrong type.
    """

    target_precision: float = 0.95
    max_queries: Optional[int] = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        p = self.target_precision
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 < p <= 1:
            raise InvalidInputError(f"target_precision must be a number in (0, 1], got {p!r}")
        q = self.max_queries
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1):
            raise InvalidInputError(f"max_queries must be an integer >= 1 or None, got {q!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InvalidInputError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class CurvePoint:
    """The calibration curve at one threshold.

    Attributes:
      threshold: ``max_distance`` in bits.
      precision: correct accepts / all accepts; NaN when nothing is accepted.
      recall: correct accepts / known queries.
      accept_rate: accepted queries / all (known + unknown) queries.
      unknown_accept_rate: accepted unknown queries / unknown queries.
      correct: known queries accepted with the right label.
      wrong: known queries accepted with a wrong label.
      unknown: unknown queries accepted.
    """

    threshold: int
    precision: float
    recall: float
    accept_rate: float
    unknown_accept_rate: float
    correct: int
    wrong: int
    unknown: int


@dataclass(frozen=True)
class CalibrationResult:
    """Precision/recall of every threshold and the threshold chosen for the target precision.

    Curve arrays have one entry per threshold ``t = 0 .. bits`` (index = threshold); counts are
    cumulative (queries accepted at ``t``).

    Attributes:
      target_precision: the precision asked for.
      threshold: the chosen ``max_distance``, or None when no threshold reaches the target.
      bits: code length; thresholds run from 0 to ``bits``.
      precision: float64 ``(bits + 1,)``, NaN where nothing is accepted.
      recall: float64 ``(bits + 1,)``.
      accept_rate: float64 ``(bits + 1,)``.
      unknown_accept_rate: float64 ``(bits + 1,)``.
      correct: int64 ``(bits + 1,)``, known queries accepted with the right label.
      wrong: int64 ``(bits + 1,)``, known queries accepted with a wrong label.
      unknown: int64 ``(bits + 1,)``, unknown queries accepted.
      query_ids: int64 ``(q,)``, ascending ids of the items used as queries.
      items: gallery items.
      labels: distinct gallery labels.
      known_queries: leave-one-out queries (sampled items whose label has >= 2 items).
      unknown_queries: leave-one-class-out queries (every sampled item).
      sampled: whether the queries are a sample rather than every item.
      seed: seed of the sample.
      conflicts: int64 ``(c, 2)``, ``[query id, other id]`` for each sampled query whose code is
        identical to the code of an item with another label (the smallest such id). No threshold
        separates them: they are duplicates under two labels, to be relabelled or removed.
    """

    target_precision: float
    threshold: Optional[int]
    bits: int
    precision: np.ndarray
    recall: np.ndarray
    accept_rate: np.ndarray
    unknown_accept_rate: np.ndarray
    correct: np.ndarray
    wrong: np.ndarray
    unknown: np.ndarray
    query_ids: np.ndarray
    items: int
    labels: int
    known_queries: int
    unknown_queries: int
    sampled: bool
    seed: int
    conflicts: np.ndarray

    @property
    def reached(self) -> bool:
        """Whether some threshold reaches the target precision."""
        return self.threshold is not None

    @property
    def chosen(self) -> Optional[CurvePoint]:
        """The curve at the chosen threshold, or None when the target was not reached."""
        return None if self.threshold is None else self.point(self.threshold)

    def point(self, threshold: int) -> CurvePoint:
        """The curve at one threshold.

        Args:
          threshold: integer in ``[0, bits]``.

        Returns:
          The CurvePoint.

        Raises:
          InvalidInputError: ``threshold`` is not an integer in ``[0, bits]``.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= self.bits:
            raise InvalidInputError(f"threshold must be an integer in [0, {self.bits}], got {threshold!r}")
        t = int(threshold)
        return CurvePoint(
            threshold=t, precision=float(self.precision[t]), recall=float(self.recall[t]),
            accept_rate=float(self.accept_rate[t]), unknown_accept_rate=float(self.unknown_accept_rate[t]),
            correct=int(self.correct[t]), wrong=int(self.wrong[t]), unknown=int(self.unknown[t]),
        )

    def best_precision(self) -> Optional[CurvePoint]:
        """The point of highest precision (the largest such threshold), e.g. to explain an unreached target.

        Returns:
          The CurvePoint, or None when no threshold accepts anything.
        """
        defined = np.flatnonzero(~np.isnan(self.precision))
        if defined.size == 0:
            return None
        best = self.precision[defined].max()
        return self.point(int(defined[self.precision[defined] == best][-1]))


def _label_index(labels: Sequence[object], m: int) -> np.ndarray:
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise InvalidInputError(f"labels must be a sequence of {m} str, got {type(labels).__name__}")
    if len(labels) != m:
        raise InvalidInputError(f"labels must have one entry per code ({m}), got {len(labels)}")
    index: Dict[str, int] = {}
    out = np.empty(m, dtype=np.int64)
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise InvalidInputError(f"labels must be str, got {type(label).__name__} at position {i}")
        out[i] = index.setdefault(label, len(index))
    return out


def _check_ids(ids: object, m: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidDtypeError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != m:
        raise InvalidInputError(f"ids must have shape ({m},) (one per code), got {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if np.unique(arr).shape[0] != m:
        raise InvalidInputError("ids must be unique")
    return arr


def _sample(m: int, options: CalibrationOptions) -> np.ndarray:
    """Positions (into the id-sorted items) of the query items, ascending."""
    if options.max_queries is None or options.max_queries >= m:
        return np.arange(m, dtype=np.int64)
    rng = np.random.default_rng(options.seed)
    return np.sort(rng.choice(m, size=options.max_queries, replace=False)).astype(np.int64)


def _nearest(codes: np.ndarray, label_of: np.ndarray, queries: np.ndarray, bits: int):
    """For each query position: nearest other item of the same label and nearest item of another label.

    ``codes`` and ``label_of`` are in ascending id order, so the first minimum found (blocks in
    order, ``argmin`` within a block) is the one of smallest id: the gallery's tie-break.

    Returns:
      ``(same_dist, same_pos, other_dist, other_pos)``, int64 ``(q,)`` each; a distance of
      ``bits + 1`` and a position of -1 mean "no such item".
    """
    m = codes.shape[0]
    nq = queries.shape[0]
    none = bits + 1
    same_dist = np.full(nq, none, dtype=np.int64)
    other_dist = np.full(nq, none, dtype=np.int64)
    same_pos = np.full(nq, -1, dtype=np.int64)
    other_pos = np.full(nq, -1, dtype=np.int64)
    for r0 in range(0, nq, _BLOCK_ROWS):
        r1 = min(nq, r0 + _BLOCK_ROWS)
        qpos = queries[r0:r1]
        qcodes = codes[qpos]
        qlab = label_of[qpos]
        rows = np.arange(r1 - r0)
        for c0 in range(0, m, _BLOCK_COLUMNS):
            c1 = min(m, c0 + _BLOCK_COLUMNS)
            dist = hamming_distances(qcodes, codes[c0:c1])
            same = qlab[:, None] == label_of[None, c0:c1]
            d_same = np.where(same, dist, none)
            inside = (qpos >= c0) & (qpos < c1)
            d_same[rows[inside], qpos[inside] - c0] = none  # leave the query itself out
            d_other = np.where(same, none, dist)
            for d_block, best_dist, best_pos in ((d_same, same_dist, same_pos), (d_other, other_dist, other_pos)):
                j = d_block.argmin(axis=1)
                v = d_block[rows, j]
                better = v < best_dist[r0:r1]
                best_dist[r0:r1][better] = v[better]
                best_pos[r0:r1][better] = c0 + j[better]
    return same_dist, same_pos, other_dist, other_pos


def calibrate(
    ids: np.ndarray,
    codes: np.ndarray,
    labels: Sequence[str],
    *,
    options: Optional[CalibrationOptions] = None,
) -> CalibrationResult:
    """Measures the precision/recall curve of a gallery's codes and chooses ``max_distance``.

    See the module docstring for the exact definitions of the queries, the curve and the choice.

    Args:
      ids: integer ``(m,)``, unique item ids (they break ties between equal distances).
      codes: uint8 ``(m, nbytes)``, packed codes, row i the code of ``ids[i]``.
      labels: ``m`` str, the label of each item.
      options: target precision, query sample size and seed (defaults: 0.95, 2,000, 0).

    Returns:
      The CalibrationResult; its ``threshold`` is None when the target precision cannot be reached.

    Raises:
      InvalidDtypeError: ``codes`` is not a uint8 ndarray or ``ids`` are not integers.
      InvalidInputError: shapes disagree, ids repeat, a label is not a str, or fewer than two
        labels have two or more items (too few to measure anything).
    """
    options = options or CalibrationOptions()
    codes = check_codes(codes, None)
    m, nbytes = codes.shape
    bits = 8 * nbytes
    id_arr = _check_ids(ids, m)
    label_of = _label_index(labels, m)

    sizes = np.bincount(label_of)
    repeated = int((sizes >= 2).sum())
    if repeated < 2:
        raise InvalidInputError(
            f"cannot calibrate: {m} items with {sizes.shape[0]} labels, of which {repeated} have two or more items; "
            "at least two labels need two or more items each")

    if m > 1 and not np.all(id_arr[1:] > id_arr[:-1]):
        order = np.argsort(id_arr, kind="stable")
        id_arr, codes, label_of = id_arr[order], codes[order], label_of[order]
    queries = _sample(m, options)

    same_dist, same_pos, other_dist, other_pos = _nearest(codes, label_of, queries, bits)
    known = sizes[label_of[queries]] >= 2
    same_id = np.where(same_pos >= 0, id_arr[np.maximum(same_pos, 0)], -1)
    other_id = np.where(other_pos >= 0, id_arr[np.maximum(other_pos, 0)], -1)
    # Leave-one-out neighbour = the smaller of the two by (distance, id); the same-label one wins
    # the tie only with the smaller id, exactly as a search of the gallery would rank them.
    right = (same_dist < other_dist) | ((same_dist == other_dist) & (same_id < other_id))
    nn_dist = np.minimum(same_dist, other_dist)

    hist = lambda d: np.bincount(d, minlength=bits + 1)[: bits + 1].astype(np.int64)
    correct = np.cumsum(hist(nn_dist[known & right]))
    wrong = np.cumsum(hist(nn_dist[known & ~right]))
    unknown = np.cumsum(hist(other_dist))
    n_known, n_unknown = int(known.sum()), int(queries.shape[0])

    accepted = correct + wrong + unknown
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(accepted > 0, correct / np.maximum(accepted, 1), np.nan)
    recall = correct / n_known
    accept_rate = accepted / (n_known + n_unknown)
    unknown_rate = unknown / n_unknown

    target = float(options.target_precision)
    good = np.flatnonzero((accepted > 0) & (precision >= target))
    threshold = int(good[-1]) if good.size else None

    return CalibrationResult(
        target_precision=target, threshold=threshold, bits=bits,
        precision=precision, recall=recall, accept_rate=accept_rate, unknown_accept_rate=unknown_rate,
        correct=correct, wrong=wrong, unknown=unknown,
        query_ids=id_arr[queries], items=m, labels=int(sizes.shape[0]),
        known_queries=n_known, unknown_queries=n_unknown,
        sampled=queries.shape[0] < m, seed=int(options.seed),
        conflicts=np.stack([id_arr[queries], other_id], axis=1)[other_dist == 0],
    )


def calibrate_gallery(gallery, *, options: Optional[CalibrationOptions] = None, store: bool = False) -> CalibrationResult:
    """Calibrates a gallery on its own codes and, when asked, stores the chosen threshold in it.

    Once stored (one transaction, :meth:`Gallery.set_max_distance`), the recogniser uses it
    whenever no ``max_distance`` option is given.

    Args:
      gallery: an open :class:`edge_shitu.gallery.Gallery`.
      options: see :class:`CalibrationOptions`.
      store: store the chosen threshold; when the target is not reached nothing is stored and
        the gallery keeps its previous threshold.

    Returns:
      The CalibrationResult.

    Raises:
      InvalidInputError: the gallery is too small to calibrate (see :func:`calibrate`).
      GalleryError: the gallery is closed, or read-only while ``store`` is True.
    """
    ids, codes = gallery.codes()
    labels = gallery.labels_of(ids)
    result = calibrate(ids, codes, labels, options=options)
    if store and result.threshold is not None:
        gallery.set_max_distance(result.threshold)
    return result
