"""Writing hash heads: head files (reproducible bytes) and putting a head into a bundle or taking it out.

The runtime only reads heads and applies them (:mod:`edge_shitu.hashing`); whatever writes them
lives here, beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from edge_shitu.errors import HashHeadError, InvalidInputError, MissingFileError
from edge_shitu.hashing import HEAD_FILE, HashHead

__all__ = ["head_bytes", "head_sha256", "save_head", "install_head", "remove_head"]

PathLike = Union[str, "os.PathLike[str]"]
_MEMBERS = {"weight.npy": "weight", "bias.npy": "bias"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def head_bytes(head: HashHead) -> bytes:
    """The exact bytes :func:`save_head` writes (an uncompressed zip with fixed timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for member, key in _MEMBERS.items():
            info = zipfile.ZipInfo(member, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            body = io.BytesIO()
            np.lib.format.write_array(body, getattr(head, key), allow_pickle=False)
            zf.writestr(info, body.getvalue())
    return buf.getvalue()


def head_sha256(head: HashHead) -> str:
    """Hex sha256 of :func:`head_bytes` (what a bundle records for the file :func:`save_head` writes)."""
    return hashlib.sha256(head_bytes(head)).hexdigest()


def save_head(head: HashHead, path: PathLike) -> Path:
    """Write a head as a reproducible ``.npz`` (same head, same bytes), atomically.

    Args:
      head: the head.
      path: destination file; its folder must exist.

    Returns:
      ``path`` as a Path.

    Raises:
      MissingFileError: the folder of ``path`` does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFileError(f"{path.parent}: no such folder to write {path.name} into")
    data = head_bytes(head)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def install_head(bundle_dir: PathLike, head: Union[HashHead, PathLike], *,
                 source: Optional[Mapping[str, Any]] = None) -> Path:
    """Put a hash head into an existing bundle (replacing any head it had).

    Writes ``hash.npz`` and rewrites ``manifest.json`` (``hash`` entry with the file's sha256,
    ``codes.bits`` = the head's bits), each atomically. The codes and the code fingerprint of the
    bundle change, so galleries made with it before must be re-hashed (``edge-shitu gallery
    rehash``) or rebuilt. A crash between the two writes leaves a bundle the runtime refuses (the
    sha256 check), never one that makes wrong codes.

    Args:
      bundle_dir: a bundle directory with an extractor.
      head: a :class:`HashHead`, or the path of a head file.
      source: provenance to record in the manifest (e.g. how the head was trained); JSON values.

    Returns:
      The path of the head file inside the bundle.

    Raises:
      MissingFileError, BundleError, IntegrityError: the bundle is missing, malformed or damaged.
      HashHeadError: the head file is malformed, or its ``d`` differs from the extractor's dim.
      InvalidInputError: ``bundle_dir`` is a one-file bundle (``.esb``), or ``source`` is not JSON.
    """
    from edge_shitu.bundle import MANIFEST_NAME, Bundle

    bundle = _bundle_folder(bundle_dir)
    if not isinstance(head, HashHead):
        head = HashHead.load(head)
    ext = bundle.require("extractor")
    if head.dim != ext.output.dim:
        raise HashHeadError(
            f"hash head takes {head.dim}-d features (weight [{head.bits}, {head.dim}]), but the extractor of "
            f"{bundle.path} gives {ext.output.dim}-d features"
        )
    record = {"file": HEAD_FILE, "sha256": head_sha256(head), "bits": head.bits, "dim": head.dim,
              "source": dict(source or {})}
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"hash head source must hold JSON values only ({exc})") from None
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["hash"] = record
    manifest["codes"]["bits"] = head.bits
    save_head(head, bundle.path / HEAD_FILE)
    _write_manifest(bundle.path / MANIFEST_NAME, manifest)
    Bundle.load(bundle.path)
    return bundle.path / HEAD_FILE


def remove_head(bundle_dir: PathLike) -> bool:
    """Take the hash head out of a bundle: its codes become plain sign codes again.

    Returns:
      True when a head was removed, False when the bundle had none.

    Raises:
      MissingFileError, BundleError, IntegrityError: the bundle is missing, malformed or damaged.
    """
    from edge_shitu.bundle import MANIFEST_NAME, Bundle

    bundle = _bundle_folder(bundle_dir)
    if bundle.hash is None:
        return False
    manifest = json.loads(json.dumps(bundle.manifest))
    del manifest["hash"]
    manifest["codes"]["bits"] = bundle.require("extractor").output.dim
    _write_manifest(bundle.path / MANIFEST_NAME, manifest)
    (bundle.path / HEAD_FILE).unlink(missing_ok=True)
    Bundle.load(bundle.path)
    return True


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _bundle_folder(path: PathLike):
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(path)
    if bundle.archive is not None:
        # A one-file bundle is what travels to devices; heads are installed where bundles are made.
        raise InvalidInputError(f"{bundle.path}: a one-file bundle cannot be changed in place; unpack it "
                                "(edge-shitu bundle unpack), install the head into the folder, and pack it again")
    return bundle

