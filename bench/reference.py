"""The reference PP-ShiTu pipeline, rebuilt from its documented behaviour: the baseline of every speed claim.

Written from the documented behaviour of PaddleClas ``deploy/python``, not from its code. Per image:

1. decode: ``cv2.imread``, then BGR -> RGB as a reversed view (``[:, :, ::-1]``);
2. detector pre-process: ``cv2.resize`` INTER_CUBIC stretch to 640x640 by scale factors; ``float32 / 255``
   with the mean and std applied in float64 (the reference builds them with ``np.array(list)``); HWC -> CHW;
   inputs ``image``, ``im_shape`` = ``[[640, 640]]``, ``scale_factor`` = ``[[640/h, 640/w]]``;
3. detector: Paddle Inference on the official program, its decode and ``multiclass_nms3`` inside the graph;
4. ``parse_det_results``: the 5 best by score, then those >= 0.2; ``append_self``: the whole image is
   always added;
5. per region, one at a time: ``bbox.astype(int)`` crop, ``cv2.resize`` INTER_LINEAR to 224x224,
   ``(x * float32(1/255) - mean) / std`` in float32, CHW, one predictor call; L2 normalisation without
   epsilon; ``Binarize`` sign (0 -> bit 0) packed MSB-first byte by byte;
6. search: faiss ``IndexBinaryFlat`` (``"BFlat"``, not ID-mapped), top 5 by Hamming distance; the top-1 is
   accepted when <= ``hamming_radius`` 100, its label is ``id_map[id].split()[1]``;
7. ``nms_to_rec_results``: greedy, class-agnostic, IoU 0.05 with the +1 pixel convention, ranked by the
   search score *descending* (for Hamming distances that is worst match first: the reference's bug, kept).

Configuration reproduced: the PP-ShiTuV2 models and CPU predictor of ``inference_general.yaml`` (MKLDNN
on, cache capacity 10, IR optimisation, memory optimisation, zero-copy feeds, math-library threads) with the
binary post-process and index of ``inference_general_binary.yaml`` (``Binarize`` sign, ``BFlat``, Hamming
radius 100), so that it searches 512-bit codes like edge-shitu. The float ``HNSW32`` inner-product
configuration is not reproduced. The id map is stored as JSON instead of the reference's pickle.

Only the benchmark imports this module; it needs the ``bench`` extra (paddlepaddle, opencv, faiss).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.errors import BackendUnavailableError, ImageDecodeError, InvalidInputError, MissingFileError
from edge_shitu.recognizer import STAGES

__all__ = [
    "ReferenceOptions",
    "ReferenceIndex",
    "ReferenceResult",
    "ReferencePipeline",
    "det_preprocess",
    "parse_det_results",
    "append_self",
    "crop_region",
    "rec_preprocess",
    "l2_normalize",
    "binarize_sign",
    "nms_to_rec_results",
    "read_image",
]

DET_SIZE = 640
REC_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INDEX_FILE = "vector.index"
ID_MAP_FILE = "id_map.json"
_HINT = 'pip install "edge-shitu[bench]"'

# Detector normalisation constants as the reference builds them: float64, so the in-place
# subtraction and division run in float64 before the result is stored back as float32.
_DET_MEAN = np.array(MEAN)[np.newaxis, np.newaxis, :]
_DET_STD = np.array(STD)[np.newaxis, np.newaxis, :]
_REC_SCALE = np.float32(1.0 / 255.0)
_REC_MEAN = np.array(MEAN, dtype=np.float32).reshape(1, 1, 3)
_REC_STD = np.array(STD, dtype=np.float32).reshape(1, 1, 3)
_BYTE_WEIGHTS = np.array([[128], [64], [32], [16], [8], [4], [2], [1]])


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise BackendUnavailableError(f"the reference pipeline needs OpenCV ({exc}): {_HINT}") from None
    return cv2


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise BackendUnavailableError(f"the reference pipeline needs faiss ({exc}): {_HINT}") from None
    return faiss


@dataclass(frozen=True)
class ReferenceOptions:
    """Settings of the reference pipeline; the defaults are the reference's configuration.

    Attributes:
      threads: Paddle's CPU math-library threads (``cpu_num_threads``), >= 1.
      mkldnn: run Paddle with oneDNN (MKLDNN), as ``inference_general.yaml`` sets ``enable_mkldnn: True``.
      mkldnn_cache_capacity: oneDNN shape cache, 10 as in ``predictor.py``.
      det_threshold: detections below this score are dropped (``Global.threshold``).
      max_det_results: detections kept, best first, before the threshold (``Global.max_det_results``).
      return_k: search results per region (``IndexProcess.return_k``); only the top-1 is used.
      hamming_radius: accept the top-1 when its distance is at most this (``IndexProcess.hamming_radius``).
      rec_nms_threshold: IoU of the final NMS (``Global.rec_nms_thresold``).
      build_batch_size: images per extractor call when building an index (``IndexProcess.batch_size``).
    """

    threads: int = 1
    mkldnn: bool = True
    mkldnn_cache_capacity: int = 10
    det_threshold: float = 0.2
    max_det_results: int = 5
    return_k: int = 5
    hamming_radius: int = 100
    rec_nms_threshold: float = 0.05
    build_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("threads", "mkldnn_cache_capacity", "max_det_results", "return_k", "build_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.hamming_radius, bool) or not isinstance(self.hamming_radius, int) or self.hamming_radius < 0:
            raise InvalidInputError(f"hamming_radius must be an int >= 0, got {self.hamming_radius!r}")
        for name in ("det_threshold", "rec_nms_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidInputError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


def read_image(path: "os.PathLike[str] | str") -> np.ndarray:
    """Read an image as the reference does: ``cv2.imread`` (BGR), then a reversed-channel view (RGB).

    Returns:
      uint8 (H, W, 3) RGB, a negative-stride view of the decoded BGR array.

    Raises:
      MissingFileError: the file does not exist.
      ImageDecodeError: OpenCV cannot decode it.
      BackendUnavailableError: OpenCV is not installed.
    """
    cv2 = _cv2()
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: image not found")
    img = cv2.imread(str(p))
    if img is None:
        raise ImageDecodeError(f"{p}: OpenCV cannot decode this image")
    return img[:, :, ::-1]


def det_preprocess(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detector inputs of an RGB image (``DetResize`` interp 2, ``DetNormalizeImage``, ``DetPermute``).

    Args:
      img: uint8 (H, W, 3) RGB.

    Returns:
      ``(image, im_shape, scale_factor)``: float32 (1, 3, 640, 640); float32 (1, 2) ``[[640, 640]]`` (the
      resized shape, as the reference feeds it); float32 (1, 2) ``[[640/H, 640/W]]``.

    Raises:
      InvalidInputError: ``img`` is not a non-empty (H, W, 3) array.
      BackendUnavailableError: OpenCV is not installed.
    """
    cv2 = _cv2()
    _check_rgb(img, "img")
    h, w = img.shape[:2]
    scale_y, scale_x = DET_SIZE / h, DET_SIZE / w
    resized = cv2.resize(img, None, None, fx=scale_x, fy=scale_y, interpolation=cv2.INTER_CUBIC)
    x = resized.astype(np.float32, copy=False) / 255.0
    x -= _DET_MEAN
    x /= _DET_STD
    x = x.transpose((2, 0, 1)).copy()
    image = np.array((x,)).astype("float32")
    im_shape = np.array((resized.shape[:2],)).astype("float32")
    scale_factor = np.array(((scale_y, scale_x),)).astype("float32")
    return image, im_shape, scale_factor


