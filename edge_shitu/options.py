"""Frozen option dataclasses of the runtime. Cross-field checks live in ``__post_init__``.

Bundle manifests are parsed into these same classes (:meth:`edge_shitu.bundle.Bundle.load`), so a
value is checked in one place whether it comes from code, the command line or a manifest.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional

from edge_shitu.errors import InvalidInputError
from edge_shitu.image import DEFAULT_MAX_PIXELS
from edge_shitu.types import WholeImagePolicy

if TYPE_CHECKING:
    from edge_shitu.float_index import FloatIndexOptions

__all__ = ["BackendOptions", "DetectorOptions", "EmbedderOptions", "RecognizerOptions", "check_threads",
           "MAX_CANDIDATES", "MAX_DETECTIONS", "MAX_BATCH", "MAX_TOP_K"]

_BACKENDS = ("onnxruntime", "paddlelite", "android")
_SEARCH_BACKENDS = ("auto", "numpy", "faiss", "hnsw")

MAX_CANDIDATES = 100_000
"""Largest ``nms_top_k`` / ``keep_top_k``: greedy NMS is quadratic in its candidates."""
MAX_DETECTIONS = 1_000
"""Largest ``max_detections``: each detection is a crop the extractor runs on."""
MAX_BATCH = 256
"""Largest ``max_batch``: a batch of 256 224x224 crops is already a 154 MB input tensor."""
MAX_PIXELS = 1 << 31
"""Largest ``max_pixels`` a user may set: Pillow's own hard limit is below it."""
MAX_TOP_K = 1_000
"""Largest ``top_k``: a search returns (queries, top_k) arrays padded with -1, whatever the gallery size."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _machine_cpus() -> int:
    return os.cpu_count() or 1


def check_threads(value: object, *, name: str = "threads") -> int:
    """Check a thread count for an inference session against this machine.

    A session keeps at most one thread per CPU core busy; more threads than cores only contend for
    them, and each costs its own stack and scratch buffers, so an unchecked count exhausts memory.

    Args:
      value: the requested count.
      name: what to call it in the message (e.g. ``"--threads"``).

    Returns:
      ``value`` as an int in ``[1, os.cpu_count()]``.

    Raises:
      InvalidInputError: ``value`` is not an int (bools are refused) or is outside that range; the
        message gives the range and this machine's core count.
    """
    cpus = _machine_cpus()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cpus:
        raise InvalidInputError(
            f"{name} must be a positive int from 1 to {cpus} (this machine has {cpus} CPU cores), got {_short(value)}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {_short(value)}")
    return float(value)


def _unit(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name} must be a number in [0, 1], got {_short(value)}")


def _positive(name: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidInputError(f"{name} must be a positive integer at most {maximum}, got {_short(value)}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be true or false, got {_short(value)}")


def _merged(options, defaults: Mapping[str, Any], reference: Mapping[str, Any]):
    """The one place where settings meet: every field of ``options`` left at None takes the bundle's
    value from ``defaults``, else the reference pipeline's from ``reference``; fields the caller set
    stay as they are."""
    filled = {name: defaults.get(name, reference[name]) for name in reference if getattr(options, name) is None}
    return replace(options, **filled) if filled else options


def _instance(name: str, value: object, kind: type, *, optional: bool = False) -> None:
    if not (isinstance(value, kind) or (optional and value is None)):
        none = " or None" if optional else ""
        raise InvalidInputError(f"{name} must be {kind.__name__}{none}, got {type(value).__name__}")


@dataclass(frozen=True)
class BackendOptions:
    """How model sessions are created.

    Attributes:
      name: backend name, "onnxruntime" or "paddlelite"; ``None`` uses the backend the bundle names.
        "android" runs a bundle's ONNX models in ONNX Runtime for Android through Chaquopy's Java
        bridge (inside the app of ``android_demo/`` only; see :mod:`edge_shitu.backends.android`).
      threads: intra-op threads per session, from 1 to ``os.cpu_count()`` (see :func:`check_threads`);
        ``None`` lets the backend decide.
    """

    name: Optional[str] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in _BACKENDS:
            raise InvalidInputError(f"unknown backend {_short(self.name)}; expected one of {', '.join(_BACKENDS)}")
        if self.threads is not None:
            check_threads(self.threads)


_DETECTOR_REFERENCE: Mapping[str, Any] = {
    "score_threshold": 0.025, "nms_iou": 0.6, "nms_top_k": 1000, "keep_top_k": 100, "max_detections": 5,
    "min_score": 0.2,
}
"""The reference pipeline's post-processing (in-graph NMS at score 0.025 / IoU 0.6 / keep 100, then the
top 5 with score >= 0.2): what a setting is when neither the caller nor the bundle gives it."""

DEFAULT_MIN_SIMILARITY = 0.5
"""Acceptance threshold of re-ranked search when neither the caller nor the gallery gives one: the
reference's ``score_thres`` for float inner-product search (PaddleClas ``inference_general.yaml``)."""

