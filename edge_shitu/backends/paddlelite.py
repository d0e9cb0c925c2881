"""Paddle-Lite backend (``paddlelite.lite`` MobileConfig, ``.nb`` naive-buffer models).

Paddle-Lite checks very little by itself: an ARM ``.nb`` run on x86 returns garbage or segfaults, a
truncated or foreign file aborts the whole process (SIGABRT), float64 or wrongly shaped inputs run
silently into garbage, and under numpy 2 ``Tensor.from_numpy`` corrupts its input. So this module
checks the machine, the file and every input *before* handing anything to Lite.

``paddlelite`` is imported only when a session is created. Its PyPI wheels exist for x86_64 and
Python <= 3.10 only (``pip install paddlelite==2.13rc0 "numpy<2"``); ARM boards use Paddle-Lite's
own ARM Python build.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import re
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.errors import (
    BackendUnavailableError,
    BundleError,
    IntegrityError,
    InvalidDtypeError,
    InvalidInputError,
    MissingFileError,
    TargetMismatchError,
)
from edge_shitu.options import check_threads

__all__ = ["PaddleLiteSession", "read_nb_targets", "check_nb_target", "machine_target", "POWER_MODES"]

_log = logging.getLogger(__name__)

INSTALL_HINT = (
    'pip install paddlelite==2.13rc0 "numpy<2" (PyPI wheels exist for x86_64 and Python <= 3.10 only; '
    "on ARM boards install Paddle-Lite's own ARM Python build)"
)

# platform.machine() spellings -> Paddle-Lite target of the .nb kernels that run there.
_MACHINE_TARGETS = {
    "x86_64": "x86", "amd64": "x86", "x64": "x86", "i386": "x86", "i686": "x86", "x86": "x86",
    "aarch64": "arm", "arm64": "arm", "armv7l": "arm", "armv8l": "arm", "armv7": "arm", "armv8": "arm",
}

#: Accepted ``power_mode`` names -> ``lite.PowerMode`` members (ARM builds only).
POWER_MODES = {
    "high": "LITE_POWER_HIGH",
    "low": "LITE_POWER_LOW",
    "full": "LITE_POWER_FULL",
    "no_bind": "LITE_POWER_NO_BIND",
    "rand_high": "LITE_POWER_RAND_HIGH",
    "rand_low": "LITE_POWER_RAND_LOW",
}

# .nb layout (Paddle-Lite 2.12 / 2.13): uint16 meta version, 16-byte version string, uint64 topology
# size, flatbuffer topology, then the parameters.
_NB_HEADER = struct.Struct("<H16sQ")
_NB_META_VERSION = 2
# Kernel keys in the topology: b"op/alias/TARGET/PRECISION/LAYOUT\0", e.g. b"conv2d/def/2/1/1\0".
_KERNEL_KEY = re.compile(rb"([a-z][a-z0-9_]*)/([A-Za-z0-9_]+)/(\d+)/(\d+)/(\d+)\x00")
# TargetType codes of Paddle-Lite (lite/api/paddle_place.h); host/any kernels run everywhere.
_TARGET_CODES = {1: "host", 2: "x86", 4: "arm", 5: "opencl", 6: "any", 9: "xpu", 17: "metal", 18: "nnadapter"}
_PORTABLE_TARGETS = frozenset({"host", "any"})


def read_nb_targets(path: Union[str, Path]) -> FrozenSet[str]:
    """Read which machine targets a Paddle-Lite ``.nb`` file was optimised for, without loading it.

    Reads the header, the topology and the parameter record headers (a few hundred small reads, no
    parameter data); the parameter records must end exactly at the end of the file, so a truncated file
    is caught. Paddle-Lite is never called: it aborts the whole process on a malformed file.

    Args:
      path: the ``.nb`` file.

    Returns:
      The targets of the model's kernels, host/any kernels left out, e.g. ``frozenset({"x86"})`` or
      ``frozenset({"arm"})``. Unknown target codes appear as ``"target<code>"``.

    Raises:
      MissingFileError: ``path`` does not exist.
      IntegrityError: the file is not a Paddle-Lite naive-buffer model (bad header, truncated
        topology, no target-specific kernel).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _nb_targets(f, os.fstat(f.fileno()).st_size, path)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such Paddle-Lite model file") from None
    except IsADirectoryError:
        raise IntegrityError(f"{path}: is a directory, expected a Paddle-Lite .nb file") from None