def parse_det_results(boxes: np.ndarray, *, threshold: float = 0.2, max_det_results: int = 5) -> List[Dict[str, Any]]:
    """The reference's ``parse_det_results``: the ``max_det_results`` best rows by score, then those >= threshold.

    Args:
      boxes: float32 (N, 6) rows ``[class, score, x1, y1, x2, y2]`` (N may be 0).

    Returns:
      ``{"class_id": int, "score": float, "bbox": float32 (4,)}`` per kept row, best first.

    Raises:
      InvalidInputError: ``boxes`` is not (N, 6).
    """
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return []
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise InvalidInputError(f"boxes must have shape (N, 6), got {boxes.shape}")
    keep = boxes[:, 1].argsort()[::-1][:max_det_results]
    out = []
    for i in keep:
        row = boxes[i]
        if row[1] < threshold:
            continue
        out.append({"class_id": int(row[0]), "score": float(row[1]), "bbox": row[2:]})
    return out


def append_self(results: List[Dict[str, Any]], shape: Sequence[int]) -> List[Dict[str, Any]]:
    """Add the whole image as one more region (the reference always does), in place; returns ``results``."""
    results.append({"class_id": 0, "score": 1.0, "bbox": np.array([0, 0, shape[1], shape[0]])})
    return results


