"""What the kiosk does, without HTTP: recognise, enrol, browse and edit the gallery, settings, calibration.

:class:`KioskService` owns one bundle's models and one writable gallery. Every call that touches the
models or the gallery holds one lock, so a recognition sees the gallery before or after an enrolment,
never half of one, and the model sessions never run two images at once (on a small device two at once
only share the same cores). Each change is one gallery transaction. Results are plain JSON-ready dicts:
the HTTP layer (:mod:`edge_shitu.kiosk.app`) only maps them and this module's errors to responses, and the
Android app's Python side (``android_demo/app/src/main/python/shitu_android.py``) to JSON strings. Nothing here
imports the web stack.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu import __version__
from edge_shitu.bundle import Bundle
from edge_shitu.calibration import CalibrationOptions, calibrate_gallery
from edge_shitu.compact import COMPACT_FORMATS
from edge_shitu.errors import EdgeShituError, InvalidInputError
from edge_shitu.gallery import Gallery
from edge_shitu.image import DEFAULT_MAX_PIXELS, crop, load_image
from edge_shitu.labelfile import check_label
from edge_shitu.options import BackendOptions, DetectorOptions, EmbedderOptions, RecognizerOptions
from edge_shitu.recognizer import Recognizer
from edge_shitu.records import box_list, result_record
from edge_shitu.thumbnail import make_thumbnail

__all__ = ["KioskService", "ServiceOptions", "NotFoundError", "MAX_PAGE"]

MAX_PAGE = 500
"""Most items one :meth:`KioskService.items` call returns."""

DEFAULT_PAGE = 100
# Smallest box side enrolled, in pixels: a crop below it carries nothing the extractor can use.
_MIN_BOX_SIDE = 2.0


class NotFoundError(EdgeShituError, KeyError):
    """No gallery item or label with that id or name."""

    def __str__(self) -> str:  # KeyError quotes its argument; this is a sentence
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ServiceOptions:
    """How the kiosk runs its models.

    Attributes:
      threads: intra-op threads of each model session; None lets the backend choose (all cores).
      max_pixels: images with more pixels are refused from their header, before decoding.
      top_k: gallery candidates returned per region.
      backend: inference backend name (see :class:`~edge_shitu.options.BackendOptions`); None takes the
        bundle's, ``"android"`` runs its ONNX models in ONNX Runtime for Android (the Chaquopy app).
      compact: the compact features a gallery the kiosk *creates* keeps (``"int8"``, ``"fp16"``, or None
        for codes only); an existing gallery keeps its own form. int8 by default: re-ranked search gives
        float search's recall@1 for 516 bytes per item, nothing on a kiosk's gallery.

    Raises:
      InvalidInputError: a value out of range.
    """

    threads: Optional[int] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    top_k: int = 5
    backend: Optional[str] = None
    compact: Optional[str] = "int8"

    def __post_init__(self) -> None:
        if self.compact is not None and self.compact not in COMPACT_FORMATS:
            raise InvalidInputError(f"compact must be one of {', '.join(COMPACT_FORMATS)} or None, "
                                    f"got {self.compact!r}")
        for name in ("max_pixels", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _number(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidInputError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` -> four finite floats with ``x2 > x1`` and ``y2 > y1``.

    Raises:
      InvalidInputError: not four comma-separated finite numbers in that order.
    """
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidInputError(f"box must be four comma-separated numbers x1,y1,x2,y2 in pixels, got {text!r}")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise InvalidInputError(f"box must have x2 > x1 and y2 > y1, got {text!r}")
    return values  # type: ignore[return-value]


