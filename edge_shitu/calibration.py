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

Re-ranked galleries. A gallery that keeps compact features (``compact="int8"|"fp16"``) is searched
by re-ranking (:meth:`Gallery.search` with features) and the recogniser accepts its best match when
the *similarity* is at least ``min_similarity``. :func:`calibrate_similarity` measures that rule
with the same queries: each query takes the Hamming top-``shortlist`` of the gallery without itself
(known) or without its label (unknown), re-ranked by the inner product of its own compact feature
(the query's float feature is not stored; its compact copy differs from it by the quantisation
error, far below the spread of similarities) with the candidates' compact features, exactly as
the search does. Over thresholds ``s`` on a grid of step :data:`SIMILARITY_STEP` from -1 to 1 a
query is accepted when its best similarity is ``>= s``; the choice is the *smallest* ``s`` whose
precision reaches the target (recall never increases with ``s``).

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
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.compact import CompactVectors, rerank_shortlist, unit_queries
from edge_shitu.errors import InvalidDtypeError, InvalidInputError
from edge_shitu.gallery import DEFAULT_SHORTLIST
from edge_shitu.search import check_codes, hamming_distances

__all__ = [
    "CalibrationOptions",
    "CurvePoint",
    "CalibrationResult",
    "calibrate",
    "calibrate_similarity",
    "calibrate_gallery",
    "store_threshold",
    "SIMILARITY_STEP",
]

# Query rows x gallery columns of one distance block: 4M int32 distances (16 MiB) plus three
# temporaries of the same size keep peak memory under ~60 MiB even for a million-item gallery.
_BLOCK_ROWS = 256
_BLOCK_COLUMNS = 16384

