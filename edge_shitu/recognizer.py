"""The whole pipeline: detect -> crop -> one batched embed call -> search -> accept -> final NMS.

The search is the gallery's exhaustive Hamming search (re-ranked by compact features when the gallery
keeps them), or with ``search_backend="hnsw"`` an HNSW inner-product search of the gallery's stored
float embeddings (:class:`~edge_shitu.float_index.FloatIndex`).
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from edge_shitu.boxes import nms
from edge_shitu.bundle import Bundle
from edge_shitu.detector import Detector
from edge_shitu.embedder import Embedder
from edge_shitu.errors import ClosedError, FingerprintMismatchError, GalleryError, MissingEmbeddingsError
from edge_shitu.gallery import Gallery
from edge_shitu.image import crop, load_image
from edge_shitu.options import DEFAULT_MIN_SIMILARITY, RecognizerOptions
from edge_shitu.search import hamming_distances
from edge_shitu.types import Detection, Match, Recognition, RecognitionResult, SearchResult, WholeImagePolicy

if TYPE_CHECKING:
    from edge_shitu.float_index import FloatIndex

__all__ = ["Recognizer", "STAGES"]

STAGES = ("decode", "det_pre", "det_infer", "det_post", "rec_pre", "rec_infer", "rec_post", "search", "nms", "total")
"""Keys of :attr:`RecognitionResult.timings_ms`, in pipeline order."""


class _Clock:
    def __init__(self) -> None:
        self.ms: Dict[str, float] = {k: 0.0 for k in STAGES}
        self._start = self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] += (now - self._last) * 1000.0
        self._last = now

    def finish(self) -> Dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.ms


class _FloatSearch(NamedTuple):
    """An HNSW index and the codes of the gallery state it was built from, in the index's id order."""

    index: "FloatIndex"
    ids: np.ndarray  # int64 (m,), ascending
    codes: np.ndarray  # uint8 (m, bits // 8), row i the code of ids[i]


# A gallery changed by another process while its index and codes are read gives them from two states:
# they are read again, and a gallery changing faster than this is not one to index.
_FLOAT_ATTEMPTS = 3