def crop_region(img: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """The reference's crop: ``bbox.astype(int)`` (truncation) and plain slicing, copied.

    Negative coordinates wrap around and inverted boxes give empty crops, as in the reference.

    Returns:
      uint8 (h, w, 3), possibly empty.
    """
    xmin, ymin, xmax, ymax = np.asarray(bbox).astype("int")
    return img[ymin:ymax, xmin:xmax, :].copy()


def rec_preprocess(crop: np.ndarray) -> np.ndarray:
    """Extractor input of one RGB crop (``ResizeImage`` 224 cv2 bilinear, ``NormalizeImage``, ``ToCHWImage``).

    Args:
      crop: uint8 (h, w, 3) RGB, h, w >= 1.

    Returns:
      float32 (3, 224, 224).

    Raises:
      InvalidInputError: ``crop`` is empty or not (h, w, 3) (the reference crashes in ``cv2.resize``).
      BackendUnavailableError: OpenCV is not installed.
    """
    cv2 = _cv2()
    _check_rgb(crop, "crop")
    resized = cv2.resize(crop, (REC_SIZE, REC_SIZE), interpolation=cv2.INTER_LINEAR)
    x = (resized.astype("float32") * _REC_SCALE - _REC_MEAN) / _REC_STD
    return x.transpose((2, 0, 1))


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation without epsilon, as the reference does (an all-zero row gives NaN)."""
    norm = np.sqrt(np.sum(np.square(features), axis=1, keepdims=True))
    return np.divide(features, norm)


def binarize_sign(features: np.ndarray) -> np.ndarray:
    """The reference's ``Binarize`` with method ``sign``: bit = ``(sign(x) + 1) / 2`` truncated (0 -> 0),
    packed MSB-first one byte at a time (one dot product per byte, as the reference does).

    Args:
      features: float (n, d), d a multiple of 8.

    Returns:
      uint8 (n, d / 8); equal to ``np.packbits(features > 0, axis=1)``.

    Raises:
      InvalidInputError: ``features`` is not 2-D or d is not a multiple of 8.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] % 8:
        raise InvalidInputError(f"features must be (n, d) with d a multiple of 8, got {features.shape}")
    bits = ((np.sign(features) + 1) / 2).astype("uint8")
    out = np.zeros((bits.shape[0], bits.shape[1] // 8), dtype=np.uint8)
    for i in range(bits.shape[1] // 8):
        out[:, i:i + 1] = np.dot(bits[:, i * 8:(i + 1) * 8], _BYTE_WEIGHTS)
    return out


def nms_to_rec_results(results: List[Dict[str, Any]], threshold: float) -> List[Dict[str, Any]]:
    """The reference's final NMS: greedy, class-agnostic, ranked by ``rec_scores`` descending, areas with +1.

    A region is dropped when its IoU with a kept, higher-ranked region exceeds ``threshold``.

    Args:
      results: dicts with ``bbox`` ``[x1, y1, x2, y2]`` and ``rec_scores``.

    Returns:
      The kept dicts, in ranking order.
    """
    if not results:
        return []
    boxes = np.array([r["bbox"] for r in results], dtype=np.float64)
    scores = np.array([r["rec_scores"] for r in results], dtype=np.float64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return [results[i] for i in keep]


def _check_rgb(img: Any, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        shape = getattr(img, "shape", type(img).__name__)
        raise InvalidInputError(f"{name} must be a non-empty (H, W, 3) array, got {shape}")


class _Predictor:
    """A Paddle Inference CPU predictor configured as the reference's ``deploy/utils/predictor.py``."""

    def __init__(self, model_dir: "os.PathLike[str] | str", options: ReferenceOptions) -> None:
        from edge_shitu_converters import paddle_io

        self.files = paddle_io.find_model_files(model_dir)
        paddle_io.import_paddle()
        from paddle import inference

        config = inference.Config(str(self.files.program), str(self.files.params))
        config.disable_gpu()
        if options.mkldnn:
            config.set_mkldnn_cache_capacity(options.mkldnn_cache_capacity)
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(options.threads)
        config.switch_ir_optim(True)
        if not self.files.is_pir:
            # Paddle 3.3 cannot create a second PIR predictor once memory_optimize_pass ran (see paddle_io).
            config.enable_memory_optim()
        config.switch_use_feed_fetch_ops(False)
        config.disable_glog_info()
        try:
            self._predictor = inference.create_predictor(config)
        except Exception as exc:  # Paddle raises its own untyped errors for unloadable programs
            from edge_shitu.errors import ConversionError

            raise ConversionError(f"Paddle Inference cannot load {self.files.directory}: {exc}") from None
        self.input_names = list(self._predictor.get_input_names())
        self._inputs = [self._predictor.get_input_handle(n) for n in self.input_names]
        self._outputs = [self._predictor.get_output_handle(n) for n in self._predictor.get_output_names()]

    def run(self, arrays: Sequence[np.ndarray], outputs: int = 1) -> List[np.ndarray]:
        for handle, array in zip(self._inputs, arrays):
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(array)
        self._predictor.run()
        return [h.copy_to_cpu() for h in self._outputs[:outputs]]


class ReferenceIndex:
    """The reference's binary gallery: a faiss ``IndexBinaryFlat`` with ids 0..n-1 and an id map of
    ``"path<TAB>label"`` lines. Build it with :meth:`from_codes` or :meth:`build`, or :meth:`load` it.
    """

    def __init__(self, index: Any, id_map: Mapping[int, str]) -> None:
        if index.ntotal != len(id_map):
            raise InvalidInputError(f"index holds {index.ntotal} codes but the id map {len(id_map)} entries")
        self.index = index
        self.id_map = dict(id_map)

    @classmethod
    def from_codes(cls, codes: np.ndarray, docs: Sequence[str]) -> "ReferenceIndex":
        """An index of given codes (``index_binary_factory(bits, "BFlat")``, then ``add``).

        Args:
          codes: uint8 (n, bits / 8), n >= 1.
          docs: n id-map lines, ``"path<TAB>label"``.

        Raises:
          InvalidInputError: empty, wrong dtype or shape, or ``docs`` of another length.
          BackendUnavailableError: faiss is not installed.
        """
        faiss = _faiss()
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[0] == 0:
            raise InvalidInputError(f"codes must be uint8 (n, bytes) with n >= 1, got {codes.dtype} {codes.shape}")
        if len(docs) != codes.shape[0]:
            raise InvalidInputError(f"got {codes.shape[0]} codes but {len(docs)} id-map lines")
        index = faiss.index_binary_factory(codes.shape[1] * 8, "BFlat")
        index.add(np.ascontiguousarray(codes))
        return cls(index, {i: str(d) for i, d in enumerate(docs)})

    @classmethod
    def build(cls, rec_dir: "os.PathLike[str] | str", images: Sequence["os.PathLike[str] | str"],
              docs: Sequence[str], *, options: Optional[ReferenceOptions] = None) -> "ReferenceIndex":
        """Build an index as the reference's ``build_gallery.py`` does: images read with OpenCV, batches of
        ``build_batch_size`` through the extractor, L2 normalised, binarised.

        Raises:
          MissingFileError, ImageDecodeError: an image cannot be read (the reference exits there).
          InvalidInputError: no images, or ``docs`` of another length.
          ConversionError: Paddle cannot load the extractor.
          BackendUnavailableError: paddlepaddle, OpenCV or faiss is not installed.
        """
        options = options or ReferenceOptions()
        if not images or len(images) != len(docs):
            raise InvalidInputError(f"need as many images as id-map lines (>= 1), got {len(images)} and {len(docs)}")
        extractor = _Predictor(rec_dir, options)
        chunks = []
        for start in range(0, len(images), options.build_batch_size):
            batch = np.array([rec_preprocess(read_image(p)) for p in images[start:start + options.build_batch_size]])
            (features,) = extractor.run([batch])
            chunks.append(binarize_sign(l2_normalize(features)))
        return cls.from_codes(np.concatenate(chunks), docs)

    @classmethod
    def load(cls, directory: "os.PathLike[str] | str") -> "ReferenceIndex":
        """Read ``vector.index`` (faiss binary) and ``id_map.json`` from ``directory``.

        Raises:
          MissingFileError: a file is missing.
          InvalidInputError: the two files disagree or the id map is not valid.
          BackendUnavailableError: faiss is not installed.
        """
        faiss = _faiss()
        d = Path(directory)
        for name in (INDEX_FILE, ID_MAP_FILE):
            if not (d / name).is_file():
                raise MissingFileError(f"{d / name}: reference index file not found")
        try:
            raw = json.loads((d / ID_MAP_FILE).read_text(encoding="utf-8"))
            id_map = {int(k): str(v) for k, v in raw.items()}
        except (ValueError, AttributeError) as exc:
            raise InvalidInputError(f"{d / ID_MAP_FILE}: not a JSON id map ({exc})") from None
        return cls(faiss.read_index_binary(str(d / INDEX_FILE)), id_map)

    def save(self, directory: "os.PathLike[str] | str") -> Path:
        """Write ``vector.index`` and ``id_map.json`` into ``directory`` (created).

        Raises:
          OSError: the files cannot be written.
        """
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index_binary(self.index, str(d / INDEX_FILE))
        (d / ID_MAP_FILE).write_text(json.dumps({str(k): v for k, v in self.id_map.items()}, ensure_ascii=False),
                                     encoding="utf-8")
        return d

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, codes: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Hamming top-k: ``(distances int32 (n, k), ids int64 (n, k))`` as faiss returns them."""
        return self.index.search(codes, k)


@dataclass(frozen=True)
class ReferenceResult:
    """One image through the reference pipeline.

    Attributes:
      results: ``{"bbox": [x1, y1, x2, y2] ints, "rec_docs": label, "rec_scores": Hamming distance}`` after
        the final NMS.
      timings_ms: per stage (keys :data:`edge_shitu.recognizer.STAGES`), ``total`` the wall time.
      detections: detector regions kept by ``parse_det_results`` (before the whole image is added).
      crops: regions sent to the extractor (detections + the whole image, minus empty crops).
      empty_crops: regions whose integer crop was empty; the reference crashes in ``cv2.resize`` on them,
        here they are skipped and counted.
    """

    results: Tuple[Dict[str, Any], ...]
    timings_ms: Mapping[str, float]
    detections: int
    crops: int
    empty_crops: int


class _Clock:
    def __init__(self) -> None:
        self.ms = {k: 0.0 for k in STAGES}
        self._start = self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] += (now - self._last) * 1000.0
        self._last = now

    def finish(self) -> Dict[str, float]:
        self.ms["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.ms


class ReferencePipeline:
    """Detector + extractor in Paddle Inference, OpenCV pre-processing, faiss binary search, the reference's
    region handling. Build it with :meth:`from_models`."""

    def __init__(self, detector: _Predictor, extractor: _Predictor, index: ReferenceIndex,
                 options: ReferenceOptions) -> None:
        self.detector = detector
        self.extractor = extractor
        self.index = index
        self.options = options

    @classmethod
    def from_models(cls, det_dir: "os.PathLike[str] | str", rec_dir: "os.PathLike[str] | str",
                    index: ReferenceIndex, *, options: Optional[ReferenceOptions] = None) -> "ReferencePipeline":
        """Load the official (or replica) Paddle programs.

        Args:
          det_dir: the PicoDet mainbody folder (``inference.pdmodel`` + ``inference.pdiparams``, with the
            in-graph post-process).
          rec_dir: the extractor folder.
          index: the gallery to search.
          options: settings; the reference's by default.

        Raises:
          MissingFileError: a model file is missing.
          ConversionError: Paddle cannot load a program.
          InvalidInputError: the detector does not take ``image``/``im_shape``/``scale_factor``.
          BackendUnavailableError: paddlepaddle, OpenCV or faiss is not installed.
        """
        options = options or ReferenceOptions()
        _cv2()
        _faiss()
        detector = _Predictor(det_dir, options)
        if sorted(detector.input_names) != ["im_shape", "image", "scale_factor"]:
            raise InvalidInputError(f"{det_dir}: expected a detector with inputs image/im_shape/scale_factor, "
                                    f"got {detector.input_names}")
        return cls(detector, _Predictor(rec_dir, options), index, options)

    def detect(self, img: np.ndarray) -> np.ndarray:
        """Raw detector output of an RGB image: float32 (N, 6) ``[class, score, x1, y1, x2, y2]``, N may be 0."""
        inputs = dict(zip(("image", "im_shape", "scale_factor"), det_preprocess(img)))
        (boxes,) = self.detector.run([inputs[n] for n in self.detector.input_names])
        return boxes if int(np.prod(boxes.shape)) >= 6 else np.zeros((0, 6), np.float32)

    def recognize(self, path: "os.PathLike[str] | str") -> ReferenceResult:
        """Run one image file through the whole reference pipeline.

        Raises:
          MissingFileError, ImageDecodeError: the image cannot be read.
        """
        opts = self.options
        clock = _Clock()
        img = read_image(path)
        clock.lap("decode")
        inputs = dict(zip(("image", "im_shape", "scale_factor"), det_preprocess(img)))
        feeds = [inputs[n] for n in self.detector.input_names]
        clock.lap("det_pre")
        (boxes,) = self.detector.run(feeds)
        clock.lap("det_infer")
        if int(np.prod(boxes.shape)) < 6:
            boxes = np.zeros((0, 6), np.float32)
        regions = parse_det_results(boxes, threshold=opts.det_threshold, max_det_results=opts.max_det_results)
        detections = len(regions)
        append_self(regions, img.shape)
        clock.lap("det_post")
        output, crops, empty = [], 0, 0
        for region in regions:
            piece = crop_region(img, region["bbox"])
            if piece.shape[0] == 0 or piece.shape[1] == 0:
                empty += 1
                clock.lap("rec_pre")
                continue
            batch = np.array([rec_preprocess(piece)])
            clock.lap("rec_pre")
            (features,) = self.extractor.run([batch])
            clock.lap("rec_infer")
            codes = binarize_sign(l2_normalize(features))
            clock.lap("rec_post")
            crops += 1
            scores, docs = self.index.search(codes, opts.return_k)
            if scores[0][0] <= opts.hamming_radius:
                xmin, ymin, xmax, ymax = np.asarray(region["bbox"]).astype("int")
                output.append({"bbox": [int(xmin), int(ymin), int(xmax), int(ymax)],
                               "rec_docs": self.index.id_map[int(docs[0][0])].split()[1],
                               "rec_scores": int(scores[0][0])})
            clock.lap("search")
        kept = nms_to_rec_results(output, opts.rec_nms_threshold)
        clock.lap("nms")
        return ReferenceResult(tuple(kept), clock.finish(), detections, crops, empty)
