"""PicoDet mainbody detector: pre-process (numpy) -> session (raw heads) -> PicoDet decode + NMS (numpy).

The official model's post-process (decode + multiclass_nms3 inside the Paddle graph) is reproduced
here exactly, so the bundle's model stops at the eight raw head outputs and needs no custom operator.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.backends import Session, create_session
from edge_shitu.boxes import nms
from edge_shitu.bundle import Bundle, HeadsSpec, ModelSpec
from edge_shitu.errors import BundleError, ClosedError, InvalidInputError
from edge_shitu.image import Workspace, load_image
from edge_shitu.options import DetectorOptions
from edge_shitu.preprocess import image_to_tensor
from edge_shitu.types import Detection

__all__ = ["Detector", "decode_picodet", "detector_input"]


def _softmax_expectation(logits: np.ndarray, reg_max: int) -> np.ndarray:
    """Distribution-focal distances: softmax over ``reg_max + 1`` bins, then the expected bin.

    Args:
      logits: float32 (n, 4 * (reg_max + 1)).

    Returns:
      float32 (n, 4) distances in cells, ordered left, top, right, bottom.
    """
    bins = logits.reshape(-1, 4, reg_max + 1)
    e = np.exp(bins - bins.max(axis=2, keepdims=True))
    return (e @ np.arange(reg_max + 1, dtype=np.float32)) / e.sum(axis=2)


@functools.lru_cache(maxsize=16)
def _anchor_grid(strides: Tuple[int, ...], cell_offset: float, in_w: int,
                 in_h: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Anchor centres ``(i + cell_offset) * stride`` (float32, in input pixels) and strides (float32) of
    every level's cells, row-major, concatenated level by level; and the levels' first rows (int64, with
    the total as a last entry)."""
    xs, ys, ss, starts = [], [], [], [0]
    for stride in strides:
        fm_w, fm_h = math.ceil(in_w / stride), math.ceil(in_h / stride)
        cell = np.arange(fm_w * fm_h)
        xs.append(((cell % fm_w).astype(np.float32) + np.float32(cell_offset)) * np.float32(stride))
        ys.append(((cell // fm_w).astype(np.float32) + np.float32(cell_offset)) * np.float32(stride))
        ss.append(np.full(cell.size, stride, dtype=np.float32))
        starts.append(starts[-1] + cell.size)
    grid = (np.concatenate(xs), np.concatenate(ys), np.concatenate(ss), np.array(starts, dtype=np.int64))
    for arr in grid:
        arr.setflags(write=False)
    return grid


def _level_top_k(best: np.ndarray, picked: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """``picked`` (the anchors whose best score passes a threshold) less, in every level with more than ``k`` of
    them, those outside the level's ``k`` best anchors, as the hosted graph's per-level top-k selects them (a tie
    at the k-th score is broken by ``argpartition``, as there). With more than ``k`` passing in a level, its ``k``
    best all pass."""
    parts = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        level = picked[(picked >= lo) & (picked < hi)]
        if level.size > k:
            level = np.sort(np.argpartition(-best[lo:hi], k - 1)[:k]) + lo
        parts.append(level)
    return np.concatenate(parts)


def decode_picodet(
    scores: Sequence[np.ndarray],
    logits: Sequence[np.ndarray],
    heads: HeadsSpec,
    *,
    input_size: Tuple[int, int],
    scale: Tuple[float, float],
    options: DetectorOptions,
    min_score: float = 0.0,
    max_keep: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode raw PicoDet heads and run per-class NMS, as the hosted model's graph does.

    Per level: keep the ``nms_top_k`` anchors with the highest class score, decode them
    (centre ``(i + cell_offset) * stride``, softmax-integral distances ``* stride``), clip to the
    network input, divide by the resize scale. Then per class: score > ``score_threshold``, the best
    ``nms_top_k`` by score, greedy NMS at ``nms_iou``; finally the best ``keep_top_k`` over classes.

    Args:
      scores: one float32 array per stride, (1, H, W, C) or (1, H*W, C), sigmoid scores.
      logits: one float32 array per stride, (1, H, W, 4*(reg_max+1)) or (1, H*W, 4*(reg_max+1)).
      heads: the bundle's head description.
      input_size: network input ``(width, height)``.
      scale: resize factors ``(sx, sy)`` = input size / original size.
      options: thresholds; fields left at None are the reference pipeline's.
      min_score: drop candidates below this score before NMS. Greedy NMS walks in score order, so
        lower-scored boxes never suppress higher-scored ones: the boxes at or above ``min_score`` come
        out exactly as without this cut, only cheaper.
      max_keep: stop each class's NMS after this many boxes (exact for the best ``max_keep``, same reason).

    Returns:
      ``(boxes float32 (n, 4) in original pixels, scores float32 (n,), classes int64 (n,))``,
      best score first, ``n <= keep_top_k``.

    Raises:
      BundleError: an output's size does not fit the strides and input size of the manifest.
    """
    options = options.with_defaults({})
    in_w, in_h = input_size
    sx, sy = scale
    c = heads.num_classes
    bins = 4 * (heads.reg_max + 1)
    level_scores, level_logits = [], []
    for level, stride in enumerate(heads.strides):
        fm_w, fm_h = math.ceil(in_w / stride), math.ceil(in_h / stride)
        sc = np.asarray(scores[level], dtype=np.float32)
        lg = np.asarray(logits[level], dtype=np.float32)
        if sc.size != fm_w * fm_h * c or lg.size != fm_w * fm_h * bins:
            raise BundleError(
                f"detector output for stride {stride} has shapes {sc.shape} and {lg.shape}; expected "
                f"{fm_h}x{fm_w} cells with {c} scores and {bins} box logits each"
            )
        level_scores.append(sc.reshape(-1, c))
        level_logits.append(lg.reshape(-1, bins))
    # All levels at once: the anchors of level l are rows starts[l]:starts[l + 1].
    centre_x, centre_y, strides, starts = _anchor_grid(heads.strides, heads.cell_offset, in_w, in_h)
    all_scores = np.concatenate(level_scores)
    best = all_scores.max(axis=1)
    # Anchors whose every class score is under the threshold can never reach the NMS: skip their decode.
    passing = (best > options.score_threshold) & (best >= min_score)
    picked = np.flatnonzero(passing)
    if picked.size > options.nms_top_k:
        picked = _level_top_k(best, picked, starts, options.nms_top_k)
    if picked.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    bounds = np.searchsorted(picked, starts)
    box_logits = np.concatenate([
        level_logits[level][picked[bounds[level]:bounds[level + 1]] - starts[level]]
        for level in range(len(level_logits))
    ])
    d = _softmax_expectation(box_logits, heads.reg_max)
    d *= strides[picked, None]
    cx, cy = centre_x[picked], centre_y[picked]
    b = np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=1)
    if options.clip:
        np.clip(b[:, 0::2], 0, in_w, out=b[:, 0::2])
        np.clip(b[:, 1::2], 0, in_h, out=b[:, 1::2])
    boxes = b / np.array([sx, sy, sx, sy], dtype=np.float32)
    cls_scores = all_scores[picked]

    kept_boxes, kept_scores, kept_classes = [], [], []
    for k in range(c):
        s = cls_scores[:, k]
        cand = np.flatnonzero((s > options.score_threshold) & (s >= min_score))
        order = cand[np.argsort(-s[cand], kind="stable")][: options.nms_top_k]
        keep = nms(boxes, order, options.nms_iou,
                   max_keep=options.keep_top_k if max_keep is None else min(max_keep, options.keep_top_k))
        kept_boxes.append(boxes[keep])
        kept_scores.append(s[keep])
        kept_classes.append(np.full(keep.size, k, dtype=np.int64))
    boxes = np.concatenate(kept_boxes)
    out_scores = np.concatenate(kept_scores)
    classes = np.concatenate(kept_classes)
    order = np.argsort(-out_scores, kind="stable")[: options.keep_top_k]
    return boxes[order], out_scores[order], classes[order]


def detector_input(spec: ModelSpec, image: np.ndarray, *,
                   workspace: Optional[Workspace] = None) -> Tuple[np.ndarray, Tuple[float, float]]:
    """The network input of a detector for an RGB image (what :meth:`Detector.preprocess` returns).

    Args:
      spec: the detector's model spec (its input description).
      image: uint8 (H, W, 3) RGB.
      workspace: scratch buffers to reuse between calls; default fresh ones.

    Returns:
      ``(tensor float32 (1, 3, h, w), (sx, sy))`` where ``(sx, sy)`` are the resize factors.

    Raises:
      InvalidInputError, InvalidDtypeError: ``image`` is not a uint8 (H, W, 3) array.
    """
    inp = spec.input
    tensor = np.empty((1, 3, inp.height, inp.width), dtype=np.float32)
    image_to_tensor(image, inp, out=tensor[0], workspace=workspace)
    h, w = image.shape[:2]
    return tensor, (inp.width / w, inp.height / h)


class Detector:
    """Mainbody detector of a bundle. Build it with :meth:`from_bundle`; close it (or use ``with``) when done."""

    def __init__(self, spec: ModelSpec, session: Session, options: DetectorOptions) -> None:
        if not isinstance(spec.output, HeadsSpec):
            raise BundleError(f"{spec.path}: not a detector (output kind is not picodet_heads)")
        self.spec = spec
        self.options = options.with_defaults(spec.defaults)
        self._session = session
        self._workspace = Workspace()
        self._outputs = list(spec.output.scores) + list(spec.output.boxes)
        missing = [n for n in self._outputs if n not in session.output_names]
        if missing:
            raise BundleError(f"{spec.path}: model has no output(s) {missing} named by the manifest")

    @classmethod
    def from_bundle(cls, bundle, *, options: Optional[DetectorOptions] = None,
                    session: Optional[Session] = None) -> "Detector":
        """Create the detector of a bundle.

        Args:
          bundle: a bundle directory or a loaded :class:`Bundle`.
          options: post-processing settings; fields left at None (or ``None`` for all) take the
            bundle's defaults, field by field (:meth:`DetectorOptions.with_defaults`).
          session: an already created session (tests inject fakes); ``None`` creates one.

        Raises:
          MissingFileError, BundleError, IntegrityError: the bundle is missing, malformed or damaged.
          BackendUnavailableError: the backend the bundle needs is not installed.
        """
        bundle = Bundle.load(bundle)
        spec = bundle.require("detector")
        options = options or DetectorOptions()
        if session is None:
            session = create_session(spec, name=options.backend.name, threads=options.backend.threads)
        return cls(spec, session, options)

    def preprocess(self, image: np.ndarray) -> Tuple[np.ndarray, Tuple[float, float]]:
        """Turn an RGB image into the network input.

        Args:
          image: uint8 (H, W, 3) RGB.

        Returns:
          ``(tensor float32 (1, 3, h, w), (sx, sy))`` where ``(sx, sy)`` are the resize factors.
        """
        return detector_input(self.spec, image, workspace=self._workspace)

    def infer(self, tensor: np.ndarray) -> List[np.ndarray]:
        """Run the network. Returns the score outputs, then the box outputs, in stride order."""
        if self._session is None:
            raise ClosedError(f"{self.spec.path}: this detector is closed")
        return self._session.run({self.spec.input.name: tensor}, self._outputs)

    def postprocess(self, outputs: Sequence[np.ndarray], *, image_size: Tuple[int, int],
                    scale: Tuple[float, float], min_score: Optional[float] = None) -> List[Detection]:
        """Decode raw outputs into detections.

        Args:
          outputs: what :meth:`infer` returned.
          image_size: original ``(width, height)``.
          scale: what :meth:`preprocess` returned.
          min_score: this call's minimum box score, in [0, 1], instead of the options' ``min_score``
            (a setting that changes while the detector runs, such as a kiosk's threshold).

        Returns:
          At most ``max_detections`` detections with score >= ``min_score``, best first; boxes clipped
          to the image, empty boxes dropped.

        Raises:
          InvalidInputError: ``min_score`` is not a number in [0, 1].
        """
        if min_score is None:
            min_score = self.options.min_score
        elif isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0.0 <= min_score <= 1.0:
            raise InvalidInputError(f"min_score must be a number in [0, 1], got {min_score!r}")
        heads = self.spec.output
        n = len(heads.strides)
        boxes, scores, classes = decode_picodet(
            outputs[:n], outputs[n:], heads, input_size=(self.spec.input.width, self.spec.input.height),
            scale=scale, options=self.options, min_score=min_score,
            max_keep=self.options.max_detections,
        )
        w, h = image_size
        result = []
        # Python numbers: cheaper to walk than numpy scalars, and the same values.
        for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
            if len(result) >= self.options.max_detections:
                break
            if score < min_score:
                break
            x1, y1, x2, y2 = box
            if self.options.clip:
                x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
                y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
            if x2 <= x1 or y2 <= y1:
                continue
            result.append(Detection((x1, y1, x2, y2), score, cls, self.spec.labels[cls]))
        return result

    def detect(self, image) -> List[Detection]:
        """Detect the main objects of an image.

        Args:
          image: a path, bytes, PIL image or uint8 (H, W, 3) RGB array.

        Returns:
          Detections, best first (empty when nothing passes the thresholds).

        Raises:
          MissingFileError, ImageDecodeError: the image cannot be read.
          InvalidInputError, InvalidDtypeError: an array input has the wrong shape or dtype.
        """
        img = load_image(image, max_pixels=self.options.max_pixels)
        tensor, scale = self.preprocess(img)
        return self.postprocess(self.infer(tensor), image_size=(img.shape[1], img.shape[0]), scale=scale)

    def close(self) -> None:
        """Release the session."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