def _nb_targets(f: BinaryIO, file_size: int, path) -> FrozenSet[str]:
    """:func:`read_nb_targets` of an open file (or an in-memory model) of ``file_size`` bytes; ``path`` names it."""
    head = f.read(_NB_HEADER.size)
    if len(head) < _NB_HEADER.size:
        raise IntegrityError(
            f"{path}: not a Paddle-Lite .nb model: {len(head)} bytes, expected a "
            f"{_NB_HEADER.size}-byte header"
        )
    meta_version, version, topo_size = _NB_HEADER.unpack(head)
    if meta_version != _NB_META_VERSION:
        raise IntegrityError(
            f"{path}: not a Paddle-Lite .nb model: meta version {meta_version}, expected "
            f"{_NB_META_VERSION} (Paddle-Lite >= 2.10)"
        )
    if not version.startswith(b"v"):
        raise IntegrityError(
            f"{path}: not a Paddle-Lite .nb model: version field {version[:8]!r} does not start with 'v'"
        )
    if topo_size == 0 or topo_size > file_size - _NB_HEADER.size:
        raise IntegrityError(
            f"{path}: truncated or corrupt .nb model: topology of {topo_size} bytes declared, "
            f"{max(file_size - _NB_HEADER.size, 0)} bytes follow the header"
        )
    topo = f.read(topo_size)
    _check_params_section(f, path, _NB_HEADER.size + topo_size, file_size)
    codes = {int(m.group(3)) for m in _KERNEL_KEY.finditer(topo)}
    targets = frozenset(_TARGET_CODES.get(c, f"target{c}") for c in codes) - _PORTABLE_TARGETS
    if not targets:
        raise IntegrityError(
            f"{path}: corrupt .nb model: no target-specific kernel found in its topology "
            "(expected e.g. x86 or arm kernels)"
        )
    return targets