class Recognizer:
    """Recognises objects on images against a gallery. Build it with :meth:`from_bundle`."""

    def __init__(self, bundle: Bundle, detector: Optional[Detector], embedder: Embedder, gallery: Gallery,
                 options: RecognizerOptions, *, owns_gallery: bool = False) -> None:
        """A recogniser of stages already made (e.g. with injected sessions); :meth:`from_bundle` makes them.

        With ``options.search_backend == "hnsw"`` the float index of the gallery is loaded, or built
        and saved beside the gallery, here.

        Raises:
          FingerprintMismatchError: the gallery's codes, or its stored embeddings, were made by another
            extractor.
          MissingEmbeddingsError: ``"hnsw"`` and some items have no stored embedding.
          BackendUnavailableError: ``"hnsw"`` and hnswlib is not installed.
        """
        if gallery.fingerprint != bundle.code_fingerprint:
            raise FingerprintMismatchError(
                f"{gallery.path}: gallery codes were made by model {gallery.fingerprint}, but bundle "
                f"{bundle.path} makes {bundle.code_fingerprint}; rebuild the gallery with this bundle"
            )
        self.bundle = bundle
        self.detector = detector
        self.embedder = embedder
        self.gallery = gallery
        rec = bundle.recognition
        self.options = options.with_defaults(
            {"top_k": rec.top_k, "whole_image": rec.whole_image, "final_nms_iou": rec.final_nms_iou},
            None if bundle.detector is None else bundle.detector.defaults)
        # A detector threshold given by the caller wins over the gallery's stored one, which wins over the
        # bundle's default; only the caller's own value (not the merged one) can tell these apart.
        self._given_min_score = None if options.detector is None else options.detector.min_score
        self._owns_gallery = owns_gallery
        self._closed = False
        self._float_lock = threading.Lock()
        self._float: Optional[_FloatSearch] = None
        if self.options.search_backend == "hnsw":
            stored = gallery.info().embedding_fingerprint
            if stored is not None and stored != bundle.embedding_fingerprint:
                raise FingerprintMismatchError(
                    f"{gallery.path}: its stored embeddings were made by extractor {stored}, but bundle "
                    f"{bundle.path} makes {bundle.embedding_fingerprint}; rebuild the gallery with this bundle")
            self._float = self._open_float_index()

    @classmethod
    def from_bundle(cls, bundle, gallery: Union[str, os.PathLike, Gallery], *,
                    options: Optional[RecognizerOptions] = None) -> "Recognizer":
        """Create a recogniser.

        Args:
          bundle: a bundle directory or a loaded :class:`Bundle`. Without a detector model, every image
            is recognised whole.
          gallery: a gallery file (opened read-only) or an open :class:`Gallery`.
          options: pipeline settings; every field left at None (or ``None`` for all) takes the
            bundle's default, field by field (:meth:`RecognizerOptions.with_defaults`).

        Raises:
          MissingFileError, BundleError, IntegrityError: the bundle or gallery is missing or damaged.
          FingerprintMismatchError: the gallery was built with another extractor.
          BackendUnavailableError: the backend is not installed (for ``search_backend="hnsw"``: hnswlib,
            ``pip install "edge-shitu[hnsw]"``).
          MissingEmbeddingsError: ``search_backend="hnsw"`` and the gallery does not store the float
            embedding of every item (it was built without ``--keep-embeddings``).
        """
        bundle = Bundle.load(bundle)
        options = options or RecognizerOptions()
        owns = not isinstance(gallery, Gallery)
        if owns:
            # "hnsw" searches the embeddings; the codes (for the matches' distances) need no fast backend.
            hamming = "auto" if options.search_backend == "hnsw" else options.search_backend
            gallery = Gallery.open(gallery, fingerprint=bundle.code_fingerprint, readonly=True, backend=hamming)
        detector = embedder = None
        try:
            if bundle.detector is not None:
                detector = Detector.from_bundle(bundle, options=options.detector)
            embedder = Embedder.from_bundle(bundle, options=options.embedder)
            return cls(bundle, detector, embedder, gallery, options, owns_gallery=owns)
        except BaseException:
            if detector is not None:
                detector.close()
            if embedder is not None:
                embedder.close()
            if owns:
                gallery.close()
            raise

    @property
    def max_distance(self) -> int:
        """Acceptance radius in bits: the option, else the gallery's calibrated value, else the bundle default."""
        if self.options.max_distance is not None:
            return self.options.max_distance
        if self.gallery.max_distance is not None:
            return int(self.gallery.max_distance)
        return self.bundle.recognition.max_distance

    @property
    def reranks(self) -> bool:
        """Whether the Hamming matches are re-ranked by the gallery's compact features (and accepted by similarity)."""
        return self.gallery.compact is not None and self._float is None

    @property
    def float_index(self) -> Optional["FloatIndex"]:
        """The HNSW index searched with ``search_backend="hnsw"`` (the one of the gallery as last seen), else None."""
        return None if self._float is None else self._float.index

    @property
    def accepts_by_similarity(self) -> bool:
        """Whether matches are accepted (and the final NMS ranks them) by :attr:`min_similarity` rather than
        by :attr:`max_distance`: with re-ranked or HNSW search."""
        return self._float is not None or self.reranks

    @property
    def min_similarity(self) -> float:
        """Acceptance threshold of re-ranked and HNSW search: the option, else the gallery's calibrated value,
        else :data:`~edge_shitu.options.DEFAULT_MIN_SIMILARITY`."""
        if self.options.min_similarity is not None:
            return float(self.options.min_similarity)
        if self.gallery.min_similarity is not None:
            return float(self.gallery.min_similarity)
        return DEFAULT_MIN_SIMILARITY

    @property
    def det_threshold(self) -> Optional[float]:
        """Minimum detector box score: the option, else the gallery's stored value, else the bundle default.

        None when the bundle has no detector.
        """
        if self.detector is None:
            return None
        if self._given_min_score is not None:
            return float(self._given_min_score)
        if self.gallery.det_threshold is not None:
            return float(self.gallery.det_threshold)
        return float(self.detector.options.min_score)

    def recognize(self, image) -> RecognitionResult:
        """Recognise the objects on one image.

        Args:
          image: a path, bytes, PIL image or uint8 (H, W, 3) RGB array.

        Returns:
          The accepted regions, best match first, and per-stage timings (keys :data:`STAGES`).

        Raises:
          MissingFileError, ImageDecodeError: the image cannot be read.
          InvalidInputError, InvalidDtypeError: an array input has the wrong shape or dtype.
          ClosedError: the recogniser was closed.
          MissingEmbeddingsError: ``search_backend="hnsw"`` and items without a stored embedding were
            added to the gallery since.
        """
        if self._closed:
            raise ClosedError("this recognizer is closed; create a new one with Recognizer.from_bundle")
        clock = _Clock()
        img = load_image(image, max_pixels=self.options.max_pixels)
        h, w = img.shape[:2]
        clock.lap("decode")

        regions: List[Tuple[Tuple[float, float, float, float], float, bool]] = []
        if self.detector is not None:
            regions = [(d.box, d.score, False) for d in self._detect(img, clock)]
        policy = self.options.whole_image
        if self.detector is None or policy is WholeImagePolicy.ALWAYS or (policy is WholeImagePolicy.IF_NONE and not regions):
            regions.append(((0.0, 0.0, float(w), float(h)), 1.0, True))
        if not regions:
            return RecognitionResult(w, h, (), clock.finish())

        batch = self.embedder.preprocess([crop(img, box) for box, _, _ in regions])
        clock.lap("rec_pre")
        feats = self.embedder.infer(batch)
        clock.lap("rec_infer")
        feats = self.embedder.postprocess(feats)
        codes = self.embedder.encode(feats)
        clock.lap("rec_post")
        if self._float is not None:
            found = self._search_float(codes, feats)
        else:
            found = self.gallery.search(codes, k=self.options.top_k, features=feats if self.reranks else None)
        recognitions = self._assemble(regions, found)
        clock.lap("search")
        result = self._final_nms(recognitions)
        clock.lap("nms")
        return RecognitionResult(w, h, tuple(result), clock.finish())

    def detect(self, image: np.ndarray) -> List[Detection]:
        """The detector's boxes of one RGB uint8 ``(H, W, 3)`` image at :attr:`det_threshold`, best first;
        empty for a bundle without a detector.

        Raises:
          InvalidInputError, InvalidDtypeError: not such an array.
          ClosedError: the recogniser was closed.
        """
        if self._closed:
            raise ClosedError("this recognizer is closed; create a new one with Recognizer.from_bundle")
        return [] if self.detector is None else self._detect(load_image(image), _Clock())

    def _detect(self, img: np.ndarray, clock: _Clock) -> List[Detection]:
        h, w = img.shape[:2]
        tensor, scale = self.detector.preprocess(img)
        clock.lap("det_pre")
        raw = self.detector.infer(tensor)
        clock.lap("det_infer")
        found = self.detector.postprocess(raw, image_size=(w, h), scale=scale, min_score=self.det_threshold)
        clock.lap("det_post")
        return found

    def _open_float_index(self) -> _FloatSearch:
        """The float index of the gallery as it is now, with the codes of that same state.

        Raises:
          MissingEmbeddingsError, BackendUnavailableError: as :meth:`FloatIndex.for_gallery`.
          GalleryError: the gallery cannot be read, or changed at every one of a few attempts to read it.
        """
        from edge_shitu.float_index import FloatIndex

        for _ in range(_FLOAT_ATTEMPTS):
            before = self.gallery.generation
            ids, codes = self.gallery.codes()
            try:
                index = FloatIndex.for_gallery(self.gallery, options=self.options.float_index)
            except MissingEmbeddingsError as exc:
                raise MissingEmbeddingsError(f"search_backend 'hnsw' searches stored embeddings: {exc}") from exc
            # The generation moves with every change of the items: equal on both sides of the read of the
            # codes and in the index, all three describe one state of the gallery.
            if index.generation == before == self.gallery.generation:
                return _FloatSearch(index, ids, codes)
            index.close()
        raise GalleryError(f"{self.gallery.path}: the gallery changed while its float index was read, "
                           f"{_FLOAT_ATTEMPTS} times; try again when it is not being written")

    def _current_float(self) -> _FloatSearch:
        """The float index, rebuilt first when the gallery changed since it was made (never searched stale)."""
        with self._float_lock:
            if self._float.index.stale(self.gallery) is not None:
                # The old index is dropped, not closed: another thread may still be searching it.
                self._float = self._open_float_index()
            return self._float

    def _search_float(self, codes: np.ndarray, feats: np.ndarray) -> SearchResult:
        """Top-k of each region by HNSW inner product, with the Hamming distance of every candidate."""
        current = self._current_float()
        k = self.options.top_k
        n = feats.shape[0]
        ids = np.full((n, k), -1, dtype=np.int64)
        similarities = np.full((n, k), np.nan, dtype=np.float32)
        # The embedder turns an all-zero feature into zeros, which have no direction to compare: such a
        # region has no candidate (as an empty gallery gives), rather than failing the image.
        rows = np.flatnonzero(np.any(feats != 0, axis=1))
        if rows.size:
            ids[rows], similarities[rows] = current.index.search(np.ascontiguousarray(feats[rows], np.float32), k)
        distances = np.full((n, k), -1, dtype=np.int32)
        for row in range(n):
            real = ids[row] >= 0
            if real.any():
                at = np.searchsorted(current.ids, ids[row, real])
                distances[row, real] = hamming_distances(codes[row], current.codes[at])[0]
        return SearchResult(ids=ids, distances=distances, counts=(ids >= 0).sum(axis=1).astype(np.int64),
                            similarities=similarities)

    def _assemble(self, regions, found) -> List[Recognition]:
        bits = self.gallery.bits
        wanted = sorted({int(i) for i in found.ids.ravel() if i >= 0})
        labels = dict(zip(wanted, self.gallery.labels_of(wanted)))
        out = []
        sims = found.similarities
        for row, ((box, score, whole), ids, dists, count) in enumerate(zip(regions, found.ids, found.distances,
                                                                           found.counts)):
            # An item removed by another process since the search has no label any more: not a match.
            cands = tuple(Match(int(i), labels[int(i)], int(d),
                                1.0 - int(d) / bits if sims is None else float(sims[row, j]))
                          for j, (i, d) in enumerate(zip(ids[:count], dists[:count])) if labels[int(i)] is not None)
            best = cands[0] if cands else None
            if sims is None:
                accepted = best is not None and best.distance <= self.max_distance
            else:
                accepted = best is not None and best.similarity >= self.min_similarity
            if not accepted and not self.options.include_unknown:
                continue
            out.append(Recognition(
                box=tuple(float(v) for v in box),
                label=best.label if accepted else None,
                distance=best.distance if best else None,
                similarity=best.similarity if best else None,
                detection_score=float(score),
                whole_image=whole,
                candidates=cands,
            ))
        return out

    def _final_nms(self, recognitions: List[Recognition]) -> List[Recognition]:
        known = [r for r in recognitions if r.label is not None]
        unknown = [r for r in recognitions if r.label is None]
        if not known:
            return unknown
        boxes = np.array([r.box for r in known], dtype=np.float64)
        # Best match = smallest distance (the reference sorts Hamming results the wrong way round), or the
        # largest similarity of re-ranked or HNSW search; the detector score breaks ties.
        closeness = (np.array([-r.similarity for r in known]) if self.accepts_by_similarity
                     else np.array([r.distance for r in known]))
        order = np.lexsort((-np.array([r.detection_score for r in known]), closeness))
        keep = nms(boxes, order, self.options.final_nms_iou)
        return [known[i] for i in keep] + unknown

    def close(self) -> None:
        """Release the sessions, the float index and, when the recogniser opened it, the gallery. Calling it
        twice is harmless."""
        self._closed = True
        if self.detector is not None:
            self.detector.close()
        self.embedder.close()
        if self._float is not None:
            self._float.index.close()
        if self._owns_gallery:
            self.gallery.close()

    def __enter__(self) -> "Recognizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