class KioskService:
    """The kiosk's models and gallery. Build it with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, bundle: Bundle, gallery: Gallery, recognizer: Recognizer, options: ServiceOptions) -> None:
        self.bundle = bundle
        self.gallery = gallery
        self.recognizer = recognizer
        self.options = options
        self._lock = threading.Lock()

    @classmethod
    def open(cls, bundle: Union[str, os.PathLike, Bundle], gallery: Union[str, os.PathLike], *,
             options: Optional[ServiceOptions] = None) -> "KioskService":
        """Load the bundle and open the gallery writable, creating it when missing.

        Args:
          bundle: a bundle directory, a one-file bundle or a loaded :class:`Bundle`.
          gallery: the gallery file.
          options: see :class:`ServiceOptions`.

        Raises:
          MissingFileError, BundleError, IntegrityError: the bundle is missing or damaged.
          GalleryError: the gallery cannot be opened or created (FingerprintMismatchError: another model's).
          BackendUnavailableError: the bundle's backend is not installed.
        """
        options = options or ServiceOptions()
        bundle = Bundle.load(bundle)
        path = Path(gallery)
        if path.exists():
            store = Gallery.open(path, fingerprint=bundle.code_fingerprint)
        else:
            store = Gallery.create(path, fingerprint=bundle.code_fingerprint, bits=bundle.codes.bits,
                                   compact=options.compact)
        backend = BackendOptions(name=options.backend, threads=options.threads)
        recognizer_options = RecognizerOptions(
            top_k=options.top_k, include_unknown=True, max_pixels=options.max_pixels,
            detector=DetectorOptions(backend=backend), embedder=EmbedderOptions(backend=backend))
        try:
            recognizer = Recognizer.from_bundle(bundle, store, options=recognizer_options)
        except BaseException:
            store.close()
            raise
        return cls(bundle, store, recognizer, options)

    def close(self) -> None:
        """Release the models and the gallery. Calling it twice is harmless."""
        with self._lock:
            self.recognizer.close()
            self.gallery.close()

    def __enter__(self) -> "KioskService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def info(self) -> Dict[str, object]:
        """Version, bundle and gallery summary (the ``/api/info`` answer, less the token flag)."""
        models = {}
        for role, spec in (("det", self.bundle.detector), ("rec", self.bundle.extractor)):
            if spec is not None:
                models[role] = {"file": spec.path.name, "backend": spec.backend, "precision": spec.precision,
                                "source": dict(spec.source)}
        precisions = sorted({m["precision"] for m in models.values()})
        with self._lock:
            info = self.gallery.info()
            settings = self._settings()
        return {
            "version": __version__,
            "bundle": {"path": str(self.bundle.path), "precision": "+".join(precisions),
                       "replica": self.bundle.is_replica, "models": models, "bits": self.gallery.bits},
            "gallery": {"path": str(info.path), "items": info.count, "labels": info.label_count, **settings},
        }

    def recognize(self, data: Union[bytes, np.ndarray], *, name: str = "upload") -> Dict[str, object]:
        """Recognise one image (the ``recognize --json`` record, unknown regions included).

        Args:
          data: the encoded image (JPEG, PNG, WebP, BMP), or a uint8 ``(H, W, 3)`` RGB frame.
          name: the image's name in the record and in error messages.

        Raises:
          ImageDecodeError: not a readable image, or over ``max_pixels``.
          InvalidInputError, InvalidDtypeError: a frame of the wrong shape or dtype.
        """
        img = load_image(data, max_pixels=self.options.max_pixels, name=name)
        with self._lock:
            result = self.recognizer.recognize(img)
        record = result_record(result, image=name, replica=self.bundle.is_replica)
        # Decoding happened before the lock; the pipeline's own decode stage saw an array.
        return record

    def items(self, *, label: Optional[str] = None, offset: int = 0, limit: int = DEFAULT_PAGE) -> Dict[str, object]:
        """One page of items, oldest first: ``{"total", "items": [{"id", "label", "source", "added_at",
        "has_thumbnail"}]}``; ``total`` counts every item of ``label`` (or of the gallery).

        Raises:
          InvalidInputError: ``offset`` < 0, ``limit`` outside 1..MAX_PAGE or a bad label.
        """
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInputError(f"offset must be an integer >= 0, got {offset!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInputError(f"limit must be an integer in 1..{MAX_PAGE}, got {limit!r}")
        if label is not None:
            check_label(label, "label")
        with self._lock:
            total = self.gallery.count(label=label)
            page = self.gallery.items(label=label, limit=limit, offset=offset)
        return {"total": total, "items": [
            {"id": it.id, "label": it.label, "source": it.source, "added_at": it.added_at,
             "has_thumbnail": it.has_thumbnail} for it in page]}

    def labels(self) -> Dict[str, object]:
        """``{"labels": [{"label", "count"}]}`` sorted by label."""
        with self._lock:
            counts = self.gallery.label_counts()
        return {"labels": [{"label": k, "count": counts[k]} for k in sorted(counts)]}

    def thumbnail(self, item_id: int) -> bytes:
        """The JPEG thumbnail stored with an item.

        Raises:
          NotFoundError: no such item, or it has no thumbnail.
        """
        with self._lock:
            if item_id not in self.gallery:
                raise NotFoundError(f"no gallery item with id {item_id}")
            jpeg = self.gallery.thumbnail(item_id)
        if jpeg is None:
            raise NotFoundError(f"gallery item {item_id} has no thumbnail")
        return jpeg

    # ------------------------------------------------------------------ changing the gallery

    def enrol(self, data: Union[bytes, np.ndarray], label: str, *, box: Optional[Sequence[float]] = None,
              name: str = "upload", source: str = "kiosk") -> Dict[str, object]:
        """Add one object of an image to the gallery, with its thumbnail and float features.

        Args:
          data: the encoded image, or a uint8 ``(H, W, 3)`` RGB frame.
          label: the object's label.
          box: ``(x1, y1, x2, y2)`` in image pixels (clipped to the image); None takes the detector's best
            box, else the whole image.
          name: the image's name in error messages.
          source: what to record as the item's source.

        Returns:
          ``{"id", "label", "box"}``.

        Raises:
          InvalidInputError: a bad label, or a box outside the image or smaller than 2 pixels.
          ImageDecodeError: the image cannot be read.
          InvalidDtypeError: a frame that is not uint8.
          GalleryError: the write failed (nothing was added).
        """
        label = check_label(label, "label")
        img = load_image(data, max_pixels=self.options.max_pixels, name=name)
        h, w = img.shape[:2]
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
            y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
            if x2 - x1 < _MIN_BOX_SIDE or y2 - y1 < _MIN_BOX_SIDE:
                raise InvalidInputError(
                    f"box {box_list(box)} leaves less than {_MIN_BOX_SIDE:g} pixels of the {w}x{h} image")
            region = (x1, y1, x2, y2)
        with self._lock:
            if box is None:
                region = self._best_box(img)
            embedder = self.recognizer.embedder
            features = embedder.postprocess(embedder.infer(embedder.preprocess([crop(img, region)])))
            codes = embedder.encode(features)
            ids = self.gallery.add(codes, [label], embeddings=features,
                                   embedding_fingerprint=self.bundle.embedding_fingerprint,
                                   sources=[source], thumbnails=[make_thumbnail(img, region)],
                                   features=features if self.gallery.compact is not None else None)
        return {"id": int(ids[0]), "label": label, "box": box_list(region)}

    def _best_box(self, img: np.ndarray) -> Tuple[float, float, float, float]:
        found = self.recognizer.detect(img)
        h, w = img.shape[:2]
        return found[0].box if found else (0.0, 0.0, float(w), float(h))

    def relabel(self, item_id: int, label: str) -> Dict[str, object]:
        """Give one item a new label.

        Raises:
          InvalidInputError: a bad label.
          NotFoundError: no such item.
        """
        label = check_label(label, "label")
        with self._lock:
            if item_id not in self.gallery:
                raise NotFoundError(f"no gallery item with id {item_id}")
            self.gallery.relabel([item_id], label)
        return {"id": item_id, "label": label}

    def remove(self, item_id: int) -> Dict[str, object]:
        """Delete one item (and its thumbnail).

        Raises:
          NotFoundError: no such item.
        """
        with self._lock:
            if item_id not in self.gallery:
                raise NotFoundError(f"no gallery item with id {item_id}")
            removed = self.gallery.remove([item_id])
        return {"deleted": int(removed)}

    def remove_label(self, label: str) -> Dict[str, object]:
        """Delete every item of a label.

        Raises:
          InvalidInputError: a bad label.
          NotFoundError: no item has this label.
        """
        label = check_label(label, "label")
        with self._lock:
            removed = self.gallery.remove_label(label)
        if not removed:
            raise NotFoundError(f"no gallery item has the label {label!r}")
        return {"deleted": int(removed)}

    # ------------------------------------------------------------------ settings and calibration

    def _settings(self) -> Dict[str, object]:
        threshold = self.recognizer.det_threshold
        # The recogniser decides how it accepts a match; the settings only report it.
        by_similarity = self.recognizer.accepts_by_similarity
        return {"mode": "similarity" if by_similarity else "distance",
                "max_distance": self.recognizer.max_distance,
                "min_similarity": round(self.recognizer.min_similarity, 4) if by_similarity else None,
                "det_threshold": None if threshold is None else round(threshold, 4),
                "bits": self.gallery.bits, "compact": self.gallery.compact}

    def settings(self) -> Dict[str, object]:
        """``{"mode", "max_distance", "min_similarity", "det_threshold", "bits", "compact"}`` as the recogniser
        uses them now. ``mode`` is the acceptance rule: "distance" (the best match is at most ``max_distance``
        bits away) or "similarity" (a gallery with compact features: its re-ranked best match has a similarity
        of at least ``min_similarity``, which is None in the other mode)."""
        with self._lock:
            return self._settings()

    def update_settings(self, changes: Dict[str, object]) -> Dict[str, object]:
        """Store new settings in the gallery; all are checked before any is written.

        Args:
          changes: ``{"max_distance": int in 0..bits, "min_similarity": number in [-1, 1] (similarity
            mode only), "det_threshold": number in [0, 1]}``, each optional.

        Returns:
          The settings after the change.

        Raises:
          InvalidInputError: an unknown key, a value of the wrong type or out of range, a similarity for
            a gallery without compact features, or a detector threshold for a bundle without a detector.
        """
        if not isinstance(changes, dict):
            raise InvalidInputError(f"settings must be a JSON object, got {type(changes).__name__}")
        unknown = sorted(set(changes) - {"max_distance", "min_similarity", "det_threshold"})
        if unknown:
            raise InvalidInputError(f"unknown settings {unknown}; expected max_distance, min_similarity and/or "
                                    "det_threshold")
        bits = self.gallery.bits
        radius = changes.get("max_distance")
        if "max_distance" in changes and (isinstance(radius, bool) or not isinstance(radius, int)
                                          or not 0 <= radius <= bits):
            raise InvalidInputError(f"max_distance must be an integer in 0..{bits} (bits), got {radius!r}")
        similarity = None
        if "min_similarity" in changes:
            if not self.recognizer.accepts_by_similarity:
                raise InvalidInputError("matches are accepted by max_distance here (the gallery keeps no compact "
                                        "features): min_similarity does not apply")
            similarity = _number(changes["min_similarity"], "min_similarity", -1.0, 1.0)
        score = None
        if "det_threshold" in changes:
            if self.recognizer.detector is None:
                raise InvalidInputError("this bundle has no detector: det_threshold does not apply")
            score = _number(changes["det_threshold"], "det_threshold", 0.0, 1.0)
        with self._lock:
            if "max_distance" in changes:
                self.gallery.set_max_distance(int(radius))
            if similarity is not None:
                self.gallery.set_min_similarity(similarity)
            if score is not None:
                self.gallery.set_det_threshold(score)
            return self._settings()

    def calibrate(self, precision: object) -> Dict[str, object]:
        """Measure the precision/recall curve of the gallery's own items and choose its acceptance threshold
        (not stored): ``max_distance`` in distance mode, ``min_similarity`` in similarity mode.

        Returns:
          ``{"metric": "distance"|"similarity", "target_precision", "threshold", "reached", "curve":
          [{"threshold", "precision", "recall", "unknown_accept_rate"}], "items", "labels", "conflicts"}``;
          precision is None where nothing is accepted.

        Raises:
          InvalidInputError: ``precision`` not in (0, 1], or the gallery is too small to calibrate.
        """
        if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not 0 < precision <= 1:
            raise InvalidInputError(f"precision must be a number in (0, 1], got {precision!r}")
        with self._lock:
            result = calibrate_gallery(self.gallery, options=CalibrationOptions(target_precision=float(precision)))

        def num(v: float) -> Optional[float]:
            return None if not math.isfinite(v) else round(float(v), 4)

        curve: List[Dict[str, object]] = [
            {"threshold": t.item(), "precision": num(result.precision[i]), "recall": num(result.recall[i]),
             "unknown_accept_rate": num(result.unknown_accept_rate[i])} for i, t in enumerate(result.thresholds)]
        return {"metric": result.metric, "target_precision": result.target_precision, "threshold": result.threshold,
                "reached": result.reached, "curve": curve, "items": result.items, "labels": result.labels,
                "conflicts": int(len(result.conflicts))}