def _check_params_section(f, path: Path, start: int, file_size: int) -> None:
    """Walk the parameter records after the topology; they must end exactly at the end of the file.

    Layout (lite/model_parser/flatbuffers/io.cc): uint16 version (0), uint16 meta size, meta bytes,
    uint16 header size, header (uint16 param count, uint32 largest tensor), then per parameter
    uint32 total size, uint32 offset and ``total size`` - 4 more bytes.
    """

    def read(offset: int, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        f.seek(offset)
        data = f.read(size)
        if len(data) < size:
            raise IntegrityError(
                f"{path}: truncated .nb model: the parameter section ends at byte {file_size}, "
                f"a record at byte {offset} needs {size} more bytes"
            )
        return struct.unpack(fmt, data)

    version, meta_size = read(start, "<HH")
    if version != 0:
        raise IntegrityError(f"{path}: corrupt .nb model: parameter section version {version}, expected 0")
    offset = start + 4 + meta_size
    (header_size,) = read(offset, "<H")
    if header_size < 6:
        raise IntegrityError(f"{path}: corrupt .nb model: parameter header of {header_size} bytes, expected >= 6")
    count, _largest = read(offset + 2, "<HI")
    offset += 2 + header_size
    for i in range(count):
        total, inner = read(offset, "<II")
        if inner < 4 or inner > total:
            raise IntegrityError(f"{path}: corrupt .nb model: parameter {i} has a bad record header")
        offset += 4 + total
        if offset > file_size:
            raise IntegrityError(
                f"{path}: truncated .nb model: parameter {i} of {count} ends at byte {offset}, "
                f"the file has {file_size} bytes"
            )
    if offset != file_size:
        raise IntegrityError(
            f"{path}: corrupt .nb model: its {count} parameters end at byte {offset}, the file has {file_size} bytes"
        )


def machine_target(machine: Optional[str] = None) -> Optional[str]:
    """The Paddle-Lite target whose ``.nb`` kernels run on this machine.

    Args:
      machine: a ``platform.machine()`` string; ``None`` asks :func:`platform.machine`.

    Returns:
      ``"x86"``, ``"arm"``, or ``None`` for a machine Paddle-Lite has no CPU kernels for.
    """
    name = platform.machine() if machine is None else machine
    return _MACHINE_TARGETS.get(name.lower())


def check_nb_target(path: Union[str, Path], target: str) -> str:
    """Refuse a ``.nb`` file that was not built for this machine, without loading it.

    Args:
      path: the ``.nb`` file.
      target: the target the manifest records for it: ``"x86"``, ``"arm"`` or ``"any"`` (then only
        the file's own kernels are checked).

    Returns:
      This machine's target (``"x86"`` or ``"arm"``).

    Raises:
      BundleError: ``target`` is not one of any/x86/arm.
      TargetMismatchError: the manifest's target or the file's kernels do not match this machine,
        or they disagree with each other.
      IntegrityError: the file is not a complete Paddle-Lite ``.nb`` model.
      MissingFileError: the file does not exist.
    """
    path = Path(path)
    return _check_target(path, target, lambda: read_nb_targets(path))


def _check_target(path, target: str, read_kernels: Callable[[], FrozenSet[str]]) -> str:
    """:func:`check_nb_target` of the model ``path`` names; ``read_kernels`` is called only after the machine checks."""
    if target not in ("any", "x86", "arm"):
        raise BundleError(f"{path}: target must be any, x86 or arm, got {target!r}")
    raw_machine = platform.machine()
    machine = machine_target(raw_machine)
    if machine is None:
        raise TargetMismatchError(
            f"{path}: Paddle-Lite .nb models run on x86 or ARM CPUs; this machine is {raw_machine!r}"
        )
    if target != "any" and target != machine:
        raise TargetMismatchError(
            f"{path}: this Paddle-Lite model was built for {target}, but this machine is {raw_machine} ({machine}); "
            f"Lite runs a foreign .nb into garbage or a crash, so it is refused. Convert the models for {machine}"
        )
    kernels = read_kernels()
    if kernels != frozenset({machine}):
        recorded = f"the manifest records {target}, but " if target != "any" else ""
        raise TargetMismatchError(
            f"{path}: {recorded}the file holds {'/'.join(sorted(kernels))} kernels and this machine is "
            f"{raw_machine} ({machine}); convert the models again for {machine}"
        )
    return machine


def _numpy_major() -> int:
    return int(np.__version__.split(".", 1)[0])


def _import_lite():
    try:
        import paddlelite.lite as lite
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the paddlelite backend is not installed ({exc}); it needs Python <= 3.10: {INSTALL_HINT}. "
            "From a newer Python, run Lite bundles through the side environment made by scripts/setup-lite-env"
        ) from None
    if _numpy_major() >= 2:
        raise BackendUnavailableError(
            f"paddlelite cannot run with numpy {np.__version__}: its Tensor.from_numpy silently corrupts "
            'inputs under numpy 2 (values like 1e22). Install "numpy<2" in this environment'
        )
    return lite


def _check_shape_spec(name: str, shape: Sequence[int]) -> Tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if not dims or any(d != -1 and d < 1 for d in dims):
        raise InvalidInputError(f"input {name!r}: expected shape must hold positive sizes or -1, got {list(shape)}")
    return dims


