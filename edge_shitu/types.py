"""Result types and enums returned by the runtime (plain frozen dataclasses, no behaviour)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import numpy as np

__all__ = [
    "Box",
    "Detection",
    "SearchResult",
    "Match",
    "Recognition",
    "RecognitionResult",
    "WholeImagePolicy",
]

Box = Tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` in original-image pixels, x2 > x1 and y2 > y1."""


class WholeImagePolicy(str, enum.Enum):
    """When the recogniser also recognises the whole image as if it were a detection.

    Attributes:
      IF_NONE: only when the detector found nothing (PaddleX behaviour; the default).
      ALWAYS: always, as the PaddleClas reference pipeline does.
      NEVER: never; an image without detections gives no result.
    """

    IF_NONE = "if_none"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
      box: ``(x1, y1, x2, y2)`` in original-image pixels, clipped to the image.
      score: detector confidence in [0, 1].
      class_id: detector class index (0 = "foreground" for the mainbody detector).
      label: detector class name.
    """

    box: Box
    score: float
    class_id: int = 0
    label: str = "foreground"


@dataclass(frozen=True)
class SearchResult:
    """Top-k Hamming matches for a batch of query codes.

    Attributes:
      ids: int64 ``(n, k)``, gallery item ids, best first; ``-1`` pads rows with fewer matches.
      distances: int32 ``(n, k)``, Hamming distances; ``-1`` where ``ids`` is ``-1``.
      counts: int64 ``(n,)``, how many entries of each row are real matches.
      similarities: float32 ``(n, k)`` inner products of re-ranked search (NaN where ``ids`` is -1), or
        None for Hamming search alone.
    """

    ids: np.ndarray
    distances: np.ndarray
    counts: np.ndarray
    similarities: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Match:
    """One gallery item matched by a query.

    Attributes:
      id: the gallery item's stable id.
      label: the item's label.
      distance: Hamming distance in bits.
      similarity: ``1 - distance / bits`` in [0, 1]; in re-ranked search (a gallery with compact
        features) the inner product of the L2-normalised features instead, in [-1, 1].
    """

    id: int
    label: str
    distance: int
    similarity: float


@dataclass(frozen=True)
class Recognition:
    """One recognised region of an image.

    Attributes:
      box: ``(x1, y1, x2, y2)`` in original-image pixels.
      label: label of the best match, or ``None`` when no match is within ``max_distance``.
      distance: Hamming distance of the best match (``None`` for an empty gallery).
      similarity: ``1 - distance / bits`` of the best match (``None`` for an empty gallery).
      detection_score: detector score of the region (1.0 for the whole image).
      whole_image: True when the region is the whole image rather than a detection.
      candidates: the top-k matches, best first, whether accepted or not.
    """

    box: Box
    label: Optional[str]
    distance: Optional[int]
    similarity: Optional[float]
    detection_score: float
    whole_image: bool = False
    candidates: Tuple[Match, ...] = ()


@dataclass(frozen=True)
class RecognitionResult:
    """Everything recognised on one image.

    Attributes:
      width: image width in pixels.
      height: image height in pixels.
      recognitions: accepted regions after the final NMS, best match first.
      timings_ms: wall time of each pipeline stage in milliseconds.
    """

    width: int
    height: int
    recognitions: Tuple[Recognition, ...]
    timings_ms: Mapping[str, float] = field(default_factory=dict)
