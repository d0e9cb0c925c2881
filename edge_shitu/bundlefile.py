"""One-file bundles (``.esb``): a bundle directory as one uncompressed, aligned zip.

Layout: a plain zip (no ZIP64, no data descriptors, no comment) whose members are stored
uncompressed, ``manifest.json`` first, then the files the manifest names (models, hash head) and
``verify.json`` when the bundle has one. Every member's data starts at a multiple of
:data:`ALIGNMENT` bytes (padding in the local header's extra field, id ``0xD935``, as Android's
zipalign does), so a backend can map a model straight from the file. Timestamps are fixed and the
members come in a fixed order, so one bundle always packs to the same bytes.

Reading is strict and bounded before anything is read: the end record must close the file, the
central directory must follow the last member's data, members must be stored back to back from byte
0 (no gaps, overlaps or trailing data), their names relative (no ``..``, no absolute or Windows
paths) and unique, none compressed or encrypted, and sizes within :data:`MAX_MEMBER_BYTES` /
:data:`MAX_FILE_BYTES`. Which members may be there and their sha256 are checked by
:meth:`edge_shitu.bundle.Bundle.load` against the manifest; the manifest and ``verify.json``, which
the manifest cannot hash, are checked against their CRC-32.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import stat
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, List, Mapping, Sequence, Tuple, Union

from edge_shitu.errors import BundleError, IntegrityError, InvalidInputError, MissingFileError

__all__ = [
    "SUFFIX",
    "ALIGNMENT",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_FILE_BYTES",
    "Member",
    "BundleArchive",
    "pack_bundle",
    "unpack_bundle",
]

SUFFIX = ".esb"
ALIGNMENT = 64
"""Every member's data starts at a multiple of this many bytes (cache line; divides the page size)."""
MAX_MEMBERS = 16
"""Most members a one-file bundle may hold (a full bundle has five)."""
MAX_MEMBER_BYTES = (1 << 31) - 1
"""Largest member: ONNX's protobuf limit, and below ZIP64's threshold."""
MAX_FILE_BYTES = (1 << 32) - 1
"""Largest one-file bundle: a plain zip (no ZIP64) cannot address more."""
_MAX_NAME_BYTES = 255
_MAX_CENTRAL_BYTES = MAX_MEMBERS * 1024

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_ALIGN_EXTRA = struct.Struct("<HHH")  # header id, data size, alignment; zero padding follows
_ALIGN_EXTRA_ID = 0xD935
_UTF8_FLAG = 0x0800
_VERSION = 20
_MADE_BY = (3 << 8) | _VERSION  # Unix, so the permission bits below mean what they say
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00:00, the earliest zip date
_FILE_ATTRS = (stat.S_IFREG | 0o644) << 16
_CHUNK = 1 << 20


def _name_problem(name: str) -> str:
    """Why ``name`` cannot be a member name, or "" when it can."""
    if not name or len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"must have 1 to {_MAX_NAME_BYTES} bytes"
    if any(ord(ch) < 0x20 or ch in "\\:" for ch in name):
        return "must not hold control characters, backslashes or colons"
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return "must be a relative path without empty, '.' or '..' parts"
    return ""


def _canonical(file: str) -> str:
    """The member name of a file the manifest names (``./a//b`` is ``a/b``)."""
    return PurePosixPath(file).as_posix()