_RECOGNITION_REFERENCE: Mapping[str, Any] = {"top_k": 5, "whole_image": "if_none", "final_nms_iou": 0.05}
"""Recognition settings when neither the caller nor the bundle gives them."""


@dataclass(frozen=True)
class DetectorOptions:
    """PicoDet post-processing settings.

    A field left at None takes the bundle's default, else the reference pipeline's (in-graph NMS at
    score 0.025 / IoU 0.6 / keep 100, then the top 5 with score >= 0.2); see :meth:`with_defaults`.
    A :class:`~edge_shitu.detector.Detector` always holds complete options.

    Attributes:
      score_threshold: candidates below this score are dropped before NMS.
      nms_iou: IoU above which a lower-scored box of the same class is suppressed.
      nms_top_k: candidates kept per feature level before NMS, by score (at most :data:`MAX_CANDIDATES`).
      keep_top_k: boxes kept after NMS (at most :data:`MAX_CANDIDATES`).
      max_detections: boxes returned, best first (at most :data:`MAX_DETECTIONS`).
      min_score: boxes below this score are not returned.
      clip: clip boxes to the image (the reference's in-graph decode does not).
      backend: how the detector session is created.
      max_pixels: images with more pixels are refused from their header, before decoding; decoding
        takes about 7 bytes per pixel (16 for WebP), so this bounds memory (see :mod:`edge_shitu.image`).

    Raises:
      InvalidInputError: a value of the wrong type or out of range (scores and IoUs in [0, 1]).
    """

    score_threshold: Optional[float] = None
    nms_iou: Optional[float] = None
    nms_top_k: Optional[int] = None
    keep_top_k: Optional[int] = None
    max_detections: Optional[int] = None
    min_score: Optional[float] = None
    clip: bool = True
    backend: BackendOptions = field(default_factory=BackendOptions)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _positive("max_pixels", self.max_pixels, MAX_PIXELS)
        for name in ("score_threshold", "nms_iou", "min_score"):
            if getattr(self, name) is not None:
                _unit(name, getattr(self, name))
        for name, maximum in (("nms_top_k", MAX_CANDIDATES), ("keep_top_k", MAX_CANDIDATES),
                              ("max_detections", MAX_DETECTIONS)):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), maximum)
        _flag("clip", self.clip)
        _instance("backend", self.backend, BackendOptions)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> "DetectorOptions":
        """Build options from a bundle's ``defaults`` mapping, then apply keyword overrides.

        Raises:
          InvalidInputError: unknown keys or out-of-range values.
        """
        if not isinstance(values, Mapping):
            raise InvalidInputError(f"detector options must be a mapping, got {type(values).__name__}")
        merged = {**values, **overrides}
        unknown = set(merged) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InvalidInputError(f"unknown detector option(s): {', '.join(sorted(unknown))}")
        empty = sorted(k for k in values if values[k] is None)
        if empty:
            # None means "the bundle's value": defaults themselves must give one.
            raise InvalidInputError(f"detector option(s) {', '.join(empty)} must have a value, got None")
        return cls(**merged)

    def with_defaults(self, defaults: Mapping[str, Any]) -> "DetectorOptions":
        """These options with every field left at None taken from ``defaults`` (a bundle's detector
        defaults), else from the reference pipeline.

        Raises:
          InvalidInputError: a value taken from ``defaults`` is out of range.
        """
        return _merged(self, defaults, _DETECTOR_REFERENCE)


@dataclass(frozen=True)
class EmbedderOptions:
    """Feature-extractor settings.

    Attributes:
      max_batch: crops per session call, at most :data:`MAX_BATCH`; larger inputs are split into
        chunks of this size.
      epsilon: added to the L2 norm so an all-zero feature gives zeros, not the NaN of the reference
        pipeline's bare division.
      backend: how the extractor session is created.
      max_pixels: images with more pixels are refused from their header, before decoding; decoding
        takes about 7 bytes per pixel (16 for WebP), so this bounds memory (see :mod:`edge_shitu.image`).

    Raises:
      InvalidInputError: a value of the wrong type or out of range.
    """

    max_batch: int = 32
    epsilon: float = 1e-12
    backend: BackendOptions = field(default_factory=BackendOptions)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _positive("max_pixels", self.max_pixels, MAX_PIXELS)
        _positive("max_batch", self.max_batch, MAX_BATCH)
        if not _number("epsilon", self.epsilon) > 0:
            raise InvalidInputError(f"epsilon must be > 0, got {_short(self.epsilon)}")
        _instance("backend", self.backend, BackendOptions)


