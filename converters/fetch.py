"""Fetch official PP-ShiTu archives pinned in ``models.lock`` (models and the demo data set), verify them and
unpack them safely.

Sources are either the official URL recorded in the lock (``urllib``, no third-party HTTP client) or
a mirror given explicitly: a local directory or an ``http(s)://`` base URL laid out like the official
hosts, ``MIRROR/<host>/<url path>``. There is never a silent fallback from one source to another.
A verified copy in the cache is used without touching the network. A host that does not answer
costs the short connect timeout (connection, TLS handshake and response headers), not the read
timeout of the download, and a failed request is not retried.

An archive is downloaded (or copied) to a temporary file inside the cache directory, checked against
its pinned sha256, unpacked into a temporary directory with every member validated (no absolute
paths, no ``..``, no links, no devices, a size cap), the pinned member hashes are checked, and only
then is the directory renamed into place as ``<cache_dir>/<name>/<unpack_dir>``. A refused archive
leaves nothing behind. Archive metadata is bounded before it is read: the size of each tar
extended header (GNU long name/link, PAX) and of all of them, the length of names, the number of
members and the size of a zip's central directory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, Union

from edge_shitu.bundle import sha256_file
from edge_shitu.errors import BundleError, FetchError, InvalidInputError, MissingFileError

__all__ = [
    "LOCK_ENV_VAR",
    "CACHE_ENV_VAR",
    "CONNECT_TIMEOUT_S",
    "ROLES",
    "FORMATS",
    "STATUS_PINNED_OK",
    "STATUS_UNPINNED",
    "STATUS_UNLISTED",
    "FileSpec",
    "ModelEntry",
    "ModelsLock",
    "FileCheck",
    "FetchReport",
    "read_fetch_record",
    "ModelInfo",
    "default_lock_path",
    "default_cache_dir",
    "load_lock",
    "fetch",
    "list_models",
]

_log = logging.getLogger(__name__)

LOCK_ENV_VAR = "EDGE_SHITU_MODELS_LOCK"
"""Environment variable naming the ``models.lock`` to use instead of the repository's."""

CACHE_ENV_VAR = "EDGE_SHITU_CACHE"
"""Environment variable naming the default model cache directory."""

ROLES = ("detector", "extractor", "lite-package", "dataset")

CONNECT_TIMEOUT_S = 5.0
"""Default seconds to wait for a host to accept, finish TLS and send the response headers."""
FORMATS = ("tar", "zip")

STATUS_PINNED_OK = "pinned-ok"
STATUS_UNPINNED = "unpinned"
STATUS_UNLISTED = "unlisted"

ProgressCallback = Callable[[int, Optional[int]], None]

_LOCK_VERSION = 1
_LOCK_KEYS = ("lock_version", "about", "models")
_ENTRY_KEYS = ("name", "role", "url", "format", "archive_sha256", "unpack_dir", "files", "notes")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RECORD_NAME = ".edge-shitu-fetch.json"
_RECORD_VERSION = 1
_CHUNK = 1 << 20
_DEFAULT_MAX_BYTES = 1 << 30
_MAX_MEMBERS = 10_000
# PATH_MAX and NAME_MAX of Linux: a longer name cannot be created on the target anyway.
_MAX_NAME_BYTES = 4096
_MAX_NAME_PART_BYTES = 255
# One GNU long name/link or PAX header: room for a PATH_MAX path and link path plus the usual
# records. tarfile reads the whole payload into memory, and before CPython 3.11.10/3.12.6
# (CVE-2024-6232) its PAX parsing is quadratic in it, so it stays small.
_MAX_HEADER_BYTES = 16 << 10
# All extended headers of an archive together, and a zip's central directory: tarfile keeps every
# member (with its PAX records) in memory, and zipfile reads the whole directory before we see it.
_MAX_METADATA_BYTES = 2 << 20
# Extended headers stacked before one member (tar writes at most global + PAX + long name + long
# link); tarfile follows them by recursion.
_MAX_HEADER_CHAIN = 8
_MAX_PAX_RECORDS = 64
_QUOTE_CHARS = 80
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class FileSpec:
    """One expected member of a model directory.

    Attributes:
      path: POSIX path relative to the model directory, e.g. ``"inference.pdmodel"``.
      sha256: 64 lowercase hex digits, or None when the file is unpinned (its hash is not known).
    """

    path: str
    sha256: Optional[str]

    @property
    def pinned(self) -> bool:
        """True when the file's sha256 is recorded in the lock."""
        return self.sha256 is not None


@dataclass(frozen=True)
class ModelEntry:
    """One model source of ``models.lock``.

    Attributes:
      name: short identifier used on the command line, e.g. ``"picodet-mainbody"``.
      role: one of ``ROLES`` (``"dataset"`` for a data set such as the drink demo set).
      url: official https URL of the archive.
      format: ``"tar"`` (any compression ``tarfile`` reads) or ``"zip"``.
      archive_sha256: sha256 of the archive, or None when the archive is unpinned.
      unpack_dir: directory (relative POSIX path, ``"."`` for the archive root) the archive unpacks to.
      files: expected members of ``unpack_dir``, pinned or not.
      notes: provenance of the hashes and anything known about the archive.
    """

    name: str
    role: str
    url: str
    format: str
    archive_sha256: Optional[str]
    unpack_dir: str
    files: Tuple[FileSpec, ...]
    notes: str

    @property
    def archive_name(self) -> str:
        """Base name of the archive, from the URL (e.g. ``"X_infer.tar"``)."""
        return PurePosixPath(urllib.parse.urlsplit(self.url).path).name

    @property
    def pinned_count(self) -> int:
        """Number of members whose sha256 is pinned."""
        return sum(1 for f in self.files if f.pinned)

    @property
    def unpinned_count(self) -> int:
        """Number of members listed without a sha256."""
        return sum(1 for f in self.files if not f.pinned)


