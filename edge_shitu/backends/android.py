"""Android backend: a bundle's ONNX models run by ONNX Runtime for Android, called through Chaquopy's Java bridge.

Chaquopy has no onnxruntime wheel, so on a phone the models run in the ORT Android library (the AAR) behind a
small Kotlin class, ``com.edgeshitu.demo.OrtBridge`` (``android_demo/app/src/main/java/com/edgeshitu/demo/
OrtBridge.kt``), and everything else stays in Python. What crosses the bridge is chosen to be cheap under
Chaquopy's conversion rules: each input goes as one 1-D C-contiguous float32 array (converted to a Java
``float[]`` in one copy) plus its shape as ``long[]``; each output comes back as a ``float[]`` and a ``long[]``,
read through the buffer protocol with one copy. The bridge's contract::

    OrtBridge.fromFile(path: String, threads: Int): OrtBridge      // threads <= 0: ORT's default
    OrtBridge.fromBytes(model: ByteArray, threads: Int): OrtBridge
    inputNames(): Array<String>; outputNames(): Array<String>; inputShape(name: String): LongArray
    run(name: String, data: FloatArray, shape: LongArray): Outputs  // Outputs.data: Array<FloatArray>,
                                                                    // Outputs.shapes: Array<LongArray>
    close()

The ``java`` module is imported only when a session is created, so the runtime imports anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.errors import BackendUnavailableError, BundleError, InvalidDtypeError, InvalidInputError
from edge_shitu.options import check_threads

__all__ = ["AndroidOrtSession", "BRIDGE_CLASS"]

BRIDGE_CLASS = "com.edgeshitu.demo.OrtBridge"
"""The Kotlin class that owns the ORT session on the phone."""


def _java():
    try:
        import java  # Chaquopy's bridge module, present only inside an Android app
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the android backend runs only inside a Chaquopy app (no 'java' module: {exc}); elsewhere use "
            "the onnxruntime backend"
        ) from None
    return java


def _bridge_error(where: str, what: str, exc: BaseException) -> BundleError:
    # Java exceptions arrive as Python exceptions whose text is the Java class and message.
    return BundleError(f"{where}: ONNX Runtime for Android cannot {what}: {' '.join(str(exc).split())}")


class AndroidOrtSession:
    """A model run by ONNX Runtime for Android through the Kotlin ``OrtBridge``.

    Build it with :meth:`from_file` or :meth:`from_bytes`. One run at a time (the runtime's stages call it so).
    """

    def __init__(self, bridge, java, where: str) -> None:
        self._bridge = bridge
        self._java = java
        self._where = where
        self._inputs = tuple(str(n) for n in bridge.inputNames())
        self._outputs = tuple(str(n) for n in bridge.outputNames())
        self._input_shapes = {n: tuple(None if int(d) < 0 else int(d) for d in bridge.inputShape(n))
                              for n in self._inputs}

    @classmethod
    def from_file(cls, path: Path, *, threads: Optional[int] = None) -> "AndroidOrtSession":
        """Load an ONNX model file.

        Raises:
          InvalidInputError: ``threads`` is not an int from 1 to ``os.cpu_count()``.
          BackendUnavailableError: not inside a Chaquopy app (or the bridge class is missing from it).
          BundleError: ORT for Android cannot load the file.
        """
        return cls._create("fromFile", str(path), str(path), threads)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str, threads: Optional[int] = None) -> "AndroidOrtSession":
        """Load an ONNX model from memory (a model of a one-file bundle).

        Raises:
          InvalidDtypeError: ``data`` is not ``bytes``.
          InvalidInputError, BackendUnavailableError, BundleError: as :meth:`from_file`.
        """
        if not isinstance(data, bytes):
            raise InvalidDtypeError(f"{where}: model data must be bytes, got {type(data).__name__}")
        return cls._create("fromBytes", data, where, threads)

    @classmethod
    def _create(cls, factory: str, model: Union[str, bytes], where: str, threads: Optional[int]):
        threads = 0 if threads is None else check_threads(threads)
        java = _java()
        try:
            bridge_class = java.jclass(BRIDGE_CLASS)
        except Exception as exc:  # the class is missing from this app: a packaging error, not a model error
            raise BackendUnavailableError(f"this app has no {BRIDGE_CLASS} ({exc}); see android_demo/") from None
        try:
            bridge = getattr(bridge_class, factory)(model, threads)
        except Exception as exc:  # an OrtException through the bridge
            raise _bridge_error(where, "load this model", exc) from None
        try:
            return cls(bridge, java, where)
        except BaseException:
            bridge.close()
            raise

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self._inputs

    @property
    def input_shapes(self) -> Mapping[str, Tuple[Optional[int], ...]]:
        """Input name -> declared shape, None for a dynamic dimension."""
        return self._input_shapes

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model; see :class:`edge_shitu.backends.base.Session`.

        Raises:
          InvalidInputError: not exactly one feed, an unknown input or output name.
          InvalidDtypeError: a feed that is not float32.
          BundleError: the model failed on the phone.
        """
        if self._bridge is None:
            raise InvalidInputError(f"{self._where}: this session is closed")
        if len(feeds) != 1:
            raise InvalidInputError(f"{self._where}: the android backend feeds exactly one input, got {len(feeds)}")
        (name, value), = feeds.items()
        if name not in self._inputs:
            raise InvalidInputError(f"{self._where}: no input {name!r}; the model takes {list(self._inputs)}")
        arr = np.asarray(value)
        if arr.dtype != np.float32:
            raise InvalidDtypeError(f"{self._where}: input {name!r} must be float32, got {arr.dtype}")
        wanted = list(self._outputs if outputs is None else outputs)
        unknown = [o for o in wanted if o not in self._outputs]
        if unknown:
            raise InvalidInputError(f"{self._where}: no outputs {unknown}; the model has {list(self._outputs)}")
        # One copy each way: a 1-D C-contiguous float32 array is Chaquopy's fast path to float[].
        flat = np.ascontiguousarray(arr).reshape(-1)
        jarray, jfloat, jlong = self._java.jarray, self._java.jfloat, self._java.jlong
        try:
            result = self._bridge.run(name, jarray(jfloat)(flat), jarray(jlong)(np.asarray(arr.shape, dtype=np.int64)))
        except Exception as exc:
            raise _bridge_error(self._where, "run this model", exc) from None
        by_name = {}
        for out_name, data, shape in zip(self._outputs, result.data, result.shapes):
            dims = tuple(int(d) for d in shape)
            values = np.array(data, dtype=np.float32, copy=True)  # buffer protocol: one copy out of Java
            if values.size != int(np.prod(dims, dtype=np.int64)):
                raise BundleError(f"{self._where}: output {out_name!r} has {values.size} values for shape {dims}")
            by_name[out_name] = values.reshape(dims)
        return [by_name[o] for o in wanted]

    def close(self) -> None:
        """Release the ORT session on the phone. Calling it twice is harmless."""
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.close()