@dataclass(frozen=True)
class Member:
    """One stored file of a one-file bundle.

    Attributes:
      archive: absolute path of the ``.esb`` file.
      name: member name, a relative POSIX path (``extractor.onnx``).
      offset: byte offset of its data in the file (a multiple of :data:`ALIGNMENT` in packed bundles).
      size: its size in bytes.
      crc32: the CRC-32 the zip records for it.
      stamp: (device, inode, size, mtime in ns) of the file when it was indexed; reads refuse a file
        that changed since, whose offsets would no longer hold.
    """

    archive: Path
    name: str
    offset: int
    size: int
    crc32: int
    stamp: Tuple[int, int, int, int]

    def __str__(self) -> str:
        return f"{self.archive}:{self.name}"

    def _mapped(self):
        try:
            f = open(self.archive, "rb")
        except FileNotFoundError:
            raise MissingFileError(f"{self.archive}: one-file bundle not found (it was removed after it was loaded)") from None
        with f:
            if _stamp(os.fstat(f.fileno())) != self.stamp:
                raise BundleError(f"{self.archive}: changed since it was loaded; load the bundle again")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def read(self) -> bytes:
        """Return the member's bytes.

        Raises:
          MissingFileError: the ``.esb`` file is gone.
          BundleError: the file changed since it was indexed.
        """
        with self._mapped() as mm:
            return mm[self.offset:self.offset + self.size]

    def sha256(self) -> str:
        """Return the hex sha256 of the member's bytes, hashed from a read-only mapping of the file.

        Raises:
          MissingFileError: the ``.esb`` file is gone.
          BundleError: the file changed since it was indexed.
        """
        with self._mapped() as mm:
            view = memoryview(mm)
            try:
                return hashlib.sha256(view[self.offset:self.offset + self.size]).hexdigest()
            finally:
                view.release()

    def read_checked(self, limit: int) -> bytes:
        """Return the bytes of a small member the manifest cannot hash, checked against its CRC-32.

        Args:
          limit: largest size accepted, checked before reading.

        Raises:
          BundleError: the member is larger than ``limit``, or the file changed since it was indexed.
          IntegrityError: the CRC-32 differs.
        """
        if self.size > limit:
            raise BundleError(f"{self}: {self.size} bytes, more than the {limit} it may have")
        data = self.read()
        if zlib.crc32(data) != self.crc32:
            raise IntegrityError(f"{self}: CRC-32 differs from the one recorded in the zip; the file is damaged")
        return data


def _stamp(info: os.stat_result) -> Tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class BundleArchive:
    """The checked member index of a one-file bundle. Build it with :meth:`open`.

    Attributes:
      path: absolute path of the ``.esb`` file.
      members: member name -> :class:`Member`, in file order (``manifest.json`` first in a valid bundle).
    """

    path: Path
    members: Mapping[str, Member]

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "BundleArchive":
        """Index a one-file bundle and check its zip structure (not the members' contents).

        Args:
          path: the ``.esb`` file.

        Returns:
          The index; no file stays open.

        Raises:
          MissingFileError: no such file.
          BundleError: one line naming the file (and the member): not a regular file, not a zip,
            beyond :data:`MAX_FILE_BYTES`, more than :data:`MAX_MEMBERS` members, a member compressed,
            encrypted, beyond :data:`MAX_MEMBER_BYTES`, with an unsafe or duplicate name, or a
            local header disagreeing with the central directory; gaps, overlaps or trailing data.
        """
        path = Path(path).absolute()
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise MissingFileError(f"{path}: no such one-file bundle") from None
        except IsADirectoryError:
            raise BundleError(f"{path}: is a directory, not a one-file bundle") from None
        except OSError as exc:
            raise BundleError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        with f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"{path}: not a regular file")
            return cls(path, _index(f, path, info))

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    def __contains__(self, name: object) -> bool:
        return name in self.members

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)


