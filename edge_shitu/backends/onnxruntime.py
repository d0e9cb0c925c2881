"""onnxruntime backend (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.errors import BackendUnavailableError, BundleError, InvalidDtypeError
from edge_shitu.options import check_threads

__all__ = ["OnnxRuntimeSession", "SESSION_CONFIG", "session_options"]

SESSION_CONFIG = {
    # No spinning: an idle intra-op worker sleeps at once instead of spinning (by default about 30 ms
    # after every run). On a machine with as many cores as threads a spinning worker takes the core that the
    # other model's session, the Python stages or another process need, and a run whose partner thread is
    # descheduled stalls; two threads were then slower than one (docs/benchmarks.md, "Threads").
    "session.intra_op.allow_spinning": "0",
    # A bundle's float layers stay float: onnxruntime's WeightBiasQuantization otherwise rounds the float weights of
    # every Conv/Gemm that reads a DequantizeLinear to one per-tensor int8 scale when the session loads, behind the
    # converter's back (a layer the INT8 search keeps float, a model with only its activations INT8).
    "optimization.disable_specified_optimizers": "WeightBiasQuantization",
}
"""Session config entries every session gets (keys of onnxruntime's ``onnxruntime_session_options_config_keys.h``)."""


def session_options(ort, *, threads: Optional[int] = None):
    """``ort.SessionOptions`` as this backend's sessions have them: :data:`SESSION_CONFIG`, warnings only.

    Args:
      ort: the imported ``onnxruntime`` module.
      threads: intra-op threads (one inter-op thread); None lets onnxruntime decide.
    """
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3
    return so


class OnnxRuntimeSession:
    """A model file run by onnxruntime's CPU execution provider.

    Build it with :meth:`from_file` or :meth:`from_bytes`.
    """

    def __init__(self, session) -> None:
        self._session = session
        inputs = session.get_inputs()
        self._inputs = tuple(i.name for i in inputs)
        self._input_shapes = {i.name: tuple(_dim(d) for d in (i.shape or ())) for i in inputs}
        self._outputs = tuple(o.name for o in session.get_outputs())

    @classmethod
    def from_file(cls, path: Path, *, threads: Optional[int] = None) -> "OnnxRuntimeSession":
        """Load an ONNX model.

        Args:
          path: the ``.onnx`` file.
          threads: intra-op threads, from 1 to ``os.cpu_count()``; ``None`` lets onnxruntime decide.

        Raises:
          InvalidInputError: ``threads`` is not an int in that range.
          BackendUnavailableError: onnxruntime is not installed.
          BundleError: the file is not a loadable ONNX model.
        """
        return cls._create(str(path), path, threads)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str, threads: Optional[int] = None) -> "OnnxRuntimeSession":
        """Load an ONNX model from memory (a model of a one-file bundle, never written to disk).

        Args:
          data: the ``.onnx`` file's bytes.
          where: what names the model in messages (``bundle.esb:extractor.onnx``).
          threads: intra-op threads, from 1 to ``os.cpu_count()``; ``None`` lets onnxruntime decide.

        Raises:
          InvalidInputError: ``threads`` is not an int in that range.
          InvalidDtypeError: ``data`` is not ``bytes``.
          BackendUnavailableError: onnxruntime is not installed.
          BundleError: the bytes are not a loadable ONNX model.
        """
        if not isinstance(data, bytes):
            raise InvalidDtypeError(f"{where}: model data must be bytes, got {type(data).__name__}")
        return cls._create(data, where, threads)

    @classmethod
    def _create(cls, model: Union[str, bytes], where, threads: Optional[int]) -> "OnnxRuntimeSession":
        if threads is not None:
            threads = check_threads(threads)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the onnxruntime backend is not installed ({exc}); run: pip install \"edge-shitu[onnx]\""
            ) from None
        try:
            session = ort.InferenceSession(model, sess_options=session_options(ort, threads=threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"{where}: onnxruntime cannot load this model: {exc}") from None
        return cls(session)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self._inputs

    @property
    def input_shapes(self) -> Mapping[str, Tuple[Union[int, str, None], ...]]:
        """Input name -> shape the model declares: an int per fixed dimension, else its symbolic name or None."""
        return self._input_shapes

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model; see :class:`edge_shitu.backends.base.Session`."""
        return self._session.run(list(outputs) if outputs is not None else None, dict(feeds))

    def close(self) -> None:
        self._session = None


def _dim(d) -> Union[int, str, None]:
    # Exporters mark a free dimension by a name, by nothing, or by a non-positive size.
    if isinstance(d, int) and not isinstance(d, bool):
        return d if d > 0 else None
    return d if isinstance(d, str) else None
