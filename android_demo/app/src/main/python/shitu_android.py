"""The Python side of the Android demo: a thin layer over the edge-shitu runtime for the Kotlin app.

The Kotlin code (``ShituPython.kt``) calls these functions through Chaquopy. Everything that crosses is a plain
type that Chaquopy converts cheaply: ``bytes`` (frames as packed RGB, thumbnails as JPEG), ``int``, ``str``, and
JSON strings for results. No function raises for bad input or a failed operation: it answers
``{"error": "one line"}`` instead, which the app shows to the user.

The models run in ONNX Runtime for Android (the ``android`` backend of :mod:`edge_shitu.backends`, through the
app's Kotlin ``OrtBridge``); decoding, PicoDet post-processing, codes, the SQLite gallery and the search run here.
One gallery file, the same format as on a desktop: a gallery built with ``edge-shitu gallery build`` can be
imported, and one enrolled on the phone can be copied back.
"""

from __future__ import annotations

import json
import threading
from typing import Callable, Optional

import numpy as np

from edge_shitu.errors import EdgeShituError, InvalidInputError
from edge_shitu.kiosk.service import KioskService, ServiceOptions, parse_box

__all__ = ["open", "close", "recognize_rgb", "enrol_rgb", "remove", "relabel", "list_items", "labels",
           "thumbnail", "set_max_distance", "set_min_similarity", "settings"]

# Frames from the camera are small (640x480 in the app); this bounds what a bad caller can make us allocate.
_MAX_FRAME_PIXELS = 4096 * 4096
_ROTATIONS = {0: 0, 90: -1, 180: 2, 270: 1}  # clockwise degrees -> np.rot90's counter-clockwise turns

_lock = threading.Lock()
_service: Optional[KioskService] = None