SIMILARITY_STEP = 0.005
"""Spacing of the similarity thresholds of :func:`calibrate_similarity` (401 thresholds from -1 to 1)."""
_SIMILARITY_GRID = np.round(np.linspace(-1.0, 1.0, int(round(2 / SIMILARITY_STEP)) + 1), 3)


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
      threshold: ``max_distance`` in bits (metric "distance"), or ``min_similarity`` (metric "similarity").
      precision: correct accepts / all accepts; NaN when nothing is accepted.
      recall: correct accepts / known queries.
      accept_rate: accepted queries / all (known + unknown) queries.
      unknown_accept_rate: accepted unknown queries / unknown queries.
      correct: known queries accepted with the right label.
      wrong: known queries accepted with a wrong label.
      unknown: unknown queries accepted.
    """

    threshold: Union[int, float]
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

    Curve arrays have one entry per threshold of :attr:`thresholds` (``t = 0 .. bits`` for the metric
    "distance", where index = threshold; the similarity grid for "similarity"); counts are the
    queries accepted at each threshold.

    Attributes:
      target_precision: the precision asked for.
      threshold: the chosen ``max_distance`` (int) or ``min_similarity`` (float), or None when no
        threshold reaches the target.
      bits: code length.
      precision: float64 ``(t,)``, NaN where nothing is accepted.
      recall: float64 ``(t,)``.
      accept_rate: float64 ``(t,)``.
      unknown_accept_rate: float64 ``(t,)``.
      correct: int64 ``(t,)``, known queries accepted with the right label.
      wrong: int64 ``(t,)``, known queries accepted with a wrong label.
      unknown: int64 ``(t,)``, unknown queries accepted.
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
      metric: ``"distance"`` (accept when the nearest Hamming distance is ``<= max_distance``) or
        ``"similarity"`` (accept when the best re-ranked similarity is ``>= min_similarity``).
      thresholds: the thresholds of the curve, ascending: int64 ``0 .. bits`` or float64 similarities.
      shortlist: Hamming candidates re-ranked per query (metric "similarity"), else None.
    """

    target_precision: float
    threshold: Optional[Union[int, float]]
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
    metric: str = "distance"
    thresholds: Optional[np.ndarray] = None
    shortlist: Optional[int] = None

    def __post_init__(self) -> None:
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", np.arange(self.bits + 1, dtype=np.int64))

    @property
    def reached(self) -> bool:
        """Whether some threshold reaches the target precision."""
        return self.threshold is not None

    @property
    def chosen(self) -> Optional[CurvePoint]:
        """The curve at the chosen threshold, or None when the target was not reached."""
        return None if self.threshold is None else self.point(self.threshold)

    def point(self, threshold: Union[int, float]) -> CurvePoint:
        """The curve at one threshold.

        Args:
          threshold: metric "distance": an integer in ``[0, bits]``; metric "similarity": one of
            :attr:`thresholds` (a multiple of :data:`SIMILARITY_STEP` in ``[-1, 1]``).

        Returns:
          The CurvePoint.

        Raises:
          InvalidInputError: ``threshold`` is not one of the curve's thresholds.
        """
        if self.metric == "distance":
            if (isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer))
                    or not 0 <= threshold <= self.bits):
                raise InvalidInputError(f"threshold must be an integer in [0, {self.bits}], got {threshold!r}")
            return self._point_at(int(threshold))
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
            raise InvalidInputError(f"threshold must be a number, got {threshold!r}")
        at = np.flatnonzero(np.abs(self.thresholds - float(threshold)) < 1e-9)
        if at.size != 1:
            raise InvalidInputError(f"threshold must be a multiple of {SIMILARITY_STEP} in [-1, 1], got {threshold!r}")
        return self._point_at(int(at[0]))

    def _point_at(self, i: int) -> CurvePoint:
        t = self.thresholds[i]
        return CurvePoint(
            threshold=int(t) if self.metric == "distance" else float(t), precision=float(self.precision[i]),
            recall=float(self.recall[i]), accept_rate=float(self.accept_rate[i]),
            unknown_accept_rate=float(self.unknown_accept_rate[i]),
            correct=int(self.correct[i]), wrong=int(self.wrong[i]), unknown=int(self.unknown[i]),
        )

    def best_precision(self) -> Optional[CurvePoint]:
        """The point of highest precision (the most accepting such threshold), e.g. to explain an unreached
        target.

        Returns:
          The CurvePoint, or None when no threshold accepts anything.
        """
        defined = np.flatnonzero(~np.isnan(self.precision))
        if defined.size == 0:
            return None
        best = self.precision[defined].max()
        at = defined[self.precision[defined] == best]
        return self._point_at(int(at[-1] if self.metric == "distance" else at[0]))


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
    id_arr, codes, label_of, sizes, order = _prepare(ids, codes, labels)
    bits = 8 * codes.shape[1]
    queries = _sample(codes.shape[0], options)

    same_dist, same_pos, other_dist, other_pos = _nearest(codes, label_of, queries, bits)
    known = sizes[label_of[queries]] >= 2
    same_id = np.where(same_pos >= 0, id_arr[np.maximum(same_pos, 0)], -1)
    other_id = np.where(other_pos >= 0, id_arr[np.maximum(other_pos, 0)], -1)
    # Leave-one-out neighbour = the smaller of the two by (distance, id); the same-label one wins
    # the tie only with the smaller id, exactly as a search of the gallery would rank them.
    right = (same_dist < other_dist) | ((same_dist == other_dist) & (same_id < other_id))
    nn_dist = np.minimum(same_dist, other_dist)

    hist = lambda d: np.bincount(d, minlength=bits + 1)[: bits + 1].astype(np.int64)
    counts = (np.cumsum(hist(nn_dist[known & right])), np.cumsum(hist(nn_dist[known & ~right])),
              np.cumsum(hist(other_dist)))
    conflicts = np.stack([id_arr[queries], other_id], axis=1)[other_dist == 0]
    return _result(options, "distance", np.arange(bits + 1, dtype=np.int64), counts, bits=bits, id_arr=id_arr,
                   queries=queries, known=known, sizes=sizes, conflicts=conflicts, shortlist=None)


