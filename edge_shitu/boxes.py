"""Box geometry in pure numpy: IoU and greedy non-maximum suppression.

Boxes are float (n, 4) ``[x1, y1, x2, y2]`` in pixels; areas use the continuous convention
(no "+1"), as Paddle's multiclass_nms3 does with ``normalized=True``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["areas", "iou_one_to_many", "nms"]


def areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of float (n, 4) boxes; inverted boxes have area 0. Returns float (n,)."""
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    return w * h


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray, box_area: Optional[float] = None,
                    boxes_area: Optional[np.ndarray] = None) -> np.ndarray:
    """IoU of one box (4,) with each of ``boxes`` (n, 4). Returns float (n,); 0 where the union is empty."""
    if box_area is None:
        box_area = float(areas(box[None])[0])
    if boxes_area is None:
        boxes_area = areas(boxes)
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    union = box_area + boxes_area - inter
    # Divides only where the union is not empty: no warnings to silence, 0 elsewhere.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, order: np.ndarray, iou_threshold: float, *, max_keep: Optional[int] = None) -> np.ndarray:
    """Greedy NMS: walk ``order`` best first; keep a box unless its IoU with a kept box exceeds the threshold.

    Args:
      boxes: float (n, 4).
      order: int (m,) indices into ``boxes``, best first (the caller decides what "best" means).
      iou_threshold: a box is suppressed when IoU > this value (a box at exactly the threshold stays).
      max_keep: stop after this many kept boxes.

    Returns:
      int64 (k,) kept indices, in ``order``'s order.
    """
    order = np.asarray(order, dtype=np.int64)
    if order.size == 0:
        return order
    cand = boxes[order]
    cand_area = areas(cand)
    alive = np.ones(order.size, dtype=bool)
    keep = []
    limit = order.size if max_keep is None else max_keep
    for i in range(order.size):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        rest = slice(i + 1, None)
        overlap = iou_one_to_many(cand[i], cand[rest], float(cand_area[i]), cand_area[rest])
        alive[rest] &= overlap <= iou_threshold
    return order[np.asarray(keep, dtype=np.int64)]