def _answer(work: Callable[[], dict]) -> str:
    try:
        return json.dumps(work(), ensure_ascii=False)
    except (EdgeShituError, OSError, ValueError, TypeError, KeyError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return json.dumps({"error": text}, ensure_ascii=False)


def _current() -> KioskService:
    if _service is None:
        raise InvalidInputError("no bundle is open: import a bundle first")
    return _service


def _bytes(data) -> np.ndarray:
    """Python bytes, or a Java ``byte[]`` as Chaquopy hands it over (signed bytes, read through the buffer
    protocol without a copy) -> uint8 (n,)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    try:
        arr = np.asarray(data)
    except Exception:  # anything numpy cannot read as a buffer
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype not in (np.int8, np.uint8):
        raise InvalidInputError(f"frame data must be bytes or a Java byte[], got {type(data).__name__}")
    return arr.view(np.uint8)


def _frame(data, width: int, height: int, rotation: int) -> np.ndarray:
    """Packed RGB bytes -> an upright uint8 (H, W, 3) frame."""
    raw = _bytes(data)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if width * height > _MAX_FRAME_PIXELS:
        raise InvalidInputError(f"frame of {width}x{height} is larger than {_MAX_FRAME_PIXELS} pixels")
    if raw.size != width * height * 3:
        raise InvalidInputError(f"a {width}x{height} RGB frame has {width * height * 3} bytes, got {raw.size}")
    if isinstance(rotation, bool) or rotation not in _ROTATIONS:
        raise InvalidInputError(f"rotation must be 0, 90, 180 or 270 degrees, got {rotation!r}")
    img = raw.reshape(height, width, 3)
    return np.ascontiguousarray(np.rot90(img, _ROTATIONS[rotation])) if rotation else img


def _summary(service: KioskService) -> dict:
    info = service.info()
    gallery = info["gallery"]
    return {"bits": info["bundle"]["bits"], "items": gallery["items"], "labels": gallery["labels"],
            "mode": gallery["mode"], "max_distance": gallery["max_distance"], "min_similarity": gallery["min_similarity"],
            "det_threshold": gallery["det_threshold"], "replica": info["bundle"]["replica"]}


def open(bundle_path: str, gallery_path: str, threads: int = 0) -> str:  # noqa: A001 - the app's verb
    """Open a bundle (a folder or a one-file ``.esb``) and a gallery (created when missing); closes what was open.

    Args:
      bundle_path: the bundle.
      gallery_path: the gallery file.
      threads: model threads per session; 0 lets ONNX Runtime choose.

    Returns:
      JSON ``{"bits", "items", "labels", "mode", "max_distance", "min_similarity", "det_threshold", "replica"}``;
      ``mode`` is the gallery's acceptance rule: "similarity" (a gallery created here keeps int8 compact
      features: re-ranked search, accepted at ``min_similarity``) or "distance" (``max_distance`` bits).
    """
    def work() -> dict:
        global _service
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InvalidInputError(f"threads must be a whole number >= 0, got {threads!r}")
        options = ServiceOptions(threads=threads or None, backend="android")
        with _lock:
            fresh = KioskService.open(bundle_path, gallery_path, options=options)
            old, _service = _service, fresh
        if old is not None:
            old.close()
        return _summary(fresh)

    return _answer(work)


def close() -> str:
    """Close the bundle and gallery. Returns JSON ``{"closed": true}``."""
    def work() -> dict:
        global _service
        with _lock:
            old, _service = _service, None
        if old is not None:
            old.close()
        return {"closed": True}

    return _answer(work)


def recognize_rgb(data: bytes, width: int, height: int, rotation: int = 0) -> str:
    """Recognise every object of a camera frame.

    Args:
      data: packed RGB, ``width * height * 3`` bytes, row by row (``bytes`` or a Java ``byte[]``).
      width, height: the frame's size as captured.
      rotation: clockwise degrees that make the frame upright (CameraX's ``rotationDegrees``).

    Returns:
      JSON ``{"width", "height", "results": [{"box", "label", "distance", "similarity", "detection_score",
      "whole_image", "candidates"}], "timings_ms", "replica"}``; boxes in the upright frame; unknown objects
      have ``"label": null``.
    """
    return _answer(lambda: _current().recognize(_frame(data, width, height, rotation), name="frame"))


def enrol_rgb(data: bytes, width: int, height: int, rotation: int, label: str, box_json: str = "") -> str:
    """Add an object of a frame to the gallery under ``label``.

    Args:
      box_json: ``"[x1, y1, x2, y2]"`` in the upright frame, or ``""`` for the detector's best box (else the
        whole frame).

    Returns:
      JSON ``{"id", "label", "box"}``.
    """
    def work() -> dict:
        box = None
        if box_json:
            try:
                values = json.loads(box_json)
            except ValueError:
                raise InvalidInputError(f"box must be a JSON list [x1, y1, x2, y2], got {box_json[:80]!r}") from None
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in values):
                raise InvalidInputError(f"box must be a JSON list of four numbers, got {box_json[:80]!r}")
            box = parse_box(",".join(repr(float(v)) for v in values))
        return _current().enrol(_frame(data, width, height, rotation), label, box=box, name="frame",
                                source="android")

    return _answer(work)


def remove(item_id: int) -> str:
    """Delete one item. Returns JSON ``{"deleted": 1}``."""
    return _answer(lambda: _current().remove(_item(item_id)))


def relabel(item_id: int, label: str) -> str:
    """Give one item a new label. Returns JSON ``{"id", "label"}``."""
    return _answer(lambda: _current().relabel(_item(item_id), label))


def list_items(label: str = "", offset: int = 0, limit: int = 100) -> str:
    """One page of items, oldest first (``label`` "" for all). Returns JSON ``{"total", "items": [...]}``."""
    return _answer(lambda: _current().items(label=label or None, offset=offset, limit=limit))


def labels() -> str:
    """Returns JSON ``{"labels": [{"label", "count"}]}``."""
    return _answer(lambda: _current().labels())


def thumbnail(item_id: int) -> Optional[bytes]:
    """The item's JPEG thumbnail, or None when it has none (or does not exist). Not JSON: bytes cross directly."""
    try:
        return _current().thumbnail(_item(item_id))
    except (EdgeShituError, KeyError):
        return None


def set_max_distance(value: int) -> str:
    """Set and store the acceptance radius in bits (smaller is stricter). Returns the settings as JSON."""
    return _answer(lambda: _current().update_settings({"max_distance": value}))


def set_min_similarity(value: float) -> str:
    """Set and store the acceptance similarity of a gallery in mode "similarity" (larger is stricter). Returns the
    settings as JSON."""
    return _answer(lambda: _current().update_settings({"min_similarity": value}))


def settings() -> str:
    """Returns JSON ``{"mode", "max_distance", "min_similarity", "det_threshold", "bits", "compact"}``."""
    return _answer(lambda: _current().settings())


def _item(item_id: int) -> int:
    if isinstance(item_id, bool) or not isinstance(item_id, int) or item_id < 0:
        raise InvalidInputError(f"item id must be a whole number >= 0, got {item_id!r}")
    return item_id
