"""Reading ``.npz`` archives from users without trusting their sizes.

``np.load`` inflates a member before anything can look at its shape, so a small archive can make it
allocate gigabytes (a deflate bomb), and its zip directory is parsed whole on open. Here every size
is checked before the bytes it describes are read: the archive's central directory (from its end
record), then each member's ``.npy`` header (dtype, shape) against an :class:`ArraySpec`, and the
member's declared uncompressed size against that header. Only then is the data read, in chunks, and
never unpickled.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Mapping, Tuple, Type, Union

import numpy as np

from edge_shitu.errors import InvalidInputError, MissingFileError

__all__ = ["ArraySpec", "read_npz", "MAX_MEMBERS"]

MAX_MEMBERS = 64
"""Most members an archive may hold; the arrays edge-shitu reads come a few to a file."""
_MAX_DIRECTORY_BYTES = 256 << 10
# numpy's own limit on an .npy header (np.lib.format's max_header_size default).
_MAX_HEADER_BYTES = 10_000
_CHUNK_BYTES = 16 << 20
_NPY_MAGIC = b"\x93NUMPY"
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


@dataclass(frozen=True)
class ArraySpec:
    """What one member of an archive may hold; checked from its header before its data is read.

    Attributes:
      shape: the largest size of each axis; its length is the number of axes required.
      kinds: numpy dtype kinds allowed (``"f"`` floats, ``"iu"`` integers, ``"US"`` strings...).
        Object and structured dtypes are refused whatever this says.
      itemsize: smallest and largest bytes per element (bounds string dtypes).
      max_bytes: largest size of the whole array in bytes.
      dtype: how to name the expected dtype in messages, e.g. ``"float32"``.
    """

    shape: Tuple[int, ...]
    kinds: str = "f"
    itemsize: Tuple[int, int] = (1, 8)
    max_bytes: int = 1 << 30
    dtype: str = "float"

    def __post_init__(self) -> None:
        if not self.shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.shape):
            raise InvalidInputError(f"ArraySpec.shape must hold positive ints, got {self.shape!r}")
        if set(self.kinds) & set("OV") or not self.kinds:
            raise InvalidInputError(f"ArraySpec.kinds must name plain dtype kinds, got {self.kinds!r}")
        low, high = self.itemsize
        if not 1 <= low <= high or self.max_bytes < 0:
            raise InvalidInputError(f"ArraySpec needs 1 <= itemsize[0] <= itemsize[1] and max_bytes >= 0, got "
                                    f"itemsize {self.itemsize!r}, max_bytes {self.max_bytes!r}")


def read_npz(source: Union[str, "os.PathLike[str]", bytes], members: Mapping[str, ArraySpec], *,
             where: str, expected: str, what: str = ".npz archive", others: bool = False,
             error: Type[Exception] = InvalidInputError) -> Dict[str, np.ndarray]:
    """Read named arrays of an ``.npz`` archive, checking every size before reading what it describes.

    Args:
      source: the archive's path, or its bytes.
      members: array name (member ``name.npy``) -> what it may hold. All must be present.
      where: what to call the archive in messages (its path, usually).
      expected: a description of a valid archive, appended to messages.
      what: what to call a valid archive in "not a valid ..." messages.
      others: whether other members may be present; they are never read. Otherwise the archive
        must hold exactly ``members``.
      error: the exception class raised for a malformed archive (a ``ValueError`` subclass taking
        one message argument).

    Returns:
      name -> array: writeable, C-contiguous, of the dtype and shape its header declares.

    Raises:
      MissingFileError: ``source`` is a path that does not exist.
      error: the archive is not a zip of ``.npy`` members, a member is missing (or unexpected), has an
        object, structured or other disallowed dtype, a shape or size beyond its spec, or a declared
        size that differs from its header, or its data is damaged. Messages name ``where`` and end
        with ``expected``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(source)), members, where, expected, what, others, error)
    path = Path(source)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{where}: is a directory; expected {expected}") from None
    with f:
        return _read(f, members, where, expected, what, others, error)


def _read(f: BinaryIO, members: Mapping[str, ArraySpec], where: str, expected: str, what: str, others: bool,
          error: Type[Exception]) -> Dict[str, np.ndarray]:
    def fail(message: str, want: str = "") -> Exception:
        if want:
            return error(f"{where}: {message}, expected {want} ({expected})")
        return error(f"{where}: {message}; expected {expected}")

    try:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise fail(f"not a valid {what} (it is a single .npy array, not an .npz archive)")
        _check_directory(f, fail)
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise fail(f"holds {len(infos)} members, more than {MAX_MEMBERS}")
            keys = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in infos}
            if len(keys) != len(infos):
                raise fail("holds two members of the same name")
            missing = [k for k in members if k not in keys]
            if missing or (not others and set(keys) != set(members)):
                raise fail(f"holds {', '.join(sorted(keys)) or 'nothing'}")
            arrays = {}
            for key, spec in members.items():
                info = keys[key]
                if info.filename != f"{key}.npy":
                    raise fail(f"member {info.filename!r} is not {key}.npy")
                arrays[key] = _read_member(zf, info, key, spec, fail)
            return arrays
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError, struct.error, zlib.error) as exc:
        if isinstance(exc, error):
            raise
        raise fail(f"not a valid {what} ({exc})") from None


