"""Run Paddle-Lite models from the main environment through the Paddle-Lite side environment.

``paddlelite`` installs only under Python <= 3.10 with numpy < 2, while the main environment may be
newer. :class:`SideEnvSession` implements the :class:`edge_shitu.backends.base.Session` protocol by
talking to one persistent worker process, ``<side python> -I -m edge_shitu_converters.lite_worker``, which loads
the model with :class:`edge_shitu.backends.paddlelite.PaddleLiteSession` and answers run requests.

Protocol (stdin/stdout of the worker): frames of ``b"ESLW"``, a little-endian uint64 payload length,
then the payload, an ``.npz`` archive (``np.savez``; read with ``allow_pickle=False``). Every message
has an ``op``; the worker answers each request with ``status`` ``"ok"`` or ``"error"`` (then ``type``,
the edge-shitu error class name, and ``message``). The worker first sends ``hello``; requests are
``open`` (model path, target, threads, power mode, input name and shape; for a model of a one-file
bundle also ``model``, its bytes as a uint8 array, and the path only names it), ``run`` (feeds,
output names) and ``close``. The worker moves file descriptor 1 to stderr, so nothing Lite prints can
corrupt the frames.

A worker that crashes (Lite aborts or segfaults on some models) or stops answering (killed after
``timeout`` seconds) raises :class:`WorkerCrashError` with its exit status and the tail of its stderr.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_shitu import errors as _errors
from edge_shitu.errors import (
    BackendUnavailableError,
    BundleError,
    ConversionError,
    EdgeShituError,
    InvalidDtypeError,
    InvalidInputError,
)
from edge_shitu.options import check_threads

__all__ = ["SideEnvSession", "WorkerCrashError", "find_lite_python", "PROTOCOL"]

#: Version of the frame protocol; the worker must speak the same one.
PROTOCOL = 2

_MAGIC = b"ESLW"
_LENGTH = struct.Struct("<Q")
_MAX_FRAME = 1 << 34  # 16 GiB: anything larger is a corrupt length, not a batch
_STDERR_TAIL = 3000

SETUP_HINT = (
    "create it with scripts/setup-lite-env (Python 3.10 + paddlelite==2.13rc0 + numpy<2 + this repository), "
    "or point EDGE_SHITU_LITE_PYTHON at such a Python"
)


class WorkerCrashError(ConversionError):
    """The Paddle-Lite worker process died or stopped answering; the message has its exit status and stderr."""


# ---------------------------------------------------------------- locating the side environment

def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_lite_python(explicit: Optional[os.PathLike] = None) -> Path:
    """Return the Python of the Paddle-Lite side environment.

    Looks at ``explicit``, then ``$EDGE_SHITU_LITE_PYTHON``, then ``.venv-lite`` beside this
    repository's ``pyproject.toml`` (where ``scripts/setup-lite-env`` puts it). A path that is
    named but missing is an error, never a fallback to the next place.

    Args:
      explicit: path of a Python executable, or ``None``.

    Returns:
      The Python executable (not started; :class:`SideEnvSession` checks it works).

    Raises:
      BackendUnavailableError: no side environment was found; the message says how to create one.
    """
    if explicit is not None:
        source, candidate = "the given lite python", Path(explicit)
    elif os.environ.get("EDGE_SHITU_LITE_PYTHON"):
        source, candidate = "$EDGE_SHITU_LITE_PYTHON", Path(os.environ["EDGE_SHITU_LITE_PYTHON"])
    else:
        candidate = _venv_python(_repo_root() / ".venv-lite")
        if candidate.is_file():
            return candidate
        raise BackendUnavailableError(
            f"no Paddle-Lite side environment: $EDGE_SHITU_LITE_PYTHON is not set and {candidate} does not exist; "
            + SETUP_HINT
        )
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise BackendUnavailableError(f"{candidate} ({source}) is not an executable Python; " + SETUP_HINT)
    return candidate


# ---------------------------------------------------------------- framing

def encode(message: Mapping[str, Any]) -> bytes:
    """Serialise a message (str, int, float, bool, None, lists of str, numeric arrays) to npz bytes.

    Raises:
      InvalidDtypeError: an array has an object dtype (it would need pickle).
    """
    arrays: Dict[str, np.ndarray] = {}
    for key, value in message.items():
        if value is None:
            continue  # absent keys read back as None
        if isinstance(value, (list, tuple)):
            value = np.array([str(v) for v in value], dtype=str) if value else np.zeros(0, dtype="<U1")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise InvalidDtypeError(f"message field {key!r} has an object dtype, which cannot be sent without pickle")
        arrays[key] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(payload: bytes) -> Dict[str, np.ndarray]:
    """Read npz bytes written by :func:`encode` (no pickle)."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_frame(stream: IO[bytes], message: Mapping[str, Any]) -> None:
    """Write one framed message and flush."""
    payload = encode(message)
    stream.write(_MAGIC + _LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Optional[Dict[str, np.ndarray]]:
    """Read one framed message; ``None`` at a clean end of stream.

    Raises:
      EOFError: the stream ended inside a frame.
      ValueError: the bytes are not a frame.
    """
    head = stream.read(len(_MAGIC) + _LENGTH.size)
    if not head:
        return None
    if len(head) < len(_MAGIC) + _LENGTH.size:
        raise EOFError("stream ended inside a frame header")
    if head[: len(_MAGIC)] != _MAGIC:
        raise ValueError(f"not a frame: starts with {head[:len(_MAGIC)]!r}")
    (size,) = _LENGTH.unpack(head[len(_MAGIC):])
    if size > _MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError(f"stream ended inside a frame ({len(payload)} of {size} bytes)")
    return decode(payload)


def _text(msg: Mapping[str, np.ndarray], key: str, default: Optional[str] = None) -> Optional[str]:
    return str(msg[key]) if key in msg else default


def _names(msg: Mapping[str, np.ndarray], key: str) -> Tuple[str, ...]:
    return tuple(str(v) for v in msg[key].tolist()) if key in msg else ()


# ---------------------------------------------------------------- main-process side

def _error_class(name: str):
    cls = getattr(_errors, name, None) if name in _errors.__all__ else None
    return cls if isinstance(cls, type) and issubclass(cls, EdgeShituError) else None


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _stop(proc: subprocess.Popen, stderr_file: IO[bytes]) -> None:
    """End a worker (EOF on stdin, then kill) and release its pipes; safe to call twice."""
    try:
        if proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        stderr_file.close()


class SideEnvSession:
    """A Paddle-Lite model run in the side environment's worker process (one worker per session).

    Implements :class:`edge_shitu.backends.base.Session`; use it wherever a session is injected
    (``Detector(spec, session, ...)``, ``verify_bundle(session_factory=...)``). Errors raised in the
    worker come back as the same edge-shitu error class (e.g. :class:`TargetMismatchError` for an ARM
    model on x86); a crash or hang of the worker raises :class:`WorkerCrashError`. Use it as a context
    manager or call :meth:`close`.
    """

    def __init__(self, spec, *, python: Optional[os.PathLike] = None, threads: Optional[int] = None,
                 power_mode: Optional[str] = None, timeout: float = 300.0, start_timeout: float = 120.0) -> None:
        """Start the worker and load ``spec``'s model in it.

        Args:
          spec: the :class:`edge_shitu.bundle.ModelSpec` of a ``paddlelite`` model.
          python: the side environment's Python; ``None`` uses :func:`find_lite_python`.
          threads: Lite threads (ARM builds only; the x86 build runs on one thread).
          power_mode: ARM power mode ("high", "low", "full", "no_bind", "rand_high", "rand_low").
          timeout: seconds one run may take before the worker is killed.
          start_timeout: seconds for the worker to start and load the model.

        Raises:
          BundleError: ``spec`` is not a paddlelite model, or the model's inputs differ from the manifest.
          TargetMismatchError: the model was built for another machine.
          IntegrityError: the model file is not a complete ``.nb`` file.
          BackendUnavailableError: no side environment, or it lacks paddlelite / edge-shitu / numpy < 2.
          InvalidInputError: bad ``threads``, ``power_mode`` or timeouts.
          WorkerCrashError: the worker died or hung while loading the model.
        """
        if spec.backend != "paddlelite":
            raise BundleError(f"{spec.path}: a {spec.backend} model cannot run in the Paddle-Lite side environment")
        if not (timeout > 0 and start_timeout > 0):
            raise InvalidInputError(f"timeouts must be positive, got timeout={timeout}, start_timeout={start_timeout}")
        if threads is not None:
            check_threads(threads)  # before a worker process is started for nothing
        self._python = find_lite_python(python)
        self._path = Path(spec.path)
        self._input_name = spec.input.name
        self._timeout = float(timeout)
        self._lock = threading.Lock()
        self._timed_out = False
        self._dead: Optional[str] = None
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                [str(self._python), "-I", "-m", "edge_shitu_converters.lite_worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            )
        except OSError as exc:
            self._stderr.close()
            raise BackendUnavailableError(f"cannot start {self._python} ({exc}); " + SETUP_HINT) from None
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._stderr)
        try:
            self._start(spec, threads, power_mode, float(start_timeout))
        except BaseException:
            self.close()
            raise

    def _start(self, spec, threads: Optional[int], power_mode: Optional[str], start_timeout: float) -> None:
        try:
            hello = self._exchange(None, start_timeout)
        except WorkerCrashError as exc:
            raise BackendUnavailableError(
                f"the Paddle-Lite side environment {self._python} cannot start the worker: {exc}; " + SETUP_HINT
            ) from None
        protocol = int(hello["protocol"]) if "protocol" in hello else -1
        if _text(hello, "op") != "hello" or protocol != PROTOCOL:
            raise BackendUnavailableError(
                f"the worker of {self._python} speaks protocol {protocol}, this edge-shitu speaks {PROTOCOL}; "
                "reinstall this repository in the side environment (scripts/setup-lite-env)"
            )
        self.worker_versions = {k: _text(hello, k) for k in ("python", "numpy", "edge_shitu")}
        # A model of a one-file bundle travels in the open request itself, so it is never unpacked to disk.
        member = getattr(spec, "member", None)
        model = None if member is None else np.frombuffer(spec.read_bytes(), dtype=np.uint8)
        reply = self._request({
            "op": "open", "path": str(self._path.absolute()), "target": spec.target, "threads": threads,
            "power_mode": power_mode, "input_name": spec.input.name,
            "input_shape": np.asarray(spec.input.shape, dtype=np.int64), "model": model,
        }, start_timeout)
        self._inputs = _names(reply, "input_names")
        self._outputs = _names(reply, "output_names")

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self._outputs

    @property
    def pid(self) -> int:
        """Process id of the worker."""
        return self._proc.pid

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model in the worker; see :class:`edge_shitu.backends.base.Session`.

        Args:
          feeds: input name -> float32 array of the manifest's shape (-1 = any batch).
          outputs: output names to return, in this order; ``None`` for all, in model order.

        Returns:
          The requested outputs, float32 arrays.

        Raises:
          InvalidDtypeError: a feed is not a float32 array.
          InvalidInputError: a feed is missing, unknown or of the wrong shape; an output name is unknown.
          WorkerCrashError: the worker died or hung for ``timeout`` seconds (now or earlier).
          BundleError: the session is closed, or Lite failed to run the model.
        """
        names = list(feeds)
        for n in names:
            a = feeds[n]
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
                raise InvalidDtypeError(f"{self._path}: input {n!r} must be a float32 array, got {got}")
        message: Dict[str, Any] = {"op": "run", "feed_names": names, "outputs": list(outputs) if outputs is not None else None}
        message.update({f"feed_{i}": feeds[n] for i, n in enumerate(names)})
        reply = self._request(message, self._timeout)
        return [reply[f"out_{i}"] for i in range(int(reply["count"]))]

    def close(self) -> None:
        """End the worker (it exits on end of input; killed after 10 s); idempotent."""
        if self._dead is None:
            self._dead = "closed"
        self._finalizer()

    def __enter__(self) -> "SideEnvSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing

    def _expire(self) -> None:
        self._timed_out = True
        self._proc.kill()

    def _exchange(self, message: Optional[Mapping[str, Any]], timeout: float) -> Dict[str, np.ndarray]:
        """Send ``message`` (``None``: only read) and read one reply; a watchdog kills a hung worker."""
        with self._lock:
            if self._dead == "closed":
                raise BundleError(f"{self._path}: this Paddle-Lite session is closed")
            if self._dead is not None:
                raise WorkerCrashError(f"{self._path}: the Paddle-Lite worker is {self._dead}; create a new session")
            watchdog = threading.Timer(timeout, self._expire)
            watchdog.daemon = True
            watchdog.start()
            try:
                if message is not None:
                    write_frame(self._proc.stdin, message)
                reply = read_frame(self._proc.stdout)
                broken = None if reply is not None else "end of output"
            except (OSError, EOFError, ValueError) as exc:
                reply, broken = None, f"{type(exc).__name__}: {exc}"
            finally:
                watchdog.cancel()
            if reply is None:
                raise self._crashed(timeout, broken)
            return reply

    def _request(self, message: Mapping[str, Any], timeout: float) -> Dict[str, np.ndarray]:
        reply = self._exchange(message, timeout)
        if _text(reply, "status") == "ok":
            return reply
        kind, text = _text(reply, "type", "ConversionError"), _text(reply, "message", "")
        cls = _error_class(kind)
        where = f" (in the Paddle-Lite worker, {self._python})"
        if cls is None:
            raise ConversionError(f"{self._path}: the Paddle-Lite worker failed: {kind}: {text}{where}")
        raise cls(text + where)

    def _crashed(self, timeout: float, broken: Optional[str]) -> WorkerCrashError:
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        status = _signal_name(self._proc.returncode)
        if self._timed_out:
            what = f"did not answer within {timeout:g} s and was killed"
        else:
            what = f"died ({status})" if self._proc.returncode != 0 else f"stopped answering ({broken}, {status})"
        self._dead = f"dead ({status})"
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - _STDERR_TAIL))
        tail = self._stderr.read().decode("utf-8", "replace").strip()
        self._finalizer()
        return WorkerCrashError(
            f"{self._path}: the Paddle-Lite worker ({self._python}, pid {self._proc.pid}) {what}; "
            f"last stderr:\n{tail or '(empty)'}"
        )


# ---------------------------------------------------------------- worker side

def _serve(proto_in: IO[bytes], proto_out: IO[bytes]) -> None:
    import edge_shitu
    from edge_shitu.backends.paddlelite import PaddleLiteSession

    write_frame(proto_out, {"op": "hello", "protocol": PROTOCOL, "python": sys.version.split()[0],
                            "numpy": np.__version__, "edge_shitu": getattr(edge_shitu, "__version__", "")})
    session: Optional[PaddleLiteSession] = None
    while True:
        msg = read_frame(proto_in)
        if msg is None:
            break
        op = _text(msg, "op")
        try:
            if op == "open":
                if session is not None:
                    raise InvalidInputError("this worker already holds a model")
                path, name = _text(msg, "path"), _text(msg, "input_name")
                threads = int(msg["threads"]) if "threads" in msg else None
                options = dict(target=_text(msg, "target"), threads=threads, power_mode=_text(msg, "power_mode"),
                               input_shapes={name: tuple(int(d) for d in msg["input_shape"])})
                if "model" in msg:
                    session = PaddleLiteSession.from_bytes(msg["model"].tobytes(), where=path, **options)
                else:
                    session = PaddleLiteSession.from_file(path, **options)
                reply: Dict[str, Any] = {"input_names": list(session.input_names),
                                         "output_names": list(session.output_names)}
            elif op == "run":
                if session is None:
                    raise InvalidInputError("no model is open in this worker")
                names = _names(msg, "feed_names")
                feeds = {n: msg[f"feed_{i}"] for i, n in enumerate(names)}
                outs = session.run(feeds, _names(msg, "outputs") if "outputs" in msg else None)
                reply = {"count": len(outs)}
                reply.update({f"out_{i}": o for i, o in enumerate(outs)})
            elif op == "close":
                break
            else:
                raise InvalidInputError(f"unknown worker request {op!r}")
        except EdgeShituError as exc:
            write_frame(proto_out, {"status": "error", "type": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # report anything else instead of dying silently
            write_frame(proto_out, {"status": "error", "type": type(exc).__name__, "message": str(exc)})
        else:
            reply["status"] = "ok"
            write_frame(proto_out, reply)
    if session is not None:
        session.close()


def main() -> int:
    """Worker entry point: serve requests on stdin/stdout until end of input."""
    proto_out = os.fdopen(os.dup(1), "wb")
    # Paddle-Lite and numpy may print to fd 1; only frames may go to the real stdout.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _serve(sys.stdin.buffer, proto_out)
    finally:
        proto_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
