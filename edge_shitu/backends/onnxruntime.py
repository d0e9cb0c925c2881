"""onnxruntime backend (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.errors import BackendUnavailableError, BundleError

__all__ = ["OnnxRuntimeSession"]


class OnnxRuntimeSession:
    """A model file run by onnxruntime's CPU execution provider.

    Build it with :meth:`from_file`.
    """

    def __init__(self, session) -> None:
        self._session = session
        self._inputs = tuple(i.name for i in session.get_inputs())
        self._outputs = tuple(o.name for o in session.get_outputs())

    @classmethod
    def from_file(cls, path: Path, *, threads: Optional[int] = None) -> "OnnxRuntimeSession":
        """Load an ONNX model.

        Args:
          path: the ``.onnx`` file.
          threads: intra-op threads; ``None`` lets onnxruntime decide.

        Raises:
          BackendUnavailableError: onnxruntime is not installed.
          BundleError: the file is not a loadable ONNX model.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the onnxruntime backend is not installed ({exc}); run: pip install \"edge-shitu[onnx]\""
            ) from None
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"{path}: onnxruntime cannot load this model: {exc}") from None
        return cls(session)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model; see :class:`edge_shitu.backends.base.Session`."""
        return self._session.run(list(outputs) if outputs is not None else None, dict(feeds))

    def close(self) -> None:
        self._session = None
