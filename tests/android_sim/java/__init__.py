"""A simulator of what the Android app gives the Python side: Chaquopy's ``java`` module and the app's Kotlin
``com.edgeshitu.demo.OrtBridge`` (android_demo/app/src/main/java/com/edgeshitu/demo/OrtBridge.kt), with the real
onnxruntime (the Python package) underneath.

It follows their contracts, not their implementation: Java arrays are copies with Java element types (float[]
holds float32, long[] int64), readable as numpy arrays; Java methods check their argument types as a Java
signature would; ``jclass`` of an unknown class fails. It counts how arrays are converted: Chaquopy turns a
1-D C-contiguous ndarray of the array's exact element type into a Java array with one copy (``fast``), and
anything else element by element (``slow``), which on a phone costs a JNI call per element.

What it cannot show: JNI and copy costs, device speed, ORT-Android's numerics (its CPU kernels are the same
code as the desktop's, but a phone's CPU features differ), and the Kotlin code itself, which is never compiled
here.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable

import numpy as np

__all__ = ["jclass", "jarray", "jfloat", "jlong", "jint", "jbyte", "JavaException", "stats", "reset"]

stats: Counter = Counter()
"""Conversion counts: ``fast`` and ``slow`` array conversions, ``calls`` into the bridge."""


def reset() -> None:
    """Zero :data:`stats`."""
    stats.clear()


class JavaException(Exception):
    """What a Java exception looks like from Python: its class name and message."""

    def __init__(self, java_class: str, message: str) -> None:
        super().__init__(f"{java_class}: {message}")
        self.java_class = java_class


class _Primitive:
    def __init__(self, name: str, dtype) -> None:
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self) -> str:
        return f"<java primitive {self.name}>"


jfloat = _Primitive("float", np.float32)
jlong = _Primitive("long", np.int64)
jint = _Primitive("int", np.int32)
jbyte = _Primitive("byte", np.int8)


class JavaArray:
    """A Java array of a primitive type (or of String): a copy, with the element type's precision."""

    def __init__(self, element, values, *, made_in_java: bool = False) -> None:
        self.element = element
        if element is str:
            self._values = [str(v) for v in values]
            return
        if made_in_java:  # built by the Kotlin side: no conversion from Python
            self._values = np.array(values, dtype=element.dtype)
            return
        if isinstance(values, np.ndarray) and values.ndim == 1 and values.flags.c_contiguous \
                and values.dtype == element.dtype:
            stats["fast"] += 1
            self._values = values.copy()
        else:
            stats["slow"] += 1
            items = list(values)
            for v in items:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise TypeError(f"cannot convert {type(v).__name__} to Java {element.name}")
            self._values = np.array(items, dtype=element.dtype)

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, i):
        return self._values[i]

    def __iter__(self):
        return iter(self._values)

    def __array__(self, dtype=None, copy=None):
        if self.element is str:
            raise TypeError("a String[] is not a numeric buffer")
        return self._values if dtype is None else self._values.astype(dtype)


def jarray(element):
    """``jarray(jfloat)(values)`` -> a Java ``float[]`` (likewise ``jlong``, ``jint``, ``jbyte``, ``str``)."""
    def make(values: Iterable) -> JavaArray:
        return JavaArray(element, values)
    return make


def _check(value, kind, what: str):
    ok = {"String": lambda v: isinstance(v, str),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
          "byte[]": lambda v: isinstance(v, (bytes, bytearray)) or (isinstance(v, JavaArray) and v.element is jbyte),
          "float[]": lambda v: isinstance(v, JavaArray) and v.element is jfloat,
          "long[]": lambda v: isinstance(v, JavaArray) and v.element is jlong}[kind]
    if not ok(value):
        # Chaquopy finds no overload for a Python value it cannot convert.
        raise TypeError(f"OrtBridge.{what}: no overload accepts {type(value).__name__} for a {kind} parameter")


class _Outputs:
    def __init__(self, data, shapes) -> None:
        self.data = data  # Array<FloatArray>, a @JvmField
        self.shapes = shapes  # Array<LongArray>, a @JvmField


class OrtBridge:
    """The Kotlin class's contract, over onnxruntime's Python package (CPU)."""

    def __init__(self, session) -> None:
        self._session = session

    @staticmethod
    def fromFile(path, threads):  # noqa: N802 - Java names
        _check(path, "String", "fromFile")
        _check(threads, "int", "fromFile")
        return OrtBridge._open(path, threads)

    @staticmethod
    def fromBytes(model, threads):  # noqa: N802
        _check(model, "byte[]", "fromBytes")
        _check(threads, "int", "fromBytes")
        data = bytes(model) if not isinstance(model, JavaArray) else np.asarray(model).tobytes()
        return OrtBridge._open(data, threads)

    @staticmethod
    def _open(model, threads: int) -> "OrtBridge":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            return OrtBridge(ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"]))
        except Exception as exc:
            raise JavaException("ai.onnxruntime.OrtException", str(exc)) from None

    def _live(self):
        if self._session is None:
            raise JavaException("java.lang.IllegalStateException", "this OrtBridge is closed")
        return self._session

    def inputNames(self):  # noqa: N802
        return JavaArray(str, [i.name for i in self._live().get_inputs()])

    def outputNames(self):  # noqa: N802
        return JavaArray(str, [o.name for o in self._live().get_outputs()])

    def inputShape(self, name):  # noqa: N802
        _check(name, "String", "inputShape")
        for i in self._live().get_inputs():
            if i.name == name:
                return JavaArray(jlong, [d if isinstance(d, int) and d > 0 else -1 for d in i.shape],
                                 made_in_java=True)
        raise JavaException("java.lang.IllegalArgumentException", f"no input {name}")

    def run(self, name, data, shape):
        _check(name, "String", "run")
        _check(data, "float[]", "run")
        _check(shape, "long[]", "run")
        stats["calls"] += 1
        session = self._live()
        dims = [int(d) for d in shape]
        if name not in [i.name for i in session.get_inputs()]:
            raise JavaException("java.lang.IllegalArgumentException", f"no input {name}")
        if len(data) != int(np.prod(dims, dtype=np.int64)):
            raise JavaException("java.lang.IllegalArgumentException",
                                f"{len(data)} values for shape {dims}")
        try:
            results = session.run(None, {name: np.asarray(data).reshape(dims)})
        except Exception as exc:
            raise JavaException("ai.onnxruntime.OrtException", str(exc)) from None
        if any(r.dtype != np.float32 for r in results):
            raise JavaException("java.lang.IllegalStateException", "an output is not float")
        # The Kotlin side copies each FloatBuffer into a new float[]: flat, row-major.
        return _Outputs([JavaArray(jfloat, np.ascontiguousarray(r).reshape(-1), made_in_java=True) for r in results],
                        [JavaArray(jlong, r.shape, made_in_java=True) for r in results])

    def close(self) -> None:
        self._session = None


_CLASSES: Dict[str, type] = {"com.edgeshitu.demo.OrtBridge": OrtBridge}


def jclass(name: str):
    """The Java class of that name, or the error Chaquopy raises for a class the app does not have."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise JavaException("java.lang.NoClassDefFoundError", name.replace(".", "/")) from None
