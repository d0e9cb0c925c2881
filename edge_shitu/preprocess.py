"""Image -> model input, as a bundle's :class:`InputSpec` describes it (pure numpy)."""

from __future__ import annotations

import numpy as np

from edge_shitu.bundle import InputSpec
from edge_shitu.image import normalize_chw, resize_cubic, resize_linear

__all__ = ["image_to_tensor"]


def image_to_tensor(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Stretch, scale and normalise one RGB image.

    Args:
      image: uint8 (H, W, 3) RGB.
      spec: the model's input description.

    Returns:
      float32 (3, spec.height, spec.width).
    """
    resize = resize_cubic if spec.interpolation == "cubic" else resize_linear
    resized = resize(image, spec.width, spec.height)
    if spec.channel_order == "BGR":
        resized = resized[:, :, ::-1]
    return normalize_chw(resized, spec.mean, spec.std, scale=spec.scale)