def _index(f: BinaryIO, path: Path, info: os.stat_result) -> Mapping[str, Member]:
    size = info.st_size
    if size > MAX_FILE_BYTES:
        raise BundleError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} a one-file bundle may have")
    head = f.read(4)
    if len(head) < 4 or struct.unpack("<I", head)[0] != _LOCAL_SIG or size < _LOCAL.size + _END.size:
        raise BundleError(f"{path}: not a one-file bundle (.esb): it does not start with a zip member")
    f.seek(size - _END.size)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _END.unpack(f.read(_END.size))
    if sig != _END_SIG or comment:
        raise BundleError(f"{path}: not a one-file bundle: no zip end record at its very end (truncated, "
                          "trailing data or a comment)")
    if disk or cd_disk or n_disk != n_total:
        raise BundleError(f"{path}: a multi-part zip, which a one-file bundle is not")
    if not 1 <= n_total <= MAX_MEMBERS:
        raise BundleError(f"{path}: {n_total} members, a one-file bundle has 1 to {MAX_MEMBERS}")
    if cd_offset + cd_size != size - _END.size or cd_size > _MAX_CENTRAL_BYTES:
        raise BundleError(f"{path}: its zip directory ({cd_size} bytes at {cd_offset}) does not end where its end "
                          f"record starts (byte {size - _END.size}): truncated, or holding extra data")
    f.seek(cd_offset)
    central = f.read(cd_size)
    entries: List[Tuple[str, bytes, int, int, int, int]] = []
    pos = 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > cd_size:
            raise BundleError(f"{path}: zip directory ends inside an entry")
        (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, nlen, elen, clen, disk, _iattr,
         _eattr, offset) = _CENTRAL.unpack_from(central, pos)
        raw = central[pos + _CENTRAL.size:pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + elen + clen
        if sig != _CENTRAL_SIG or pos > cd_size:
            raise BundleError(f"{path}: zip directory is corrupt at entry {len(entries) + 1}")
        name = _decode_name(raw, flags, path)
        where = f"{path}:{name}"
        if flags & 0x1:
            raise BundleError(f"{where}: is encrypted; a one-file bundle stores its members in the clear")
        if method != 0:
            raise BundleError(f"{where}: is compressed (zip method {method}); a one-file bundle stores its members "
                              "uncompressed so models can be mapped from the file")
        if flags & ~_UTF8_FLAG:
            raise BundleError(f"{where}: uses zip features a one-file bundle does not (flags 0x{flags:04x})")
        if csize != usize or usize > MAX_MEMBER_BYTES:
            raise BundleError(f"{where}: {usize} bytes stored as {csize}; a member is stored as is and has at most "
                              f"{MAX_MEMBER_BYTES} bytes")
        if disk:
            raise BundleError(f"{where}: lies on another disk of a multi-part zip")
        problem = _name_problem(name)
        if problem:
            raise BundleError(f"{path}: member name {name!r} {problem}")
        if any(name == e[0] for e in entries):
            raise BundleError(f"{where}: appears twice")
        entries.append((name, raw, flags, crc, usize, offset))
    if pos != cd_size:
        raise BundleError(f"{path}: zip directory holds {cd_size - pos} bytes beyond its {n_total} entries")
    members = {}
    expected = 0
    stamp = _stamp(info)
    for name, raw, flags, crc, usize, offset in entries:
        where = f"{path}:{name}"
        if offset != expected:
            raise BundleError(f"{where}: starts at byte {offset}, expected {expected}; members must be stored back "
                              "to back in directory order (gaps or overlaps hide data)")
        f.seek(offset)
        local = f.read(_LOCAL.size)
        if len(local) < _LOCAL.size:
            raise BundleError(f"{where}: truncated local header")
        sig, _need, lflags, lmethod, _time, _date, lcrc, lcsize, lusize, nlen, elen = _LOCAL.unpack(local)
        if sig != _LOCAL_SIG or (lflags, lmethod, lcrc, lcsize, lusize) != (flags, 0, crc, usize, usize) \
                or f.read(nlen) != raw:
            raise BundleError(f"{where}: its local header disagrees with the zip directory")
        data_offset = offset + _LOCAL.size + nlen + elen
        expected = data_offset + usize
        if expected > cd_offset:
            raise BundleError(f"{where}: its data runs past the start of the zip directory (byte {cd_offset})")
        members[name] = Member(path, name, data_offset, usize, crc, stamp)
    if expected != cd_offset:
        raise BundleError(f"{path}: {cd_offset - expected} bytes between the last member and the zip directory")
    return members


def _decode_name(raw: bytes, flags: int, path: Path) -> str:
    try:
        return raw.decode("utf-8" if flags & _UTF8_FLAG else "ascii")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: a member name is neither ASCII nor marked as UTF-8 ({raw[:40]!r})") from None


# ---------------------------------------------------------------- writing


def _write_member(out: BinaryIO, name: str, source: Path, where: str) -> Tuple[bytes, int, int, int, int]:
    """Write one aligned local record; returns (name bytes, flags, crc, size, offset) for the directory."""
    raw = name.encode("utf-8")
    flags = 0 if raw.isascii() else _UTF8_FLAG
    offset = out.tell()
    pad = -(offset + _LOCAL.size + len(raw) + _ALIGN_EXTRA.size) % ALIGNMENT
    extra = _ALIGN_EXTRA.pack(_ALIGN_EXTRA_ID, 2 + pad, ALIGNMENT) + bytes(pad)
    size = source.stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise BundleError(f"{where}: {size} bytes, more than the {MAX_MEMBER_BYTES} a member may have")
    out.write(_LOCAL.pack(_LOCAL_SIG, _VERSION, flags, 0, _DOS_TIME, _DOS_DATE, 0, size, size, len(raw), len(extra)))
    out.write(raw + extra)
    crc, copied = 0, 0
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            crc = zlib.crc32(block, crc)
            copied += len(block)
            out.write(block)
    if copied != size:
        raise BundleError(f"{where}: changed while it was packed ({size} bytes, then {copied})")
    end = out.tell()
    out.seek(offset + 14)  # the CRC field; no data descriptors, so the header must hold it
    out.write(struct.pack("<I", crc))
    out.seek(end)
    return raw, flags, crc, size, offset


def _write_archive(out: BinaryIO, files: Sequence[Tuple[str, Path]], where: Path) -> None:
    records = []
    for name, source in files:
        records.append(_write_member(out, name, source, f"{where}:{name}"))
    cd_offset = out.tell()
    for raw, flags, crc, size, offset in records:
        out.write(_CENTRAL.pack(_CENTRAL_SIG, _MADE_BY, _VERSION, flags, 0, _DOS_TIME, _DOS_DATE, crc, size, size,
                                len(raw), 0, 0, 0, 0, _FILE_ATTRS, offset))
        out.write(raw)
    cd_size = out.tell() - cd_offset
    out.write(_END.pack(_END_SIG, 0, 0, len(records), len(records), cd_size, cd_offset, 0))
    if out.tell() > MAX_FILE_BYTES:
        raise BundleError(f"{where}: would have {out.tell()} bytes, more than the {MAX_FILE_BYTES} a one-file "
                          "bundle may have")


def _bundle_files(bundle) -> List[str]:
    """The files of a loaded bundle, in packing order: manifest, models by role, hash head, verify.json."""
    from edge_shitu.bundle import MANIFEST_NAME, VERIFY_NAME

    names = [MANIFEST_NAME]
    for spec in bundle.models.values():
        names.append(_canonical(bundle.manifest["models"][spec.role]["file"]))
    if bundle.hash is not None:
        names.append(_canonical(bundle.manifest["hash"]["file"]))
    names.append(VERIFY_NAME)
    unique = list(dict.fromkeys(names))
    for name in unique:
        problem = _name_problem(name)
        if problem:
            raise BundleError(f"{bundle.path}: file name {name!r} cannot go into a one-file bundle: it {problem}")
    return unique


def _check_destination(dest: Path, overwrite: bool, *, directory: bool) -> None:
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise InvalidInputError(f"{dest}: already exists; pass --overwrite to replace it")
    if directory and dest.exists():
        from edge_shitu.bundle import MANIFEST_NAME

        if not dest.is_dir() or dest.is_symlink() or (any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file()):
            raise InvalidInputError(f"{dest}: is not a bundle folder; only a bundle folder (or an empty one) is "
                                    "replaced")
    if not directory and dest.exists() and not dest.is_file():
        raise InvalidInputError(f"{dest}: is not a regular file; give the path of the .esb file to write")
    if not dest.parent.is_dir():
        raise InvalidInputError(f"{dest}: folder {dest.parent} does not exist")


def pack_bundle(src_dir: Union[str, os.PathLike], out_file: Union[str, os.PathLike], *,
                overwrite: bool = False) -> Path:
    """Write a bundle directory as one file (see the module docstring for the layout).

    The bundle is loaded and verified first; the file is written under a private name beside
    ``out_file``, loaded back and verified, and only then renamed to ``out_file``, so a failure leaves
    no partial file behind.

    Args:
      src_dir: the bundle directory.
      out_file: the ``.esb`` file to write.
      overwrite: replace ``out_file`` if it exists.

    Returns:
      ``out_file``.

    Raises:
      MissingFileError: ``src_dir`` or a file its manifest names is missing.
      BundleError: ``src_dir`` is not a valid bundle (or is already one file), or a file is too large.
      IntegrityError: a file's sha256 differs from the manifest, before or after packing.
      InvalidInputError: ``out_file`` exists and ``overwrite`` is false, is not a regular file, or its
        folder does not exist.
      OSError: the file cannot be written (a full disk, no permission).
    """
    from edge_shitu.bundle import VERIFY_NAME, Bundle

    src, dest = Path(src_dir), Path(out_file)
    if src.is_file():
        raise BundleError(f"{src}: is already a one-file bundle (pack takes a bundle folder)")
    bundle = Bundle.load(src)
    _check_destination(dest, overwrite, directory=False)
    files = [(name, src / name) for name in _bundle_files(bundle)]
    files = [(name, p) for name, p in files if name != VERIFY_NAME or p.is_file()]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_archive(out, files, dest)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        packed = Bundle.load(tmp)
        if dict(packed.manifest) != dict(bundle.manifest) or list(packed.archive.members) != [n for n, _ in files]:
            raise BundleError(f"{dest}: the packed file does not read back as {src}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def unpack_bundle(esb: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                  overwrite: bool = False) -> Path:
    """Write a one-file bundle back out as a bundle directory, byte for byte the one it was packed from.

    The file is loaded and verified first; the directory is written under a private name beside
    ``out_dir``, loaded back and verified, and only then renamed to ``out_dir``.

    Args:
      esb: the ``.esb`` file.
      out_dir: the directory to create.
      overwrite: replace ``out_dir`` if it exists; only a bundle folder (one with ``manifest.json``) or
        an empty folder is replaced, never any other folder.

    Returns:
      ``out_dir``.

    Raises:
      MissingFileError: ``esb`` does not exist.
      BundleError: ``esb`` is not a valid one-file bundle.
      IntegrityError: a member's sha256 (or CRC-32) differs from the manifest's, before or after unpacking.
      InvalidInputError: ``out_dir`` exists and ``overwrite`` is false, or is not a bundle folder, or
        its parent folder does not exist.
      OSError: the directory cannot be written.
    """
    from edge_shitu.bundle import MAX_JSON_BYTES, Bundle

    src, dest = Path(esb), Path(out_dir)
    if src.is_dir():
        raise BundleError(f"{src}: is a bundle folder, not a one-file bundle (unpack takes an .esb file)")
    bundle = Bundle.load(src)
    if bundle.archive is None:
        raise BundleError(f"{src}: not a one-file bundle")
    _check_destination(dest, overwrite, directory=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old = None
    try:
        hashed = {spec.member.name for spec in bundle.models.values()}
        if bundle.hash is not None:
            hashed.add(bundle.hash.member.name)
        for name, member in bundle.archive.members.items():
            target = tmp.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            data = member.read() if name in hashed else member.read_checked(MAX_JSON_BYTES)
            with open(target, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        if dict(Bundle.load(tmp).manifest) != dict(bundle.manifest):
            raise BundleError(f"{dest}: the unpacked folder does not read back as {src}")
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "bundle")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old / "bundle", dest)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
