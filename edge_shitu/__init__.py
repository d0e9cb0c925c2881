"""edge-shitu: PP-ShiTu recognition (detect -> embed -> 512-bit codes -> Hamming search) on small devices.

The runtime needs only numpy, Pillow and one inference backend; heavy modules load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Bundle": "edge_shitu.bundle",
    "Detector": "edge_shitu.detector",
    "Embedder": "edge_shitu.embedder",
    "Gallery": "edge_shitu.gallery",
    "Recognizer": "edge_shitu.recognizer",
    "HashHead": "edge_shitu.hashing",
    "HammingIndex": "edge_shitu.search",
    "CalibrationOptions": "edge_shitu.calibration",
    "calibrate_gallery": "edge_shitu.calibration",
    "DetectorOptions": "edge_shitu.options",
    "EmbedderOptions": "edge_shitu.options",
    "RecognizerOptions": "edge_shitu.options",
    "BackendOptions": "edge_shitu.options",
    "load_image": "edge_shitu.image",
    "Detection": "edge_shitu.types",
    "Recognition": "edge_shitu.types",
    "RecognitionResult": "edge_shitu.types",
    "SearchResult": "edge_shitu.types",
    "Match": "edge_shitu.types",
    "WholeImagePolicy": "edge_shitu.types",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_shitu' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list:
    return sorted(__all__)
