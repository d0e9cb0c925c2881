"""Plain JSON-ready records of results: one shape for ``recognize --json`` and the kiosk's ``/api/recognize``."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from edge_shitu.types import Match, Recognition, RecognitionResult

__all__ = ["box_list", "match_record", "recognition_record", "result_record"]

# Box coordinates are pixels: two decimals are far below the detector's precision and keep the JSON short.
_BOX_DECIMALS = 2
_SIMILARITY_DECIMALS = 4
_TIMING_DECIMALS = 2


def box_list(box: Sequence[float]) -> List[float]:
    """``(x1, y1, x2, y2)`` as a list of floats rounded to two decimals."""
    return [round(float(v), _BOX_DECIMALS) for v in box]


def _similarity(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), _SIMILARITY_DECIMALS)


def match_record(match: Match) -> Dict[str, object]:
    """``{"id", "label", "distance", "similarity"}`` of one gallery candidate."""
    return {"id": match.id, "label": match.label, "distance": match.distance,
            "similarity": _similarity(match.similarity)}


def recognition_record(rec: Recognition) -> Dict[str, object]:
    """One region: ``box``, ``label`` (None when unknown), ``distance``, ``similarity``, ``detection_score``,
    ``whole_image`` and ``candidates`` (best first)."""
    return {
        "box": box_list(rec.box),
        "label": rec.label,
        "distance": rec.distance,
        "similarity": _similarity(rec.similarity),
        "detection_score": round(float(rec.detection_score), _SIMILARITY_DECIMALS),
        "whole_image": rec.whole_image,
        "candidates": [match_record(m) for m in rec.candidates],
    }


def result_record(result: RecognitionResult, *, image: str, replica: bool,
                  timings: bool = True) -> Dict[str, object]:
    """The record of one recognised image.

    Args:
      result: what :meth:`Recognizer.recognize` returned.
      image: how the image is named in the record (a path, an upload's name).
      replica: whether the bundle is a replica (random weights: labels mean nothing).
      timings: include ``timings_ms`` (per stage, milliseconds).

    Returns:
      ``{"image", "width", "height", "results": [...], "replica"[, "timings_ms"]}``.
    """
    record: Dict[str, object] = {
        "image": image, "width": result.width, "height": result.height,
        "results": [recognition_record(r) for r in result.recognitions], "replica": replica,
    }
    if timings:
        record["timings_ms"] = {k: round(float(v), _TIMING_DECIMALS) for k, v in result.timings_ms.items()}
    return record