@dataclass(frozen=True)
class ModelsLock:
    """The parsed ``models.lock``.

    Attributes:
      path: the file it was read from.
      lock_version: format version (1).
      about: the free-text ``about`` lines, joined with newlines.
      models: the entries, in file order.
    """

    path: Path
    lock_version: int
    about: str
    models: Tuple[ModelEntry, ...]

    @property
    def names(self) -> Tuple[str, ...]:
        """Entry names, in file order."""
        return tuple(m.name for m in self.models)

    def get(self, name: str) -> ModelEntry:
        """Return the entry called ``name``.

        Args:
          name: an entry name, e.g. ``"ppshituv2-extractor"``.

        Returns:
          The matching ModelEntry.

        Raises:
          InvalidInputError: no entry has that name; the message lists the known names.
        """
        for m in self.models:
            if m.name == name:
                return m
        raise InvalidInputError(
            f"unknown model {name!r} in {self.path}; known models: {', '.join(self.names)}"
        )


@dataclass(frozen=True)
class FileCheck:
    """The sha256 seen for one file of a fetched model directory.

    Attributes:
      path: POSIX path relative to the model directory.
      sha256: the hash computed from the file on disk (64 lowercase hex digits).
      status: ``"pinned-ok"`` (matches the lock), ``"unpinned"`` (listed in the lock without a
        hash) or ``"unlisted"`` (present in the archive, not listed in the lock).
    """

    path: str
    sha256: str
    status: str


@dataclass(frozen=True)
class FetchReport:
    """What :func:`fetch` did and saw.

    Attributes:
      name: the lock entry name.
      model_dir: absolute path of the verified model directory (``<cache_dir>/<name>/<unpack_dir>``).
      archive_sha256: sha256 of the archive that was unpacked (for a cache hit, the one recorded
        when it was fetched).
      archive_pinned: True when the lock pins the archive's sha256 (and it matched).
      files: every listed member, then every unlisted file of the model directory, with its hash.
      source: where the archive was read from: a URL or a local file path.
      cached: True when no download happened because a verified copy was already in the cache.
    """

    name: str
    model_dir: Path
    archive_sha256: str
    archive_pinned: bool
    files: Tuple[FileCheck, ...]
    source: str
    cached: bool

    @property
    def unpinned(self) -> Tuple[str, ...]:
        """Paths of the files whose content was not checked against a pinned hash."""
        return tuple(f.path for f in self.files if f.status != STATUS_PINNED_OK)


@dataclass(frozen=True)
class ModelInfo:
    """One row of :func:`list_models`.

    Attributes:
      name: entry name.
      role: one of ``ROLES``.
      url: official URL.
      pinned: number of members with a pinned sha256.
      unpinned: number of members listed without a sha256.
      archive_pinned: True when the archive's sha256 is pinned.
      cached: True when ``cache_dir`` holds a fetch record of this entry whose listed files are all
        present (not re-hashed: :func:`fetch` re-verifies); None when no cache_dir was given.
    """

    name: str
    role: str
    url: str
    pinned: int
    unpinned: int
    archive_pinned: bool
    cached: Optional[bool]


# ------------------------------------------------------------------------------------------------
# models.lock