@dataclass(frozen=True)
class RecognizerOptions:
    """Whole-pipeline settings.

    Attributes:
      max_distance: accept a match when its Hamming distance is at most this many bits; ``None`` takes
        the gallery's calibrated value, else the bundle default (100, the reference's hamming_radius).
      top_k: candidates returned per region (at most :data:`MAX_TOP_K`); ``None``: the bundle's.
      whole_image: when the whole image is recognised as an extra region; ``None``: the bundle's.
      final_nms_iou: IoU of the final class-agnostic NMS, ranked by best match (smallest distance);
        ``None``: the bundle's.
      detector: detector settings; fields left at None (or ``None`` for all of them) take the
        bundle's detector defaults.
      embedder: extractor settings.
      include_unknown: also return regions whose best match is farther than ``max_distance``
        (with ``label=None``); by default they are dropped, as in the reference.
      search_backend: how the gallery is searched. "auto" (faiss when installed, else numpy), "numpy"
        or "faiss": exhaustive Hamming search of the codes with that backend (see :mod:`edge_shitu.search`),
        which is also the Hamming backend of a gallery the recogniser opens itself. "hnsw": approximate
        inner-product search of the gallery's stored float embeddings (a gallery built with
        ``--keep-embeddings``) through an hnswlib index kept beside the gallery
        (:class:`~edge_shitu.float_index.FloatIndex`, the ``hnsw`` extra); matches are accepted by
        ``min_similarity`` and ``max_distance`` must be None.
      max_pixels: images with more pixels are refused from their header, before decoding; decoding
        takes about 7 bytes per pixel (16 for WebP), so this bounds memory (see :mod:`edge_shitu.image`).
      min_similarity: with a gallery that keeps compact features (re-ranked search) or with
        ``search_backend="hnsw"``, accept a match when its inner product is at least this, in [-1, 1];
        ``None`` takes the gallery's calibrated value, else :data:`DEFAULT_MIN_SIMILARITY` (0.5, the
        reference's score threshold of float search). ``max_distance`` does not apply then.
      float_index: how the HNSW index of ``search_backend="hnsw"`` is built and searched (``ef_search``
        trades recall for time); ``None`` takes ``FloatIndexOptions()``. Only with that backend.

    Raises:
      InvalidInputError: a value of the wrong type or out of range.
    """

    max_distance: Optional[int] = None
    top_k: Optional[int] = None
    whole_image: Optional[WholeImagePolicy] = None
    final_nms_iou: Optional[float] = None
    detector: Optional[DetectorOptions] = None
    embedder: EmbedderOptions = field(default_factory=EmbedderOptions)
    include_unknown: bool = False
    search_backend: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_similarity: Optional[float] = None
    float_index: Optional["FloatIndexOptions"] = None

    def __post_init__(self) -> None:
        _positive("max_pixels", self.max_pixels, MAX_PIXELS)
        m = self.min_similarity
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not -1.0 <= m <= 1.0):
            raise InvalidInputError(f"min_similarity must be a number in [-1, 1], got {_short(m)}")
        if self.max_distance is not None and (isinstance(self.max_distance, bool) or not isinstance(self.max_distance, int) or self.max_distance < 0):
            raise InvalidInputError(f"max_distance must be a non-negative integer, got {_short(self.max_distance)}")
        if self.top_k is not None:
            _positive("top_k", self.top_k, MAX_TOP_K)
        if self.final_nms_iou is not None:
            _unit("final_nms_iou", self.final_nms_iou)
        _instance("detector", self.detector, DetectorOptions, optional=True)
        _instance("embedder", self.embedder, EmbedderOptions)
        _flag("include_unknown", self.include_unknown)
        try:
            if self.whole_image is not None:
                object.__setattr__(self, "whole_image", WholeImagePolicy(self.whole_image))
        except ValueError:
            choices = ", ".join(p.value for p in WholeImagePolicy)
            raise InvalidInputError(f"whole_image must be one of {choices}, got {_short(self.whole_image)}") from None
        if self.search_backend not in _SEARCH_BACKENDS:
            raise InvalidInputError(
                f"search_backend must be one of {', '.join(_SEARCH_BACKENDS)}, got {_short(self.search_backend)}")
        if self.search_backend == "hnsw":
            if self.max_distance is not None:
                raise InvalidInputError(
                    f"max_distance ({self.max_distance}) does not apply to search_backend 'hnsw', which accepts "
                    "matches by similarity: give min_similarity instead")
        elif self.float_index is not None:
            raise InvalidInputError(
                f"float_index applies to search_backend 'hnsw' only, got search_backend {_short(self.search_backend)}")
        if self.float_index is not None:
            # Imported here: the options module stays free of the gallery's storage code.
            from edge_shitu.float_index import FloatIndexOptions

            _instance("float_index", self.float_index, FloatIndexOptions)

    def with_defaults(self, recognition: Mapping[str, Any], detector: Optional[Mapping[str, Any]] = None
                      ) -> "RecognizerOptions":
        """These options with every field left at None taken from a bundle's defaults, field by field.

        Args:
          recognition: the bundle's recognition defaults (``top_k``, ``whole_image``, ``final_nms_iou``);
            ``max_distance`` stays None here, since the gallery's calibrated radius comes first.
          detector: the bundle's detector defaults, or None when the bundle has no detector.

        Raises:
          InvalidInputError: a value taken from the defaults is out of range.
        """
        merged = _merged(self, recognition, _RECOGNITION_REFERENCE)
        if detector is not None:
            merged = replace(merged, detector=(merged.detector or DetectorOptions()).with_defaults(detector))
        return merged