class PaddleLiteSession:
    """A ``.nb`` model run by Paddle-Lite's light predictor (``MobileConfig``).

    Build it with :meth:`from_file` or :meth:`from_bytes`, which check the machine and the model
    before Lite sees them.
    Inputs and outputs are matched by name; every feed must be float32 and, for inputs with a known
    shape, of that shape (-1 = any size), because Lite runs other dtypes and shapes silently into
    garbage.
    """

    def __init__(self, predictor, *, path: Union[str, Path] = "<memory>",
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Wrap an already created Lite predictor (tests inject fakes).

        Args:
          predictor: a ``paddlelite.lite`` light predictor (or an object with the same methods).
          path: the model file, for messages.
          input_shapes: input name -> expected shape, -1 for a free dimension; inputs not named are
            only checked for dtype.

        Raises:
          BundleError: ``input_shapes`` names an input the model does not have.
          InvalidInputError: ``input_shapes`` holds sizes < 1 other than -1.
        """
        self._predictor = predictor
        self._path = Path(path) if not isinstance(path, Path) else path
        self._inputs = tuple(str(n) for n in predictor.get_input_names())
        self._outputs = tuple(str(n) for n in predictor.get_output_names())
        shapes = dict(input_shapes or {})
        unknown = sorted(set(shapes) - set(self._inputs))
        if unknown:
            raise BundleError(
                f"{self._path}: model has inputs {list(self._inputs)}, but shapes are given for {unknown}"
            )
        self._shapes: Dict[str, Tuple[int, ...]] = {n: _check_shape_spec(n, s) for n, s in shapes.items()}

    @classmethod
    def from_file(cls, path: Union[str, Path], *, target: str, threads: Optional[int] = None,
                  power_mode: Optional[str] = None,
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> "PaddleLiteSession":
        """Check and load a Paddle-Lite ``.nb`` model.

        Before anything is imported or loaded, the machine must match ``target`` and the file's own
        kernels (:func:`read_nb_targets`), and the file must be a complete ``.nb``: Lite itself would
        return garbage, segfault or abort the process.

        Args:
          path: the ``.nb`` file.
          target: the target the bundle records for it (``"x86"``, ``"arm"``; ``"any"`` checks only the
            file's kernels).
          threads: worker threads, from 1 to ``os.cpu_count()``. Only ARM builds of Paddle-Lite can set
            them; the x86 build has no ``set_threads`` and always runs on one thread, so the value is
            then checked but ignored.
          power_mode: CPU binding of ARM builds: "high", "low", "full", "no_bind", "rand_high" or
            "rand_low" (``lite.PowerMode.LITE_POWER_*``); ignored by x86 builds, which have none.
          input_shapes: input name -> expected shape (-1 = free dimension), checked at every run.

        Returns:
          The loaded session.

        Raises:
          TargetMismatchError: the model was built for another machine.
          IntegrityError: the file is not a complete Paddle-Lite ``.nb`` model.
          MissingFileError: the file does not exist.
          BackendUnavailableError: paddlelite is not installed, or numpy >= 2 is (Lite corrupts its
            inputs under numpy 2).
          InvalidInputError: bad ``threads``, ``power_mode`` or ``input_shapes``.
          BundleError: Lite refuses the model, or it lacks an input named in ``input_shapes``.
        """
        path = Path(path)
        return cls._create(path, path, target=target, threads=threads, power_mode=power_mode,
                           input_shapes=input_shapes)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str, target: str, threads: Optional[int] = None,
                   power_mode: Optional[str] = None,
                   input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> "PaddleLiteSession":
        """Check and load a Paddle-Lite model from memory (``MobileConfig.set_model_from_buffer``), as
        :meth:`from_file` does from a file; a model of a one-file bundle is never written to disk.

        Args:
          data: the ``.nb`` file's bytes.
          where: what names the model in messages (``bundle.esb:extractor.nb``).
          target, threads, power_mode, input_shapes: as :meth:`from_file`.

        Returns:
          The loaded session.

        Raises:
          InvalidDtypeError: ``data`` is not ``bytes``.
          TargetMismatchError, IntegrityError, BackendUnavailableError, InvalidInputError, BundleError:
            as :meth:`from_file`.
        """
        if not isinstance(data, bytes):
            raise InvalidDtypeError(f"{where}: model data must be bytes, got {type(data).__name__}")
        return cls._create(data, where, target=target, threads=threads, power_mode=power_mode,
                           input_shapes=input_shapes)

    @classmethod
    def _create(cls, model: Union[Path, bytes], path, *, target: str, threads: Optional[int],
                power_mode: Optional[str], input_shapes: Optional[Mapping[str, Sequence[int]]]) -> "PaddleLiteSession":
        if threads is not None:
            threads = check_threads(threads)
        if power_mode is not None and power_mode not in POWER_MODES:
            raise InvalidInputError(f"power_mode must be one of {', '.join(POWER_MODES)} or None, got {power_mode!r}")
        shapes = {n: _check_shape_spec(n, s) for n, s in (input_shapes or {}).items()}
        if isinstance(model, bytes):
            _check_target(path, target, lambda: _nb_targets(io.BytesIO(model), len(model), path))
        else:
            check_nb_target(model, target)
        lite = _import_lite()
        config = lite.MobileConfig()
        if isinstance(model, bytes):
            config.set_model_from_buffer(model)
        else:
            config.set_model_from_file(str(model))
        if threads is not None:
            if hasattr(config, "set_threads"):
                config.set_threads(threads)
            else:
                _log.debug("%s: this Paddle-Lite build has no set_threads (x86); running on one thread", path)
        if power_mode is not None:
            if hasattr(config, "set_power_mode"):
                config.set_power_mode(getattr(lite.PowerMode, POWER_MODES[power_mode]))
            else:
                _log.debug("%s: this Paddle-Lite build has no set_power_mode (x86); ignored", path)
        try:
            predictor = lite.create_paddle_predictor(config)
        except Exception as exc:  # Lite raises untyped RuntimeErrors for models it cannot build
            raise BundleError(f"{path}: Paddle-Lite cannot load this model: {exc}") from None
        return cls(predictor, path=path, input_shapes=shapes)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> Tuple[str, ...]:
        return self._outputs

    def _check_feed(self, name: str, value) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise InvalidDtypeError(f"{self._path}: input {name!r} must be a numpy float32 array, got {type(value).__name__}")
        if value.dtype != np.float32:
            raise InvalidDtypeError(
                f"{self._path}: input {name!r} must be float32, got {value.dtype} (Paddle-Lite does not cast; "
                "it would run other dtypes into garbage)"
            )
        expected = self._shapes.get(name)
        if expected is not None:
            ok = value.ndim == len(expected) and all(e == -1 or e == d for e, d in zip(expected, value.shape))
            if not ok:
                shown = "(" + ", ".join("N" if e == -1 else str(e) for e in expected) + ")"
                raise InvalidInputError(
                    f"{self._path}: input {name!r} must have shape {shown}, got {tuple(value.shape)}"
                )
        if value.size == 0:
            raise InvalidInputError(f"{self._path}: input {name!r} is empty (shape {tuple(value.shape)})")
        return np.ascontiguousarray(value)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model; see :class:`edge_shitu.backends.base.Session`.

        Args:
          feeds: input name -> float32 array, one per model input, of the expected shape.
          outputs: output names to return, in this order; ``None`` for all, in model order.

        Returns:
          Copies of the requested outputs (float32 arrays; Lite reuses its output buffers).

        Raises:
          InvalidInputError: a feed is missing, unknown, empty or of the wrong shape; an output name is unknown.
          InvalidDtypeError: a feed is not a float32 array.
          BundleError: the session is closed, or Lite fails to run the model.
        """
        if self._predictor is None:
            raise BundleError(f"{self._path}: this Paddle-Lite session is closed")
        unknown = sorted(set(feeds) - set(self._inputs))
        missing = [n for n in self._inputs if n not in feeds]
        if unknown or missing:
            raise InvalidInputError(
                f"{self._path}: feeds must be exactly the inputs {list(self._inputs)}; "
                f"unknown {unknown}, missing {missing}"
            )
        names = self._outputs if outputs is None else tuple(outputs)
        bad = [n for n in names if n not in self._outputs]
        if bad:
            raise InvalidInputError(f"{self._path}: unknown outputs {bad}; the model's outputs are {list(self._outputs)}")
        arrays = {n: self._check_feed(n, feeds[n]) for n in self._inputs}
        try:
            for n, a in arrays.items():
                self._predictor.get_input_by_name(n).from_numpy(a)
            self._predictor.run()
            return [np.array(self._predictor.get_output_by_name(n).numpy(), copy=True) for n in names]
        except Exception as exc:  # Lite raises untyped RuntimeErrors
            raise BundleError(f"{self._path}: Paddle-Lite failed to run the model: {exc}") from None

    def close(self) -> None:
        """Release the predictor; the session must not be used afterwards."""
        self._predictor = None

    def __enter__(self) -> "PaddleLiteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