def default_lock_path() -> Path:
    """Return the lock file used when none is given.

    Returns:
      ``$EDGE_SHITU_MODELS_LOCK`` when set, else the ``models.lock`` installed with this package
      (in the repository, ``converters/models.lock``; the root's ``models.lock`` links to it).
    """
    env = os.environ.get(LOCK_ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "models.lock"


def default_cache_dir() -> Path:
    """Return the default model cache directory.

    Returns:
      ``$EDGE_SHITU_CACHE`` when set, else ``$XDG_CACHE_HOME/edge-shitu/models`` (``~/.cache`` when
      XDG_CACHE_HOME is unset). The directory is not created.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-shitu" / "models"


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_keys(obj: Any, allowed: Tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise BundleError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise BundleError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
            f"expected only {', '.join(allowed)}"
        )
    missing = [k for k in allowed if k not in obj]
    if missing:
        raise BundleError(f"{path}: missing key(s) {', '.join(map(repr, missing))} in {where}")


def _text(value: Any, what: str, path: Path, sep: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sep.join(value)
    raise BundleError(f"{path}: {what} must be a string or a list of strings, got {value!r}")


def _sha_or_none(value: Any, what: str, path: Path) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        raise BundleError(f"{path}: {what} must be null or 64 lowercase hex digits, got {value!r}")
    return value


def _relative_posix(value: Any, what: str, path: Path, *, allow_dot: bool) -> str:
    """Validate a relative POSIX path from the lock; return it normalised (no ``.`` parts)."""
    if not isinstance(value, str) or not value:
        raise BundleError(f"{path}: {what} must be a non-empty string, got {value!r}")
    if "\\" in value or "\x00" in value or value.startswith("/") or PureWindowsPath(value).drive:
        raise BundleError(f"{path}: {what} must be a relative POSIX path, got {value!r}")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{path}: {what} must not contain '..', got {value!r}")
    if not parts:
        if allow_dot:
            return "."
        raise BundleError(f"{path}: {what} must name a file, got {value!r}")
    return "/".join(parts)


def _parse_url(value: Any, what: str, path: Path) -> str:
    if not isinstance(value, str):
        raise BundleError(f"{path}: {what} must be a string, got {value!r}")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise BundleError(f"{path}: {what} must be an https:// URL with a host, got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise BundleError(f"{path}: {what} must not carry a query, fragment or credentials, got {value!r}")
    segments = parts.path.split("/")
    if not parts.path.startswith("/") or ".." in segments or "." in segments or not segments[-1]:
        raise BundleError(f"{path}: {what} must have a plain path ending in a file name, got {value!r}")
    return value


def _parse_entry(raw: Any, index: int, path: Path) -> ModelEntry:
    where = f"models[{index}]"
    _check_keys(raw, _ENTRY_KEYS, where, path)
    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BundleError(
            f"{path}: {where}.name must match {_NAME_RE.pattern} (it names a cache directory), got {name!r}"
        )
    where = f"model {name!r}"
    role = raw["role"]
    if role not in ROLES:
        raise BundleError(f"{path}: {where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    fmt = raw["format"]
    if fmt not in FORMATS:
        raise BundleError(f"{path}: {where}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    files_raw = raw["files"]
    if not isinstance(files_raw, dict):
        raise BundleError(f"{path}: {where}: files must be an object path -> sha256|null, got {files_raw!r}")
    files = []
    seen = set()
    for rel, sha in files_raw.items():
        norm = _relative_posix(rel, f"{where}: file path", path, allow_dot=False)
        if norm in seen:
            raise BundleError(f"{path}: {where}: file {rel!r} is listed twice")
        seen.add(norm)
        files.append(FileSpec(norm, _sha_or_none(sha, f"{where}: sha256 of {rel!r}", path)))
    return ModelEntry(
        name=name,
        role=role,
        url=_parse_url(raw["url"], f"{where}: url", path),
        format=fmt,
        archive_sha256=_sha_or_none(raw["archive_sha256"], f"{where}: archive_sha256", path),
        unpack_dir=_relative_posix(raw["unpack_dir"], f"{where}: unpack_dir", path, allow_dot=True),
        files=tuple(files),
        notes=_text(raw["notes"], f"{where}: notes", path, " "),
    )


def load_lock(path: Optional[Union[str, os.PathLike]] = None) -> ModelsLock:
    """Read and validate a ``models.lock`` file.

    Args:
      path: the lock file; default :func:`default_lock_path` (``$EDGE_SHITU_MODELS_LOCK``, else the
        repository's ``models.lock``).

    Returns:
      The parsed ModelsLock.

    Raises:
      MissingFileError: the file does not exist.
      BundleError: the file is not valid JSON, has unknown, missing or duplicate keys, a
        lock_version other than 1, duplicate names, a non-https URL, a hash that is not 64
        lowercase hex digits, or an unsafe path; the message names the file and the field.
    """
    lock_path = Path(path) if path is not None else default_lock_path()
    if not lock_path.is_file():
        raise MissingFileError(
            f"models lock not found: {lock_path} (set {LOCK_ENV_VAR} or pass the path of a models.lock)"
        )
    try:
        raw = json.loads(lock_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{lock_path}: not a valid models.lock JSON file: {exc}") from exc
    _check_keys(raw, _LOCK_KEYS, "the top level", lock_path)
    version = raw["lock_version"]
    if version != _LOCK_VERSION or isinstance(version, bool):
        raise BundleError(f"{lock_path}: lock_version must be {_LOCK_VERSION}, got {version!r}")
    if not isinstance(raw["models"], list):
        raise BundleError(f"{lock_path}: models must be a list, got {type(raw['models']).__name__}")
    models = tuple(_parse_entry(m, i, lock_path) for i, m in enumerate(raw["models"]))
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(f"{lock_path}: duplicate model name(s) {', '.join(dupes)}")
    return ModelsLock(
        path=lock_path,
        lock_version=version,
        about=_text(raw["about"], "about", lock_path, "\n"),
        models=models,
    )


# ------------------------------------------------------------------------------------------------
# sources


def _read_timeout_connection(base: type, read_timeout: float) -> type:
    """``base`` (an http.client connection class) whose socket switches to ``read_timeout`` once the
    response headers are in: until then the request's (short) connect timeout applies."""

    class _Connection(base):  # type: ignore[misc, valid-type]
        def getresponse(self):
            # getresponse() drops self.sock when the server will close the connection; the response
            # still reads from that socket.
            sock = self.sock
            response = super().getresponse()
            if sock is not None:
                sock.settimeout(read_timeout)
            return response

    return _Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _read_timeout_connection(http.client.HTTPConnection, read_timeout)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _read_timeout_connection(http.client.HTTPSConnection, read_timeout)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


def _open_url(url: str, timeout: float, connect_timeout: float):
    """Open ``url`` for reading (the single place that touches the network; tests replace it).

    ``connect_timeout`` bounds each connection attempt, the TLS handshake and the wait for the
    response headers; ``timeout`` bounds each read of the body after that.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "edge-shitu-fetch/1"})
    opener = urllib.request.build_opener(_HTTPHandler(timeout), _HTTPSHandler(timeout))
    return opener.open(request, timeout=connect_timeout)


def _is_timeout(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, TimeoutError)


def _copy_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    total: Optional[int],
    max_bytes: int,
    what: str,
    progress: Optional[ProgressCallback],
) -> Tuple[str, int]:
    h = hashlib.sha256()
    done = 0
    if progress is not None:
        progress(0, total)
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            break
        done += len(chunk)
        if done > max_bytes:
            raise FetchError(f"{what}: archive larger than the {max_bytes}-byte limit; refusing it")
        h.update(chunk)
        dst.write(chunk)
        if progress is not None:
            progress(done, total)
    return h.hexdigest(), done


def _source_for(entry: ModelEntry, mirror: Optional[Union[str, os.PathLike]]) -> Tuple[str, str]:
    """Return ``(kind, location)``: kind is ``"url"`` or ``"file"``."""
    if mirror is None:
        return "url", entry.url
    parts = urllib.parse.urlsplit(entry.url)
    host = parts.hostname or ""
    if isinstance(mirror, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", mirror):
        scheme = mirror.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise FetchError(
                f"mirror {mirror!r}: only a local directory or an http(s):// base URL is supported"
            )
        return "url", mirror.rstrip("/") + "/" + host + parts.path
    root = Path(mirror)
    if not root.is_dir():
        raise FetchError(f"mirror directory not found: {root} (expected a folder laid out as <host>/<url path>)")
    rel = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    return "file", str(root.joinpath(host, *rel))


def _retrieve(
    entry: ModelEntry,
    kind: str,
    location: str,
    dst: BinaryIO,
    *,
    timeout: float,
    connect_timeout: float,
    max_bytes: int,
    progress: Optional[ProgressCallback],
) -> Tuple[str, int]:
    """Stream the archive from its source into ``dst``; return (sha256, size)."""
    what = f"{entry.archive_name} from {location}"
    if kind == "file":
        src_path = Path(location)
        if not src_path.is_file():
            raise FetchError(
                f"archive of {entry.name!r} not found in the mirror: expected {src_path} "
                f"(mirror layout <mirror>/<host>/<url path> for {entry.url})"
            )
        try:
            with open(src_path, "rb") as src:
                return _copy_stream(
                    src, dst, total=src_path.stat().st_size, max_bytes=max_bytes, what=what, progress=progress
                )
        except FetchError:
            raise
        except OSError as exc:
            raise FetchError(f"cannot copy {src_path} into the cache: {exc}") from exc
    try:
        resp = _open_url(location, timeout, connect_timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"download failed: {location}: HTTP {exc.code} {_one_line(exc.reason)}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if _is_timeout(exc):
            raise FetchError(
                f"download failed: {location}: no answer within {connect_timeout:g} s (offline, or blocked by a firewall)"
            ) from exc
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise FetchError(f"download failed: {location}: {_one_line(reason)}") from exc
    try:
        with resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise FetchError(f"{what}: {total} bytes announced, over the {max_bytes}-byte limit; refusing it")
            digest, size = _copy_stream(resp, dst, total=total, max_bytes=max_bytes, what=what, progress=progress)
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # timeouts, resets, IncompleteRead
        raise FetchError(f"download failed: {location}: {_one_line(repr(exc))}") from exc
    if total is not None and size != total:
        raise FetchError(f"download truncated: {location}: got {size} of {total} bytes")
    return digest, size


# ------------------------------------------------------------------------------------------------
# safe unpacking


def _quote(text: str, limit: int = _QUOTE_CHARS) -> str:
    """``repr`` of an archive-supplied string, cut to about ``limit`` characters, for one-line messages."""
    shown = repr(text[:limit])
    if len(text) <= limit and len(shown) <= limit + 2:
        return shown
    return f"{shown[:limit]}... ({len(text)} characters)"


def _one_line(value: object, limit: int = 2 * _QUOTE_CHARS) -> str:
    """``str(value)`` (an exception, a server's reason phrase) on one line, cut to ``limit`` characters."""
    text = " ".join(_CONTROL_RE.sub(" ", str(value)[: 4 * limit]).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _member_path(name: str, archive: str) -> Optional[PurePosixPath]:
    """Validate an archive member name; return its relative path (None for the archive root)."""
    if not name or "\x00" in name:
        raise FetchError(f"unsafe member in {archive}: empty or NUL-containing name {_quote(name)}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > _MAX_NAME_BYTES:
        raise FetchError(
            f"unsafe member in {archive}: {_quote(name)} is a {size}-byte name, over the {_MAX_NAME_BYTES}-byte limit"
        )
    if _CONTROL_RE.search(name):
        raise FetchError(f"unsafe member in {archive}: {_quote(name)} contains control characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile decodes bytes that are not UTF-8 to lone surrogates
        raise FetchError(f"unsafe member in {archive}: {_quote(name)} is not a UTF-8 name") from None
    if "\\" in name:
        raise FetchError(f"unsafe member in {archive}: {_quote(name)} contains a backslash")
    if name.startswith("/") or PureWindowsPath(name).drive:
        raise FetchError(f"unsafe member in {archive}: {_quote(name)} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"unsafe member in {archive}: {_quote(name)} has a '..' component")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_PART_BYTES:
            raise FetchError(
                f"unsafe member in {archive}: {_quote(name)} has a path component over {_MAX_NAME_PART_BYTES} bytes"
            )
    return PurePosixPath(*parts) if parts else None


class _Unpacker:
    """Writes validated members below ``root``; never follows or creates links."""

    def __init__(self, root: Path, archive: str, max_bytes: int) -> None:
        self.root = root
        self.archive = archive
        self.max_bytes = max_bytes
        self.total = 0
        self.count = 0
        self.files: set = set()

    def _count(self, name: str) -> None:
        self.count += 1
        if self.count > _MAX_MEMBERS:
            raise FetchError(f"{self.archive}: more than {_MAX_MEMBERS} members (at {_quote(name)}); refusing it")

    def _reserve(self, name: str, size: int) -> None:
        self.total += size
        if self.total > self.max_bytes:
            raise FetchError(
                f"{self.archive}: unpacked size exceeds the {self.max_bytes}-byte limit at member {_quote(name)}"
            )

    def _mkdirs(self, rel: PurePosixPath, name: str) -> Path:
        target = self.root
        for part in rel.parts:
            target = target / part
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise FetchError(
                    f"unsafe member in {self.archive}: {_quote(name)} conflicts with a file of the archive"
                )
            if not target.exists():
                target.mkdir()
        return target

    def directory(self, rel: Optional[PurePosixPath], name: str) -> None:
        self._count(name)
        if rel is not None:
            self._mkdirs(rel, name)

    def file(self, rel: Optional[PurePosixPath], name: str, size: int, src: BinaryIO) -> None:
        self._count(name)
        if rel is None:
            raise FetchError(f"unsafe member in {self.archive}: file member {_quote(name)} has no name")
        key = rel.as_posix()
        if key in self.files:
            raise FetchError(f"unsafe member in {self.archive}: {_quote(name)} appears twice")
        self._reserve(name, size)
        parent = self._mkdirs(rel.parent, name) if rel.parent.parts else self.root
        target = parent / rel.name
        if target.exists() or target.is_symlink():
            raise FetchError(
                f"unsafe member in {self.archive}: {_quote(name)} conflicts with a directory of the archive"
            )
        written = 0
        with open(target, "xb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                written += len(chunk)
                if written > size:
                    raise FetchError(f"{self.archive}: member {_quote(name)} holds more bytes than its header says")
                dst.write(chunk)
        if written != size:
            raise FetchError(f"{self.archive}: member {_quote(name)} is truncated ({written} of {size} bytes)")
        self.files.add(key)


_EXTENDED_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    tarfile.XHDTYPE: "PAX",
    tarfile.XGLTYPE: "PAX global",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended",
}
_SPARSE_REFUSED = "the member at offset {offset} is a GNU sparse file, which is not supported"


class _HeaderRefused(Exception):
    """A tar header over a bound, raised while tarfile parses it.

    Not an OSError (as FetchError is) because ``tarfile.open`` reports any OSError of the gzip
    reader as "not a gzip file" and goes on trying other formats.
    """


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that bounds extended headers before tarfile reads their payload.

    tarfile reads the whole payload of a GNU long name/link or PAX header into memory, and follows
    a run of them by recursion, before it returns the member they describe; ``_proc_member`` is
    the hook tarfile documents for subclasses, and sees each header before its payload is read.
    """

    __slots__ = ()

    def _proc_member(self, tar: _BoundedTarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _HeaderRefused(_SPARSE_REFUSED.format(offset=self.offset))
        kind = _EXTENDED_HEADERS.get(self.type)
        if kind is not None:
            if self.size > _MAX_HEADER_BYTES:
                raise _HeaderRefused(
                    f"{kind} header at offset {self.offset} declares {self.size} bytes, "
                    f"over the {_MAX_HEADER_BYTES}-byte limit"
                )
            tar.header_bytes += self.size
            if tar.header_bytes > _MAX_METADATA_BYTES:
                raise _HeaderRefused(
                    f"extended headers exceed the {_MAX_METADATA_BYTES}-byte limit at offset {self.offset}"
                )
            tar.header_depth += 1
            if tar.header_depth > _MAX_HEADER_CHAIN:
                raise _HeaderRefused(f"more than {_MAX_HEADER_CHAIN} extended headers in a row at offset {self.offset}")
        try:
            member = super()._proc_member(tar)
        except ValueError as exc:
            # tarfile lets int() and decoding errors of header fields through unchanged.
            raise _HeaderRefused(f"malformed header at offset {self.offset}: {_one_line(exc)}") from exc
        finally:
            if kind is not None:
                tar.header_depth -= 1
        if member.sparse is not None:
            raise _HeaderRefused(_SPARSE_REFUSED.format(offset=member.offset))
        if len(member.pax_headers) > _MAX_PAX_RECORDS:
            raise _HeaderRefused(
                f"the member at offset {member.offset} has {len(member.pax_headers)} PAX records, "
                f"over the limit of {_MAX_PAX_RECORDS}"
            )
        return member

    def _proc_gnusparse_10(self, *args: Any) -> None:
        # Refused before tarfile reads the sparse map, whose length only the archive bounds.
        raise _HeaderRefused(_SPARSE_REFUSED.format(offset=self.offset))


class _BoundedTarFile(tarfile.TarFile):
    """TarFile reading members as :class:`_BoundedTarInfo`, with the per-archive header budget."""

    tarinfo = _BoundedTarInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.header_bytes = 0
        self.header_depth = 0
        super().__init__(*args, **kwargs)


def _unpack_tar(archive: Path, display: str, dest: Path, max_bytes: int) -> None:
    try:
        tf = _BoundedTarFile.open(archive, mode="r:*")
    except _HeaderRefused as exc:
        raise FetchError(f"{display}: {exc}; refusing it") from exc
    except (tarfile.TarError, OSError) as exc:
        raise FetchError(f"{display} is not a readable tar archive: {_one_line(exc)}") from exc
    out = _Unpacker(dest, display, max_bytes)
    data_filter = getattr(tarfile, "data_filter", None)
    with tf:
        try:
            for member in tf:
                name = member.name
                rel = _member_path(name, display)
                if member.issym() or member.islnk():
                    kind = "symlink" if member.issym() else "hardlink"
                    raise FetchError(
                        f"unsafe member in {display}: {_quote(name)} is a {kind} (to {_quote(member.linkname)}); "
                        "links are refused"
                    )
                if member.isdev():
                    raise FetchError(f"unsafe member in {display}: {_quote(name)} is a device or FIFO")
                if not (member.isreg() or member.isdir()):
                    raise FetchError(
                        f"unsafe member in {display}: {_quote(name)} has unsupported type {member.type!r}"
                    )
                if data_filter is not None:
                    # Second opinion from the stdlib where it exists (3.12+, backported to 3.9.17/3.10.12):
                    # our own checks above are the ones that must hold everywhere.
                    try:
                        data_filter(member, str(dest))
                    except tarfile.FilterError as exc:
                        raise FetchError(f"unsafe member in {display}: {_quote(name)}: {_one_line(exc)}") from exc
                if member.isdir():
                    out.directory(rel, name)
                    continue
                src = tf.extractfile(member)
                if src is None:
                    raise FetchError(f"{display}: member {_quote(name)} has no data")
                with src:
                    out.file(rel, name, member.size, src)
        except FetchError:
            raise
        except _HeaderRefused as exc:
            raise FetchError(f"{display}: {exc}; refusing it") from exc
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise FetchError(f"{display} is corrupt or truncated: {_one_line(exc)}") from exc


def _check_zip_directory(archive: Path, display: str) -> None:
    """Refuse a zip whose central directory is over the bounds before zipfile reads all of it."""
    # zipfile's own lookup of the end record, so the bound applies to the directory it will read;
    # a Python without it keeps only the per-member bounds.
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return
    with open(archive, "rb") as fh:
        record = end_record(fh)
    if not record:
        return
    entries, size = record[zipfile._ECD_ENTRIES_TOTAL], record[zipfile._ECD_SIZE]
    if entries > _MAX_MEMBERS:
        raise FetchError(f"{display}: its central directory lists {entries} members, over the limit of {_MAX_MEMBERS}")
    if size > _MAX_METADATA_BYTES:
        raise FetchError(
            f"{display}: its central directory takes {size} bytes, over the {_MAX_METADATA_BYTES}-byte limit"
        )


def _unpack_zip(archive: Path, display: str, dest: Path, max_bytes: int) -> None:
    try:
        _check_zip_directory(archive, display)
        zf = zipfile.ZipFile(archive)
    except FetchError:
        raise
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{display} is not a readable zip archive: {_one_line(exc)}") from exc
    out = _Unpacker(dest, display, max_bytes)
    with zf:
        try:
            for info in zf.infolist():
                name = info.filename
                rel = _member_path(name, display)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise FetchError(f"unsafe member in {display}: {_quote(name)} is a symlink; links are refused")
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                    raise FetchError(f"unsafe member in {display}: {_quote(name)} is a device, FIFO or socket")
                if info.flag_bits & 0x1:
                    raise FetchError(f"{display}: member {_quote(name)} is encrypted")
                if info.is_dir():
                    out.directory(rel, name)
                    continue
                with zf.open(info) as src:
                    out.file(rel, name, info.file_size, src)
        except FetchError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, zlib.error) as exc:
            raise FetchError(f"{display} is corrupt or truncated: {_one_line(exc)}") from exc


# ------------------------------------------------------------------------------------------------
# verification and the cache record


def _scan_files(model_dir: Path) -> List[str]:
    found = []
    for dirpath, _dirnames, filenames in os.walk(model_dir):
        for fn in filenames:
            rel = Path(dirpath, fn).relative_to(model_dir).as_posix()
            if rel != _RECORD_NAME:
                found.append(rel)
    return sorted(found)


def _some_names(names: List[str], shown: int = 3) -> str:
    """The first ``shown`` names, quoted and cut, then how many there are in all."""
    text = ", ".join(_quote(n, _QUOTE_CHARS // 2) for n in names[:shown])
    return text + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _verify_model_dir(entry: ModelEntry, model_dir: Path, display: str) -> Tuple[FileCheck, ...]:
    """Hash every file; raise when a listed file is missing or a pinned one differs."""
    if not model_dir.is_dir():
        top = sorted(p.name for p in model_dir.parent.iterdir()) if model_dir.parent.is_dir() else []
        raise FetchError(
            f"{display} does not unpack to {entry.unpack_dir}/ as models.lock expects for {entry.name!r} "
            f"(found at its top: {_some_names(top) or 'nothing'})"
        )
    present = _scan_files(model_dir)
    problems = []
    checks = []
    for spec in entry.files:
        path = model_dir / spec.path
        if not path.is_file() or path.is_symlink():
            problems.append(f"{spec.path} is listed in models.lock but missing from {display}")
            continue
        seen = sha256_file(path)
        if spec.sha256 is None:
            checks.append(FileCheck(spec.path, seen, STATUS_UNPINNED))
        elif seen == spec.sha256:
            checks.append(FileCheck(spec.path, seen, STATUS_PINNED_OK))
        else:
            problems.append(f"sha256 mismatch for {spec.path} in {display}: expected {spec.sha256}, got {seen}")
    if problems:
        found = _some_names(present, 5) or "none"
        raise FetchError(f"refusing model {entry.name!r}: " + "; ".join(problems) + f" (files found: {found})")
    listed = {s.path for s in entry.files}
    for rel in present:
        if rel not in listed:
            checks.append(FileCheck(rel, sha256_file(model_dir / rel), STATUS_UNLISTED))
    return tuple(checks)


def _entry_fingerprint(entry: ModelEntry) -> Dict[str, Any]:
    return {
        "url": entry.url,
        "format": entry.format,
        "archive_sha256": entry.archive_sha256,
        "unpack_dir": entry.unpack_dir,
    }


def read_fetch_record(model_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """Provenance of a model folder that :func:`fetch` unpacked, or None for any other folder.

    Returns:
      ``{"name": lock entry name, "archive_sha256": hash of the archive seen, "fetched_from": URL or
      mirror path}`` read from the fetch record beside the folder.
    """
    path = Path(model_dir).parent / _RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("record_version") != _RECORD_VERSION:
        return None
    return {"name": record.get("name"), "archive_sha256": record.get("archive_sha256"),
            "fetched_from": record.get("source")}


def _read_record(entry_root: Path, entry: ModelEntry) -> Optional[Dict[str, Any]]:
    """Return the fetch record when it exists and belongs to this lock entry, else None."""
    path = entry_root / _RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _log.warning("ignoring unreadable fetch record %s: %s", path, exc)
        return None
    if (
        not isinstance(record, dict)
        or record.get("record_version") != _RECORD_VERSION
        or record.get("name") != entry.name
        or record.get("entry") != _entry_fingerprint(entry)
        or not isinstance(record.get("files"), dict)
    ):
        return None
    return record


def _cached_report(entry: ModelEntry, entry_root: Path) -> Optional[FetchReport]:
    """Re-verify a cached copy; return its report, or None when it must be fetched again."""
    record = _read_record(entry_root, entry)
    if record is None:
        return None
    model_dir = entry_root / entry.unpack_dir
    recorded = record["files"]
    display = f"the cached copy {model_dir}"
    try:
        checks = _verify_model_dir(entry, model_dir, display)
    except FetchError as exc:
        _log.warning("cached copy of %s fails verification, fetching again: %s", entry.name, exc)
        return None
    for check in checks:
        if check.status == STATUS_UNPINNED and recorded.get(check.path) != check.sha256:
            _log.warning(
                "cached %s of %s changed since it was fetched (recorded %s, now %s); fetching again",
                check.path, entry.name, recorded.get(check.path), check.sha256,
            )
            return None
    return FetchReport(
        name=entry.name,
        model_dir=model_dir,
        archive_sha256=str(record.get("archive_sha256")),
        archive_pinned=entry.archive_sha256 is not None,
        files=checks,
        source=str(record.get("source")),
        cached=True,
    )


def _install(tmp_root: Path, entry_root: Path) -> None:
    """Move the verified temporary tree to ``entry_root``, replacing an older copy."""
    old = None
    if entry_root.exists() or entry_root.is_symlink():
        old = entry_root.parent / f".{entry_root.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(entry_root, old)
    try:
        os.rename(tmp_root, entry_root)
    except OSError as exc:
        if old is not None and not entry_root.exists():
            os.rename(old, entry_root)
            old = None
        raise FetchError(f"cannot move the verified copy into {entry_root}: {exc}") from exc
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# public entry points


def fetch(
    name: str,
    *,
    cache_dir: Union[str, os.PathLike],
    mirror: Optional[Union[str, os.PathLike]] = None,
    lock: Optional[ModelsLock] = None,
    timeout: float = 60,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    force: bool = False,
    progress: Optional[ProgressCallback] = None,
    max_bytes: int = _DEFAULT_MAX_BYTES,
) -> FetchReport:
    """Fetch, verify and unpack one entry of ``models.lock`` (a model or a data set) into ``cache_dir``.

    A copy already in the cache is re-hashed and reused unless ``force`` is set or it no longer
    verifies; reusing it makes no network access at all.

    Args:
      name: lock entry name, e.g. ``"ppshituv2-extractor"``.
      cache_dir: cache root; created if missing. The model lands in ``<cache_dir>/<name>/<unpack_dir>``.
      mirror: None for the official URL; a local directory laid out as ``<mirror>/<host>/<url path>``;
        or an ``http(s)://`` base URL with the same layout. Never falls back to another source.
      lock: the lock to use; default :func:`load_lock` ().
      timeout: seconds each read of a URL source's body may wait.
      connect_timeout: seconds a URL source's host may take to accept the connection, finish TLS
        and send the response headers; a host that does not answer fails after this long, and
        the request is not retried.
      force: fetch again even when a verified copy is cached.
      progress: optional ``progress(done_bytes, total_bytes_or_None)``, called while the archive is
        read.
      max_bytes: upper bound on the archive size and on its total unpacked size.

    Returns:
      A FetchReport (model directory, archive hash, per-file hashes and status, source, cached).

    Raises:
      InvalidInputError: unknown model name (the message lists the known ones), or a bad argument.
      MissingFileError, BundleError: the default lock cannot be read.
      FetchError: the source is unreachable or lacks the archive; the archive is too large, not a
        tar/zip, holds an unsafe member (absolute path, ``..``, link, device, sparse file, a name
        with control characters or over 4096 bytes), has too many members or oversized headers,
        or does not unpack to ``unpack_dir``; a pinned sha256 differs; a listed member is missing.
        Nothing is left in the cache when it is raised.
    """
    for what, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise InvalidInputError(f"{what} must be a positive number of seconds, got {value!r}")
    if not (isinstance(max_bytes, int) and max_bytes > 0):
        raise InvalidInputError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    lock = lock if lock is not None else load_lock()
    entry = lock.get(name)
    cache_root = Path(os.path.abspath(os.fspath(cache_dir)))
    entry_root = cache_root / entry.name

    if not force and entry_root.is_dir():
        report = _cached_report(entry, entry_root)
        if report is not None:
            _log.info("%s: verified copy already in %s", entry.name, report.model_dir)
            return report

    kind, location = _source_for(entry, mirror)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the cache directory {cache_root}: {exc}") from exc
    display = entry.archive_name
    _log.info("%s: fetching %s from %s", entry.name, display, location)

    fd, part_name = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".part", dir=cache_root)
    part = Path(part_name)
    tmp_root: Optional[Path] = None
    try:
        with os.fdopen(fd, "wb") as dst:
            digest, _size = _retrieve(
                entry, kind, location, dst, timeout=timeout, connect_timeout=connect_timeout,
                max_bytes=max_bytes, progress=progress,
            )
        if entry.archive_sha256 is not None and digest != entry.archive_sha256:
            raise FetchError(
                f"sha256 mismatch for archive {display} from {location}: expected {entry.archive_sha256}, got {digest}"
            )
        tmp_root = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=cache_root))
        if entry.format == "tar":
            _unpack_tar(part, display, tmp_root, max_bytes)
        else:
            _unpack_zip(part, display, tmp_root, max_bytes)
        part.unlink()
        checks = _verify_model_dir(entry, tmp_root / entry.unpack_dir, display)
        record = {
            "record_version": _RECORD_VERSION,
            "name": entry.name,
            "entry": _entry_fingerprint(entry),
            "archive_sha256": digest,
            "source": location,
            "files": {c.path: c.sha256 for c in checks},
        }
        # "x": an archive member of the same name must not be silently replaced by the record.
        with open(tmp_root / _RECORD_NAME, "x", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
        _install(tmp_root, entry_root)
        tmp_root = None
    except OSError as exc:
        if isinstance(exc, FetchError):
            raise
        raise FetchError(f"cannot fetch {display} for {entry.name!r} into {cache_root}: {exc}") from exc
    finally:
        if part.exists():
            part.unlink()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    model_dir = entry_root / entry.unpack_dir
    _log.info("%s: verified and unpacked to %s", entry.name, model_dir)
    return FetchReport(
        name=entry.name,
        model_dir=model_dir,
        archive_sha256=digest,
        archive_pinned=entry.archive_sha256 is not None,
        files=checks,
        source=location,
        cached=False,
    )


def list_models(
    lock: Optional[ModelsLock] = None, *, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> List[ModelInfo]:
    """Describe every entry of the lock, for ``edge-shitu models list``.

    Args:
      lock: the lock; default :func:`load_lock` ().
      cache_dir: when given, report whether each model is in that cache (a cheap check: the fetch
        record matches the entry and the listed files exist; :func:`fetch` re-verifies hashes).

    Returns:
      One ModelInfo per entry, in lock order.

    Raises:
      MissingFileError, BundleError: the default lock cannot be read.
    """
    lock = lock if lock is not None else load_lock()
    root = Path(os.fspath(cache_dir)) if cache_dir is not None else None
    rows = []
    for entry in lock.models:
        cached: Optional[bool] = None
        if root is not None:
            entry_root = root / entry.name
            model_dir = entry_root / entry.unpack_dir
            cached = _read_record(entry_root, entry) is not None and all(
                (model_dir / f.path).is_file() for f in entry.files
            )
        rows.append(
            ModelInfo(
                name=entry.name,
                role=entry.role,
                url=entry.url,
                pinned=entry.pinned_count,
                unpinned=entry.unpinned_count,
                archive_pinned=entry.archive_sha256 is not None,
                cached=cached,
            )
        )
    return rows