def _check_directory(f: BinaryIO, fail) -> None:
    """Bound the zip's central directory (which ``zipfile`` reads whole on open) from its end record."""
    size = f.seek(0, io.SEEK_END)
    tail_start = max(0, size - (_END.size + 0xFFFF))
    f.seek(tail_start)
    tail = f.read()
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < _END.size:
        return  # not a zip: zipfile says so in its own words
    _, _, _, _, entries, directory, _, _ = _END.unpack_from(tail, pos)
    end = tail_start + pos
    if end >= _END64_LOCATOR.size + _END64.size:
        f.seek(end - _END64_LOCATOR.size)
        locator = f.read(_END64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            f.seek(end - _END64_LOCATOR.size - _END64.size)
            record = f.read(_END64.size)
            if record[:4] == b"PK\x06\x06":
                fields = _END64.unpack(record)
                entries, directory = fields[7], fields[8]
    if entries > MAX_MEMBERS:
        raise fail(f"holds {entries} members, more than {MAX_MEMBERS}")
    if directory > _MAX_DIRECTORY_BYTES:
        raise fail(f"has a zip directory of {directory} bytes, more than {_MAX_DIRECTORY_BYTES}")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, spec: ArraySpec, fail) -> np.ndarray:
    if info.flag_bits & 0x1:
        raise fail(f"{key} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise fail(f"{key} is compressed with zip method {info.compress_type}; only stored or deflated members "
                   "are read")
    largest = spec.max_bytes + len(_NPY_MAGIC) + 4 + _MAX_HEADER_BYTES
    if info.file_size > largest:
        raise fail(f"{key} inflates to {info.file_size} bytes, more than the {largest} allowed for it")
    with zf.open(info) as f:
        head = f.read(len(_NPY_MAGIC) + 2)
        try:
            version = np.lib.format.read_magic(io.BytesIO(head))
        except ValueError as exc:
            raise fail(f"{key} is not a .npy array ({exc})") from None
        if version not in ((1, 0), (2, 0)):
            raise fail(f"{key} uses .npy format version {version[0]}.{version[1]}, not 1.0 or 2.0")
        length_format = "<H" if version == (1, 0) else "<I"
        length_bytes = f.read(struct.calcsize(length_format))
        if len(length_bytes) != struct.calcsize(length_format):
            raise fail(f"{key} is a truncated .npy array")
        (header_size,) = struct.unpack(length_format, length_bytes)
        if header_size > _MAX_HEADER_BYTES:
            raise fail(f"{key} has a .npy header of {header_size} bytes, more than {_MAX_HEADER_BYTES}")
        header = f.read(header_size)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(io.BytesIO(length_bytes + header))
        _check_header(key, shape, dtype, spec, fail)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        declared = len(head) + len(length_bytes) + header_size + nbytes
        if info.file_size != declared:
            raise fail(f"{key} declares {info.file_size} bytes in the archive, but its header describes "
                       f"{declared} (shape {list(shape)}, dtype {dtype}); the member is damaged")
        raw = bytearray(nbytes)
        view = memoryview(raw)
        done = 0
        while done < nbytes:
            got = f.readinto(view[done:done + _CHUNK_BYTES])
            if not got:
                raise fail(f"{key} is truncated ({done} of {nbytes} data bytes)")
            done += got
    arr = np.frombuffer(raw, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return np.ascontiguousarray(arr)


def _check_header(key: str, shape: Tuple[int, ...], dtype: np.dtype, spec: ArraySpec, fail) -> None:
    plain = dtype.names is None and dtype.subdtype is None and not dtype.hasobject
    low, high = spec.itemsize
    if not plain or dtype.kind not in spec.kinds or not low <= dtype.itemsize <= high:
        raise fail(f"{key} has dtype {dtype}", spec.dtype)
    if len(shape) != len(spec.shape):
        raise fail(f"{key} has shape {list(shape)}", f"{len(spec.shape)}-D")
    if any(s > m for s, m in zip(shape, spec.shape)):
        raise fail(f"{key} has shape {list(shape)}, beyond the largest allowed {list(spec.shape)}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > spec.max_bytes:
        raise fail(f"{key} of shape {list(shape)} and dtype {dtype} takes {nbytes} bytes, more than the "
                   f"{spec.max_bytes} allowed")
