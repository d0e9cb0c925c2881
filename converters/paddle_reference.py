"""Paddle Inference runners of the official full PP-ShiTu graphs: the reference for parity tests and
benchmarks.

Both run on CPU with Paddle Inference's graph optimisation on (as PaddleClas' ``predictor.py`` does)
and oneDNN/MKLDNN off: oneDNN is not reliably stable with Paddle 3.x on these graphs and changes the
numerics, and a reference must be reproducible. Pre-processing is the caller's job: these classes
take the network inputs as arrays.
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_shitu_converters import paddle_io
from edge_shitu.errors import ClosedError, ConversionError, InvalidDtypeError, InvalidInputError

__all__ = ["ProgramSession", "PaddleDetectorReference", "PaddleExtractorReference"]


def _check_array(name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
    """Check dtype float32 and shape (``-1`` = any size) of an input array."""
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise InvalidDtypeError(f"{name} must be float32, got {array.dtype}")
    if array.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape, array.shape)):
        want = "(" + ", ".join("B" if s == -1 else str(s) for s in shape) + ")"
        raise InvalidInputError(f"{name} must have shape {want}, got {array.shape}")
    return np.ascontiguousarray(array)


class ProgramSession:
    """A Paddle inference program run by Paddle Inference in this process, shaped as a runtime session
    (:class:`edge_shitu.backends.base.Session`): the references below run on it, and the Paddle-Lite INT8
    search puts a fake-quantisation program through :func:`edge_shitu_converters.verify.verify_bundle` with it
    (``session_factory``).

    Args:
      model_dir: folder with ``inference.pdmodel`` (or ``.json``) and ``inference.pdiparams``.
      threads: CPU math threads (>= 1).

    Attributes:
      files: the model files found in ``model_dir``.
      input_names, output_names: the program's feed and fetch names, in its order.

    Raises:
      MissingFileError: a model file is missing.
      InvalidInputError: ``threads`` < 1.
      ConversionError: Paddle cannot load the program.
      BackendUnavailableError: paddlepaddle is not installed.
    """

    def __init__(self, model_dir: "os.PathLike[str] | str", *, threads: int = 1) -> None:
        self.files = paddle_io.find_model_files(model_dir)
        self._predictor = paddle_io.create_predictor(self.files, threads=threads)
        self.input_names: Tuple[str, ...] = tuple(self._predictor.get_input_names())
        self.output_names: Tuple[str, ...] = tuple(self._predictor.get_output_names())

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the program once.

        Args:
          feeds: input name -> array, one per name of :attr:`input_names`.
          outputs: names of :attr:`output_names` to return; None returns all.

        Returns:
          The arrays of ``outputs``, in that order.

        Raises:
          ClosedError: the session was closed.
          ConversionError: the Paddle run fails.
        """
        if self._predictor is None:
            raise ClosedError("this program session is closed")
        result = paddle_io.run_predictor(self._predictor, feeds)
        return [result[name] for name in (outputs or self.output_names)]

    def close(self) -> None:
        """Release the predictor; :meth:`run` refuses afterwards. Closing twice is harmless."""
        self._predictor = None


class PaddleDetectorReference:
    """The official PicoDet mainbody detector program, decode and ``multiclass_nms3`` included.

    Args:
      model_dir: folder with the official ``inference.pdmodel`` and an ``inference.pdiparams`` (official
        weights or a replica).
      threads: CPU math threads (>= 1).

    Raises:
      MissingFileError: a model file is missing.
      InvalidInputError: ``threads`` < 1.
      ConversionError: Paddle cannot load the model, or it does not take
        ``image``/``im_shape``/``scale_factor``.
      BackendUnavailableError: paddlepaddle is not installed.
    """

    def __init__(self, model_dir: "os.PathLike[str] | str", *, threads: int = 1) -> None:
        self._program = ProgramSession(model_dir, threads=threads)
        names = self._program.input_names
        if sorted(names) != ["im_shape", "image", "scale_factor"]:
            raise ConversionError(f"{self._program.files.directory}: expected a detector with inputs "
                                  f"image/im_shape/scale_factor, got {list(names)}")

    def run(self, image: np.ndarray, im_shape: np.ndarray, scale_factor: np.ndarray) -> np.ndarray:
        """Detect main bodies in one pre-processed image.

        Args:
          image: float32 (1, 3, 640, 640), RGB, normalised (``(x/255 - mean) / std``), CHW.
          im_shape: float32 (1, 2), the network input size ``[[640, 640]]`` (as PaddleClas feeds it).
          scale_factor: float32 (1, 2), ``[[640 / orig_h, 640 / orig_w]]``.

        Returns:
          float32 (N, 6), rows ``[class, score, x1, y1, x2, y2]`` in original-image pixels, as the
          in-graph ``multiclass_nms3`` gives them (score >= 0.025, at most 100, sorted by score).
          N may be 0.

        Raises:
          InvalidDtypeError: an input is not float32.
          InvalidInputError: an input has the wrong shape.
          ConversionError: the Paddle run fails.
        """
        feeds = {
            "image": _check_array("image", image, (1, 3, 640, 640)),
            "im_shape": _check_array("im_shape", im_shape, (1, 2)),
            "scale_factor": _check_array("scale_factor", scale_factor, (1, 2)),
        }
        outputs = self._program.run(feeds)
        boxes = np.asarray(outputs[0], dtype=np.float32)
        counts = np.asarray(outputs[1]).reshape(-1) if len(outputs) > 1 else None
        # multiclass_nms3 emits one dummy row when nothing survives; its box count says 0.
        if counts is not None and counts.size and int(counts[0]) == 0:
            return np.zeros((0, 6), np.float32)
        return boxes.reshape(-1, 6)


class PaddleExtractorReference:
    """An official PP-ShiTu feature extractor program (V2: PP-LCNetV2_base + BNNeck; V1: PP-LCNet x2.5).

    Args:
      model_dir: folder with ``inference.pdmodel`` (or ``.json``) and an ``inference.pdiparams``.
      threads: CPU math threads (>= 1).

    Raises:
      MissingFileError: a model file is missing.
      InvalidInputError: ``threads`` < 1.
      ConversionError: Paddle cannot load the model, or it has not exactly one input.
      BackendUnavailableError: paddlepaddle is not installed.
    """

    def __init__(self, model_dir: "os.PathLike[str] | str", *, threads: int = 1) -> None:
        self._program = ProgramSession(model_dir, threads=threads)
        inputs, outputs = self._program.input_names, self._program.output_names
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConversionError(f"{self._program.files.directory}: expected one input and one output, got "
                                  f"{list(inputs)} -> {list(outputs)}")

    def run(self, x: np.ndarray) -> np.ndarray:
        """Extract features of a batch of pre-processed crops.

        Args:
          x: float32 (B, 3, 224, 224), RGB, normalised, CHW; B >= 1.

        Returns:
          float32 (B, 512) raw features (not L2-normalised).

        Raises:
          InvalidDtypeError: ``x`` is not float32.
          InvalidInputError: ``x`` has the wrong shape or B == 0.
          ConversionError: the Paddle run fails.
        """
        x = _check_array("x", x, (-1, 3, 224, 224))
        if x.shape[0] == 0:
            raise InvalidInputError("x must hold at least one image, got shape (0, 3, 224, 224)")
        (features,) = self._program.run({self._program.input_names[0]: x})
        return np.asarray(features, dtype=np.float32)