def calibrate_similarity(
    ids: np.ndarray,
    codes: np.ndarray,
    labels: Sequence[str],
    vectors: CompactVectors,
    *,
    shortlist: int = DEFAULT_SHORTLIST,
    options: Optional[CalibrationOptions] = None,
) -> CalibrationResult:
    """Measures the precision/recall curve of re-ranked search and chooses ``min_similarity``.

    The queries and the choice are those of :func:`calibrate`, with the recogniser's rule for
    galleries that keep compact features (see the module docstring): the Hamming top-``shortlist``
    re-ranked by compact features, accepted when the best similarity is ``>= min_similarity``.

    Args:
      ids: integer ``(m,)``, unique item ids (they break ties between equal distances).
      codes: uint8 ``(m, nbytes)``, packed codes, row i the code of ``ids[i]``.
      labels: ``m`` str, the label of each item.
      vectors: the ``m`` compact features, row i the feature of ``ids[i]``.
      shortlist: Hamming candidates re-ranked per query, >= 1 (the gallery's default).
      options: target precision, query sample size and seed (defaults: 0.95, 2,000, 0).

    Returns:
      The CalibrationResult, metric "similarity"; its ``threshold`` is None when the target precision
      cannot be reached.

    Raises:
      InvalidDtypeError: ``codes`` is not a uint8 ndarray or ``ids`` are not integers.
      InvalidInputError: shapes disagree, ids repeat, a label is not a str, ``vectors`` are not
        CompactVectors of ``m`` rows, ``shortlist`` < 1, or fewer than two labels have two or more items.
    """
    options = options or CalibrationOptions()
    if isinstance(shortlist, bool) or not isinstance(shortlist, (int, np.integer)) or shortlist < 1:
        raise InvalidInputError(f"shortlist must be an integer >= 1, got {shortlist!r}")
    if not isinstance(vectors, CompactVectors):
        raise InvalidInputError(f"vectors must be CompactVectors, got {type(vectors).__name__}")
    if len(vectors) != np.shape(codes)[0]:
        raise InvalidInputError(f"vectors must have one row per code ({np.shape(codes)[0]}), got {len(vectors)}")
    id_arr, codes, label_of, sizes, order = _prepare(ids, codes, labels)
    if order is not None:
        vectors = vectors.take(order)
    bits = 8 * codes.shape[1]
    queries = _sample(codes.shape[0], options)

    known_list, unknown_list = _shortlists(codes, label_of, queries, int(shortlist))
    # The query's float feature is not stored: its compact copy stands for it, normalised as the search does.
    unit = unit_queries(vectors.take(queries).dequantize())
    known_pos, known_sim = rerank_shortlist(known_list[0], unit, vectors, 1)
    unknown_pos, unknown_sim = rerank_shortlist(unknown_list[0], unit, vectors, 1)

    known = (sizes[label_of[queries]] >= 2) & (known_pos[:, 0] >= 0)
    right = known_pos[:, 0] >= 0
    right[right] = label_of[known_pos[right, 0]] == label_of[queries[right]]
    thresholds = _SIMILARITY_GRID

    def accepted_at(values: np.ndarray) -> np.ndarray:
        # The recogniser's rule, sim >= s, in float64 as it compares them.
        ordered = np.sort(values.astype(np.float64))
        return (ordered.shape[0] - np.searchsorted(ordered, thresholds, side="left")).astype(np.int64)

    counts = (accepted_at(known_sim[known & right, 0]), accepted_at(known_sim[known & ~right, 0]),
              accepted_at(unknown_sim[unknown_pos[:, 0] >= 0, 0]))
    # Identical codes under two labels: the unknown shortlist's first Hamming candidate at distance 0.
    twins = unknown_list[1][:, 0] == 0
    conflicts = np.stack([id_arr[queries], np.where(twins, id_arr[np.maximum(unknown_list[0][:, 0], 0)], -1)],
                         axis=1)[twins]
    return _result(options, "similarity", thresholds, counts, bits=bits, id_arr=id_arr, queries=queries,
                   known=known, sizes=sizes, conflicts=conflicts, shortlist=int(shortlist))


def _prepare(ids: np.ndarray, codes: np.ndarray, labels: Sequence[str]):
    """Checked inputs in ascending id order: ``(ids, codes, label numbers, label sizes, order)``; order is
    the permutation applied, or None when the ids were ascending already."""
    codes = check_codes(codes, None)
    m = codes.shape[0]
    id_arr = _check_ids(ids, m)
    label_of = _label_index(labels, m)
    sizes = np.bincount(label_of)
    repeated = int((sizes >= 2).sum())
    if repeated < 2:
        raise InvalidInputError(
            f"cannot calibrate: {m} items with {sizes.shape[0]} labels, of which {repeated} have two or more items; "
            "at least two labels need two or more items each")
    order = None
    if m > 1 and not np.all(id_arr[1:] > id_arr[:-1]):
        order = np.argsort(id_arr, kind="stable")
        id_arr, codes, label_of = id_arr[order], codes[order], label_of[order]
    return id_arr, codes, label_of, sizes, order


def _result(options: CalibrationOptions, metric: str, thresholds: np.ndarray,
            counts: Tuple[np.ndarray, np.ndarray, np.ndarray], *, bits: int, id_arr: np.ndarray,
            queries: np.ndarray, known: np.ndarray, sizes: np.ndarray, conflicts: np.ndarray,
            shortlist: Optional[int]) -> CalibrationResult:
    """The curve from the accepted counts at each threshold, and the most accepting threshold that keeps
    the target precision (the largest distance, or the smallest similarity)."""
    correct, wrong, unknown = counts
    n_known, n_unknown = int(known.sum()), int(queries.shape[0])
    accepted = correct + wrong + unknown
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(accepted > 0, correct / np.maximum(accepted, 1), np.nan)
    recall = correct / max(n_known, 1)
    accept_rate = accepted / (n_known + n_unknown)
    unknown_rate = unknown / n_unknown

    target = float(options.target_precision)
    good = np.flatnonzero((accepted > 0) & (precision >= target))
    threshold: Optional[Union[int, float]] = None
    if good.size:
        threshold = int(thresholds[good[-1]]) if metric == "distance" else float(thresholds[good[0]])
    return CalibrationResult(
        target_precision=target, threshold=threshold, bits=bits,
        precision=precision, recall=recall, accept_rate=accept_rate, unknown_accept_rate=unknown_rate,
        correct=correct, wrong=wrong, unknown=unknown,
        query_ids=id_arr[queries], items=int(id_arr.shape[0]), labels=int(sizes.shape[0]),
        known_queries=n_known, unknown_queries=n_unknown,
        sampled=queries.shape[0] < id_arr.shape[0], seed=int(options.seed),
        conflicts=conflicts, metric=metric, thresholds=thresholds, shortlist=shortlist,
    )


