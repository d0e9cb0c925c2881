"""Inference backends behind one interface (:class:`Session`); each is imported only when selected."""

from __future__ import annotations

from typing import Optional

from edge_shitu.backends.base import Session
from edge_shitu.errors import BundleError

__all__ = ["Session", "create_session"]


def create_session(spec, *, name: Optional[str] = None, threads: Optional[int] = None) -> Session:
    """Create a session for one model of a bundle.

    Args:
      spec: the :class:`edge_shitu.bundle.ModelSpec` to load.
      name: backend name; ``None`` uses the backend the bundle names. A different name is an error,
        because a model file only runs on the backend it was converted for.
      threads: intra-op threads (ignored by Paddle-Lite's x86 build, which runs on one thread).

    Raises:
      BundleError: the requested backend cannot run this model file.
      TargetMismatchError: a Paddle-Lite model was built for another machine.
      IntegrityError: a Paddle-Lite model file is not a complete ``.nb`` file.
      BackendUnavailableError: the backend's package is not installed.
    """
    backend = name or spec.backend
    if backend != spec.backend:
        raise BundleError(
            f"{spec.path}: this {spec.role} was converted for the {spec.backend} backend, not {backend}; "
            f"convert the models for {backend} or choose --backend {spec.backend}"
        )
    if backend == "onnxruntime":
        from edge_shitu.backends.onnxruntime import OnnxRuntimeSession

        session = OnnxRuntimeSession.from_file(spec.path, threads=threads)
    elif backend == "paddlelite":
        from edge_shitu.backends.paddlelite import PaddleLiteSession

        # Lite checks neither the machine nor input shapes itself: both are checked by the session.
        session = PaddleLiteSession.from_file(
            spec.path, target=spec.target, threads=threads, input_shapes={spec.input.name: spec.input.shape}
        )
    else:
        raise BundleError(f"{spec.path}: backend {backend!r} is not available in this edge-shitu build")
    missing = [spec.input.name] if spec.input.name not in session.input_names else []
    if missing:
        raise BundleError(f"{spec.path}: model has inputs {list(session.input_names)}, manifest names {spec.input.name!r}")
    return session
