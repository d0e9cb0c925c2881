"""Image -> model input, as a bundle's :class:`InputSpec` describes it (pure numpy)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from edge_shitu.bundle import InputSpec
from edge_shitu.image import Workspace, resize_normalize_chw

__all__ = ["image_to_tensor"]


def image_to_tensor(image: np.ndarray, spec: InputSpec, *, out: Optional[np.ndarray] = None,
                    workspace: Optional[Workspace] = None) -> np.ndarray:
    """Stretch, scale and normalise one RGB image.

    Args:
      image: uint8 (H, W, 3) RGB; any strides (a crop view is read without a copy).
      spec: the model's input description.
      out: optional float32 (3, spec.height, spec.width) C-contiguous array to write into, such as
        a slot of a batch; returned.
      workspace: scratch memory reused from call to call (see :class:`~edge_shitu.image.Workspace`).

    Returns:
      float32 (3, spec.height, spec.width).
    """
    return resize_normalize_chw(image, spec.width, spec.height, spec.mean, spec.std, spec.scale,
                                interpolation=spec.interpolation, reverse_channels=spec.channel_order == "BGR",
                                out=out, workspace=workspace)