def _shortlists(codes: np.ndarray, label_of: np.ndarray, queries: np.ndarray, n: int):
    """Each query's Hamming top-``n`` among all other items (known) and among the items of other labels
    (unknown), ordered by (distance, position) as :meth:`Gallery.search` orders them.

    Returns:
      ``((known_pos, known_dist), (unknown_pos, unknown_dist))``, int64 ``(q, n')`` each with
      ``n' = min(n, m)``; position -1 and distance -1 where there are fewer candidates.
    """
    m = codes.shape[0]
    nq = queries.shape[0]
    width = min(n, m)
    none = np.iinfo(np.int64).max
    # One key per (distance, position): unique, so a partial sort picks exactly the top n, ties by position.
    best = [np.full((nq, width), none, np.int64), np.full((nq, width), none, np.int64)]
    for r0 in range(0, nq, _BLOCK_ROWS):
        r1 = min(nq, r0 + _BLOCK_ROWS)
        qpos = queries[r0:r1]
        qlab = label_of[qpos]
        rows = np.arange(r1 - r0)
        for c0 in range(0, m, _BLOCK_COLUMNS):
            c1 = min(m, c0 + _BLOCK_COLUMNS)
            key = hamming_distances(codes[qpos], codes[c0:c1]).astype(np.int64) * m + np.arange(c0, c1)
            others = key.copy()
            inside = (qpos >= c0) & (qpos < c1)
            others[rows[inside], qpos[inside] - c0] = none  # leave the query itself out
            strangers = np.where(qlab[:, None] == label_of[None, c0:c1], none, key)
            for held, block in zip(best, (others, strangers)):
                merged = np.concatenate([held[r0:r1], block], axis=1)
                held[r0:r1] = np.sort(np.partition(merged, width - 1, axis=1)[:, :width], axis=1)
    out = []
    for held in best:
        valid = held != none
        out.append((np.where(valid, held % m, -1), np.where(valid, held // m, -1)))
    return out[0], out[1]


def calibrate_gallery(gallery, *, options: Optional[CalibrationOptions] = None, store: bool = False) -> CalibrationResult:
    """Calibrates a gallery on its own items and, when asked, stores the chosen threshold in it.

    A gallery that keeps compact features is calibrated for re-ranked search (``min_similarity``,
    :func:`calibrate_similarity`), any other for Hamming search (``max_distance``, :func:`calibrate`):
    the rule the recogniser applies to it. Once stored (one transaction), the recogniser uses the
    threshold whenever no option overrides it.

    Args:
      gallery: an open :class:`edge_shitu.gallery.Gallery`.
      options: see :class:`CalibrationOptions`.
      store: store the chosen threshold; when the target is not reached nothing is stored and
        the gallery keeps its previous threshold.

    Returns:
      The CalibrationResult (metric "similarity" or "distance").

    Raises:
      InvalidInputError: the gallery is too small to calibrate (see :func:`calibrate`).
      GalleryError: the gallery is closed, or read-only while ``store`` is True.
    """
    if gallery.compact is not None:
        ids, codes, vectors = gallery.compact_features()
        if vectors is None:
            raise InvalidInputError(f"{gallery.path or 'the gallery'}: cannot calibrate an empty gallery")
        result = calibrate_similarity(ids, codes, gallery.labels_of(ids), vectors, options=options)
    else:
        ids, codes = gallery.codes()
        result = calibrate(ids, codes, gallery.labels_of(ids), options=options)
    if store:
        store_threshold(gallery, result)
    return result


def store_threshold(gallery, result: CalibrationResult) -> bool:
    """Stores a calibration's chosen threshold in the gallery it was measured on.

    Returns:
      Whether something was stored (False when the target was not reached).

    Raises:
      InvalidInputError: the result's metric is not the one the gallery's search uses.
      GalleryError: the gallery is read-only or closed, or the write failed.
    """
    wanted = "similarity" if gallery.compact is not None else "distance"
    if result.metric != wanted:
        raise InvalidInputError(f"a {result.metric} calibration does not apply to a gallery searched by {wanted}")
    if result.threshold is None:
        return False
    if result.metric == "similarity":
        gallery.set_min_similarity(float(result.threshold))
    else:
        gallery.set_max_distance(int(result.threshold))
    return True
