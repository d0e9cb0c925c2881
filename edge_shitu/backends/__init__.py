"""Inference backends behind one interface (:class:`Session`); each is imported only when selected."""

from __future__ import annotations

from typing import Optional, Sequence

from edge_shitu.backends.base import Session
from edge_shitu.errors import BundleError
from edge_shitu.options import check_threads

__all__ = ["Session", "create_session"]


def create_session(spec, *, name: Optional[str] = None, threads: Optional[int] = None) -> Session:
    """Create a session for one model of a bundle.

    A model of a one-file bundle is handed to the backend as bytes, never written to disk.

    Args:
      spec: the :class:`edge_shitu.bundle.ModelSpec` to load.
      name: backend name; ``None`` uses the backend the bundle names. A different name is an error,
        because a model file only runs on the backend it was converted for; the exception is
        ``"android"``, which runs an onnxruntime bundle's files through ONNX Runtime for Android.
      threads: intra-op threads, from 1 to ``os.cpu_count()`` (ignored by Paddle-Lite's x86 build,
        which runs on one thread, but checked all the same).

    Raises:
      InvalidInputError: ``threads`` is not an int from 1 to ``os.cpu_count()``.
      BundleError: the requested backend cannot run this model file, or (onnxruntime) the model's
        inputs differ from the manifest's: another input name, more inputs, or a fixed dimension
        that differs from the manifest's shape.
      TargetMismatchError: a Paddle-Lite model was built for another machine.
      IntegrityError: a Paddle-Lite model file is not a complete ``.nb`` file.
      BackendUnavailableError: the backend's package is not installed.
    """
    if threads is not None:
        threads = check_threads(threads)
    backend = name or spec.backend
    if backend == "android" and spec.backend == "onnxruntime":
        # The same ONNX file, run by ONNX Runtime's Android library instead of its Python package.
        from edge_shitu.backends.android import AndroidOrtSession

        return _onnx_session(AndroidOrtSession, spec, threads)
    if backend != spec.backend:
        raise BundleError(
            f"{spec.path}: this {spec.role} was converted for the {spec.backend} backend, not {backend}; "
            f"convert the models for {backend} or choose --backend {spec.backend}"
        )
    if backend == "onnxruntime":
        from edge_shitu.backends.onnxruntime import OnnxRuntimeSession

        session = _onnx_session(OnnxRuntimeSession, spec, threads)
    elif backend == "paddlelite":
        from edge_shitu.backends.paddlelite import PaddleLiteSession

        # Lite checks neither the machine nor input shapes itself: both are checked by the session.
        shapes = {spec.input.name: spec.input.shape}
        if spec.member is None:
            session = PaddleLiteSession.from_file(spec.path, target=spec.target, threads=threads, input_shapes=shapes)
        else:
            session = PaddleLiteSession.from_bytes(spec.read_bytes(), where=str(spec.path), target=spec.target,
                                                   threads=threads, input_shapes=shapes)
    else:
        raise BundleError(f"{spec.path}: backend {backend!r} is not available in this edge-shitu build")
    missing = [spec.input.name] if spec.input.name not in session.input_names else []
    if missing:
        raise BundleError(f"{spec.path}: model has inputs {list(session.input_names)}, manifest names {spec.input.name!r}")
    return session


def _onnx_session(session_class, spec, threads: Optional[int]) -> Session:
    """An ONNX model of a bundle (a file, or a one-file bundle's member as bytes), its inputs checked."""
    if spec.member is None:
        session = session_class.from_file(spec.path, threads=threads)
    else:
        session = session_class.from_bytes(spec.read_bytes(), where=str(spec.path), threads=threads)
    try:
        _check_onnx_inputs(spec, session)
    except BaseException:
        session.close()
        raise
    return session


def _check_onnx_inputs(spec, session) -> None:
    """The model must take exactly the manifest's input, and every dimension it fixes must be the manifest's."""
    manifest = spec.manifest or spec.path
    where = f"{manifest}: models.{spec.role}.input"
    if tuple(session.input_names) != (spec.input.name,):
        raise BundleError(f"{where}.name is {spec.input.name!r}, but {spec.path.name} takes the inputs "
                          f"{list(session.input_names)}; the runtime feeds exactly one")
    model = tuple(session.input_shapes[spec.input.name])
    declared = tuple(spec.input.shape)
    if len(model) != len(declared) or any(isinstance(m, int) and m != d for m, d in zip(model, declared)):
        raise BundleError(f"{where}.shape is {list(declared)}, but {spec.path.name} takes {spec.input.name!r} of "
                          f"shape {_shown(model)}; fixed dimensions must agree (-1 in the manifest is any batch)")


def _shown(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
