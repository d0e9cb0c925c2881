"""Frozen option dataclasses of the runtime. Cross-field checks live in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from edge_shitu.errors import InvalidInputError
from edge_shitu.types import WholeImagePolicy

__all__ = ["BackendOptions", "DetectorOptions", "EmbedderOptions", "RecognizerOptions"]

_BACKENDS = ("onnxruntime", "paddlelite")
_SEARCH_BACKENDS = ("auto", "numpy", "faiss")


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"{name} must be in [0, 1], got {value!r}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class BackendOptions:
    """How model sessions are created.

    Attributes:
      name: backend name, "onnxruntime" or "paddlelite"; ``None`` uses the backend the bundle names.
      threads: intra-op threads per session; ``None`` lets the backend decide.
    """

    name: Optional[str] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in _BACKENDS:
            raise InvalidInputError(f"unknown backend {self.name!r}; expected one of {', '.join(_BACKENDS)}")
        if self.threads is not None:
            _positive("threads", self.threads)


@dataclass(frozen=True)
class DetectorOptions:
    """PicoDet post-processing settings. The defaults reproduce the reference pipeline
    (in-graph NMS at score 0.025 / IoU 0.6 / keep 100, then the top 5 with score >= 0.2).

    Attributes:
      score_threshold: candidates below this score are dropped before NMS.
      nms_iou: IoU above which a lower-scored box of the same class is suppressed.
      nms_top_k: candidates kept per feature level before NMS, by score.
      keep_top_k: boxes kept after NMS.
      max_detections: boxes returned, best first.
      min_score: boxes below this score are not returned.
      clip: clip boxes to the image (the reference's in-graph decode does not).
      backend: how the detector session is created.
    """

    score_threshold: float = 0.025
    nms_iou: float = 0.6
    nms_top_k: int = 1000
    keep_top_k: int = 100
    max_detections: int = 5
    min_score: float = 0.2
    clip: bool = True
    backend: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self) -> None:
        _unit("score_threshold", self.score_threshold)
        _unit("nms_iou", self.nms_iou)
        _unit("min_score", self.min_score)
        _positive("nms_top_k", self.nms_top_k)
        _positive("keep_top_k", self.keep_top_k)
        _positive("max_detections", self.max_detections)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> "DetectorOptions":
        """Build options from a bundle's ``defaults`` mapping, then apply keyword overrides.

        Raises:
          InvalidInputError: unknown keys or out-of-range values.
        """
        merged = {**values, **overrides}
        unknown = set(merged) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InvalidInputError(f"unknown detector option(s): {', '.join(sorted(unknown))}")
        return cls(**merged)


@dataclass(frozen=True)
class EmbedderOptions:
    """Feature-extractor settings.

    Attributes:
      max_batch: crops per session call; larger inputs are split into chunks of this size.
      epsilon: added to the L2 norm so an all-zero feature gives zeros, not NaN (reference bug §1.9 #11).
      backend: how the extractor session is created.
    """

    max_batch: int = 32
    epsilon: float = 1e-12
    backend: BackendOptions = field(default_factory=BackendOptions)

    def __post_init__(self) -> None:
        _positive("max_batch", self.max_batch)
        if not self.epsilon > 0:
            raise InvalidInputError(f"epsilon must be > 0, got {self.epsilon!r}")


@dataclass(frozen=True)
class RecognizerOptions:
    """Whole-pipeline settings.

    Attributes:
      max_distance: accept a match when its Hamming distance is at most this many bits; ``None`` takes
        the gallery's calibrated value, else the bundle default (100, the reference's hamming_radius).
      top_k: candidates returned per region.
      whole_image: when the whole image is recognised as an extra region.
      final_nms_iou: IoU of the final class-agnostic NMS, ranked by best match (smallest distance).
      detector: detector settings; ``None`` takes the bundle defaults.
      embedder: extractor settings.
      include_unknown: also return regions whose best match is farther than ``max_distance``
        (with ``label=None``); by default they are dropped, as in the reference.
      search_backend: Hamming search backend of a gallery the recogniser opens itself: "auto"
        (faiss when installed, else numpy), "numpy" or "faiss" (see :mod:`edge_shitu.search`).
    """

    max_distance: Optional[int] = None
    top_k: int = 5
    whole_image: WholeImagePolicy = WholeImagePolicy.IF_NONE
    final_nms_iou: float = 0.05
    detector: Optional[DetectorOptions] = None
    embedder: EmbedderOptions = field(default_factory=EmbedderOptions)
    include_unknown: bool = False
    search_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.max_distance is not None and (isinstance(self.max_distance, bool) or not isinstance(self.max_distance, int) or self.max_distance < 0):
            raise InvalidInputError(f"max_distance must be a non-negative integer, got {self.max_distance!r}")
        _positive("top_k", self.top_k)
        _unit("final_nms_iou", self.final_nms_iou)
        try:
            object.__setattr__(self, "whole_image", WholeImagePolicy(self.whole_image))
        except ValueError:
            choices = ", ".join(p.value for p in WholeImagePolicy)
            raise InvalidInputError(f"whole_image must be one of {choices}, got {self.whole_image!r}") from None
        if self.search_backend not in _SEARCH_BACKENDS:
            raise InvalidInputError(
                f"search_backend must be one of {', '.join(_SEARCH_BACKENDS)}, got {self.search_backend!r}")
